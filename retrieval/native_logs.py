"""TensorFlow's and LiteRT's native start-up lines, held to ``TF_CPP_MIN_LOG_LEVEL``.

``TF_CPP_MIN_LOG_LEVEL`` (0 all, 1 no INFO, 2 no WARNING, 3 no ERROR) is how a TensorFlow
process asks for fewer C++ log lines, and TensorFlow honours it for most of them (the "failed
call to cuInit" error, the "This TensorFlow binary is optimized ..." notice). A few lines reach
stderr at every start regardless, because no setting reaches them:

* ``import tensorflow`` (TF 2.21): static initialisers of ``libtensorflow_framework`` and of the
  profiler plug-in log through absl before anything reads the variable, twice:
  "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
  "I... port.cc] oneDNN custom operations are on ..." and "I... cudart_stub.cc] Could not find
  cuda drivers ...". (absl's C++ minimum log level has no environment variable; GLOG_minloglevel
  and ABSL_MIN_LOG_LEVEL change nothing: measured.)
* LiteRT logs "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." with its own logger when a
  process builds its first interpreter, and the converter prints "fully_quantize: 0, ...".

``filtered_stderr()`` holds what the process writes to file descriptor 2 during such a moment and
writes it back afterwards without the INFO (and, at level 2 and up, WARNING) lines of those
libraries. Everything else comes back as written (errors always), and with the variable unset or 0
nothing is held. ``filter_tensorflow_import()`` applies it to the one ``import tensorflow`` of a
process, whichever module makes it; ``retrieval/__init__.py`` installs that, so launchers, Beam SDK
workers and Spark Python workers (which inherit the variable) all behave alike.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import os
import re
import sys
import threading
from collections.abc import Iterator

INFO, WARNING = 0, 1

# Severity of the native lines held back; anything not matched here is always written back.
_LINES = [
    # absl's notice that precedes its pre-initialisation lines (says where the log goes).
    (re.compile(rb"WARNING: All log messages before absl::InitializeLog\(\) is called"), INFO),
    # absl / TensorFlow C++ lines: I0000 00:00:1796513722.748001    3797 port.cc:153] ...
    (re.compile(rb"I\d{4} [\d:.]+ +\d+ [^ \]]+:\d+\] "), INFO),
    (re.compile(rb"W\d{4} [\d:.]+ +\d+ [^ \]]+:\d+\] "), WARNING),
    # second line of cpu_feature_guard.cc's "This TensorFlow binary is optimized ..." notice
    (re.compile(rb"To enable the following instructions: .* rebuild TensorFlow "), INFO),
    # LiteRT's own logger
    (re.compile(rb"INFO: "), INFO),
    (re.compile(rb"WARNING: "), WARNING),
    # the converter's quantizer settings
    (re.compile(rb"fully_quantize: \d+, inference_type: "), INFO),
]

_lock = threading.Lock()
_depth = 0
_saved_fd: int | None = None
_held = None


def min_log_level() -> int:
    """``TF_CPP_MIN_LOG_LEVEL`` as a number (0 when unset or not a number)."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def is_hidden(line: bytes, level: int) -> bool:
    """Whether ``level`` hides this native log line (never an error, never any other line)."""
    for pattern, severity in _LINES:
        if pattern.match(line):
            return severity < level
    return False


@contextlib.contextmanager
def filtered_stderr() -> Iterator[None]:
    """Hold file descriptor 2 while the block runs, then write back what TF_CPP_MIN_LOG_LEVEL
    does not hide. Threads may overlap: the first one in starts holding, the last one out writes
    back. A no-op when the level is 0."""
    if min_log_level() <= 0:
        yield
        return
    _start()
    try:
        yield
    finally:
        _finish()


def _start() -> None:
    global _depth, _saved_fd, _held
    with _lock:
        _depth += 1
        if _depth > 1:
            return
        import tempfile

        _flush_python_stderr()
        try:
            saved = os.dup(2)
        except OSError:  # no stderr to hold (a daemon's closed fd 2): nothing to filter either
            return
        _held = tempfile.TemporaryFile()  # noqa: SIM115 (closed by _finish)
        _saved_fd = saved
        os.dup2(_held.fileno(), 2)


def _finish() -> None:
    global _depth, _saved_fd, _held
    with _lock:
        _depth -= 1
        if _depth > 0 or _saved_fd is None or _held is None:
            return
        _flush_python_stderr()
        os.dup2(_saved_fd, 2)
        os.close(_saved_fd)
        held, _held, _saved_fd = _held, None, None
    with held:
        held.seek(0)
        level = min_log_level()
        kept = b"".join(
            line for line in held.read().splitlines(keepends=True) if not is_hidden(line, level)
        )
    while kept:
        kept = kept[os.write(2, kept) :]


def _flush_python_stderr() -> None:
    with contextlib.suppress(Exception):
        sys.stderr.flush()


class _FilteredImport(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` like the finders after it and runs its import in ``filtered_stderr``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _FilteredLoader(spec.loader)
                return spec
        return None


class _FilteredLoader(importlib.abc.Loader):
    def __init__(self, loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        with filtered_stderr():
            self._loader.exec_module(module)

    def __getattr__(self, name: str):  # get_data, is_package, resource readers: the real loader's
        return getattr(self._loader, name)


def filter_tensorflow_import() -> None:
    """Run this process's ``import tensorflow`` (whoever makes it) inside ``filtered_stderr``.
    Idempotent; nothing to do once TensorFlow is imported."""
    if "tensorflow" in sys.modules:
        return
    if not any(isinstance(f, _FilteredImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _FilteredImport("tensorflow"))
