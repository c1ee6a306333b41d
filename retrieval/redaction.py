"""Keeping secrets out of everything the project writes: files, logs, error messages, tracebacks.

Where secrets can hide, and what happens to each:

- **Credentials in a URI** (``https://user:password@host/...``, ``s3://KEY:SECRET@bucket/...``)
  are refused (:func:`has_credentials`; ``retrieval.storage`` and the manifest listing check
  it), like Hadoop's S3A refuses them: an account credential copied into every row of a plan,
  a shard and a log is a leak waiting to happen, and no store's client here reads it from the
  URI anyway (s3fs and gcsfs would take it for part of the bucket's name). Credentials come
  from the environment: the cloud clients' own (``AWS_*``, ``GOOGLE_APPLICATION_CREDENTIALS``,
  profiles, workload identity) and, for ``http(s)://``, fsspec's configuration (e.g.
  ``FSSPEC_HTTP='{"client_kwargs": {"headers": {"Authorization": "Basic ..."}}}'``, or a file
  in ``~/.config/fsspec/``), which every worker process inherits.
- **Signatures in a URI** (a signed URL: ``X-Amz-Signature=``, ``X-Goog-Signature=``, SAS
  ``sig=``, ...) cannot move to the environment: the signature *is* the permission to read that
  one object. The listing records such a URI masked (:func:`redact`: ``...&sig=***``) and keeps
  the real one **sealed** (:func:`seal`): encrypted (Fernet: AES-128-CBC + HMAC-SHA256) with a
  key that the launcher makes at random when it starts and that exists only in memory. The key
  travels to the workers with the work itself (the pickled task: in memory for the local, Beam
  and Spark runners; on Dataflow, inside the job's graph, where Beam's own credential options
  travel too), so a worker opens the sealed URI, reads the image, and records the masked URI.
  What reaches a disk (the plan, spill files of the listing's sort, a re-index's batch manifest)
  is the masked URI and the sealed token: without the key, which is never written, the token
  is noise, and it is useless once the run is over (a re-run seals again with its own key).
- **Secret-looking options** (``--aws_secret_access_key=...``, ``--service_account_key_file
  PATH``): recorded masked (:func:`redact_args`), and their values are registered
  (:func:`mask_option_values`) so that :func:`redact` masks them wherever a library repeats them
  out of context (Beam's "Discarding unparseable args" and "Unparseable argument: VALUE").
- **Logs and tracebacks**: :class:`RedactingFilter` masks all of the above in every record a
  handler it is attached to emits (the command line attaches it to its handlers, Beam's options
  logger carries it wherever ``pipelines.beam`` is imported), exception text included.

Everything the project writes for people to read goes through :func:`redact` (or
:func:`redact_args` for option lists) once, where the value is recorded.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"

# scheme://user:password@host -> scheme://***@host (also a bare user or token before '@').
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/\s@?#]+)@")
_URI_USERINFO = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s@?#]+@")
# Query parameters that sign or authorise a request.
_SECRET_PARAM = re.compile(
    r"(?P<key>[?&;](?:x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|"
    r"x-goog-credential|signature|sig|token|access_token|id_token|api[_-]?key|key|"
    r"awsaccesskeyid|password|secret|client_secret|code)=)(?P<value>[^&#\s\"']*)",
    re.IGNORECASE,
)
# Option or setting names whose values are secrets.
_SECRET_NAME = re.compile(
    r"(secret|password|passwd|token|credential|api[_-]?key|access[_-]?key|private[_-]?key|"
    r"\bkey\b|_key\b|signature|auth)",
    re.IGNORECASE,
)
# ``--name=value`` in free text (a log line quoting a command line) with a secret-looking name.
_SECRET_OPTION = re.compile(r"(?P<name>--?[A-Za-z0-9_.-]+)=(?P<value>[^\s'\",\]\)]+)")
# Literal values to mask wherever they appear (see mask_option_values); short ones would mask
# ordinary words ("true", "1").
MIN_MASKED_VALUE = 6
_masked_values: set[str] = set()


def redact(text: str) -> str:
    """``text`` with URI credentials, signing query parameters, secret-looking ``--option=``
    values and registered secret values replaced by ``***``."""
    if not text or ("=" not in text and "@" not in text and not _masked_values):
        return text  # the usual case (a plain path or URI), ~10x cheaper than the regexes
    text = _USERINFO.sub(lambda m: m["scheme"] + MASK + "@", text)
    text = _SECRET_PARAM.sub(lambda m: m["key"] + MASK, text)
    text = _SECRET_OPTION.sub(
        lambda m: f"{m['name']}={MASK}" if is_secret_name(m["name"]) else m[0], text
    )
    for value in tuple(_masked_values):
        if value in text:
            text = text.replace(value, MASK)
    return text


def has_credentials(uri: str) -> bool:
    """Whether ``uri`` carries user info (``scheme://user:password@host``, a token as user)."""
    return bool(_URI_USERINFO.match(uri))


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def redact_args(args: Iterable[str]) -> list[str]:
    """Command-line options with secret-looking values masked.

    ``--aws_secret_access_key=abc`` -> ``--aws_secret_access_key=***``; in the two-token form
    (``--service_account_key_file PATH``... any secret-named flag) the value after it is masked.
    """
    out: list[str] = []
    mask_next = False
    for arg in args:
        if mask_next and not arg.startswith("--"):
            out.append(MASK)
            mask_next = False
            continue
        mask_next = False
        if arg.startswith("-"):
            name, eq, _ = arg.partition("=")
            if is_secret_name(name):
                if eq:
                    out.append(f"{name}={MASK}")
                else:
                    out.append(arg)
                    mask_next = True
                continue
        out.append(redact(arg))
    return out


def mask_option_values(args: Iterable[str]) -> None:
    """Register the values of the secret-named options in ``args`` (both ``--name=value`` and
    ``--name value``): :func:`redact` then masks them in any text, e.g. a library's log line
    that quotes one value alone."""
    previous_secret = False
    for arg in args:
        value = None
        if previous_secret and not arg.startswith("--"):
            value = arg
        elif arg.startswith("-") and "=" in arg:
            name, _, given = arg.partition("=")
            value = given if is_secret_name(name) else None
        previous_secret = arg.startswith("-") and "=" not in arg and is_secret_name(arg)
        if value is not None and len(value) >= MIN_MASKED_VALUE:
            _masked_values.add(value)


# --- logs --------------------------------------------------------------------------------------


class RedactingFilter(logging.Filter):
    """Masks secrets (:func:`redact`) in a record's message, its arguments (option lists with
    :func:`redact_args`, mappings by key name) and its exception text. Attach it to handlers
    (it then sees every record they emit, whichever logger made it) or to one logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            args = record.args
            if isinstance(args, Mapping | tuple):
                args = _redacted(args) if isinstance(args, Mapping) else tuple(map(_redacted, args))
            record.msg = redact(str(record.msg) % args if args else str(record.msg))
            record.args = None
        except (TypeError, ValueError):  # a malformed record: mask what it holds, as it is
            record.msg = redact(str(record.msg))
            record.args = tuple(_redacted(a) for a in record.args or ()) or None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return redact_args(value)
    if isinstance(value, Mapping):
        return {k: MASK if is_secret_name(str(k)) else _redacted(v) for k, v in value.items()}
    return value


def redact_logger(name: str) -> None:
    """Attach a :class:`RedactingFilter` to the logger ``name`` (once)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, RedactingFilter) for f in logger.filters):
        logger.addFilter(RedactingFilter())


def redact_handlers() -> None:
    """Attach a :class:`RedactingFilter` to every handler of the root logger (once each): what
    they emit is masked, whichever library logged it."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


# --- sealed URIs -------------------------------------------------------------------------------


class SealError(ValueError):
    """A sealed URI that no key of this process opens (sealed by another run)."""


_keys_lock = threading.Lock()
_own_key: bytes | None = None
_keys: list[bytes] = []  # the keys this process opens tokens with: its own, its launcher's


def sealing_key() -> bytes:
    """This process's key, made at random on first use and held in memory only; a runner
    hands it to its workers with the task (:func:`accept_sealing_key`)."""
    global _own_key
    with _keys_lock:
        if _own_key is None:
            from cryptography.fernet import Fernet

            _own_key = Fernet.generate_key()
            _keys.append(_own_key)
        return _own_key


def accept_sealing_key(key: bytes) -> None:
    """Open tokens sealed with ``key`` too (a worker, given its launcher's key)."""
    with _keys_lock:
        if key not in _keys:
            _keys.append(key)


def seal(uri: str) -> str:
    """``uri`` encrypted with this process's key (an ASCII token)."""
    from cryptography.fernet import Fernet

    return Fernet(sealing_key()).encrypt(uri.encode()).decode("ascii")


def unseal(token: str) -> str:
    """The URI sealed in ``token``; :class:`SealError` when no key of this process opens it."""
    from cryptography.fernet import Fernet, InvalidToken, MultiFernet

    with _keys_lock:
        keys = list(_keys)
    if keys:
        try:
            return MultiFernet([Fernet(k) for k in keys]).decrypt(token.encode()).decode()
        except InvalidToken:
            pass
    raise SealError(
        "a sealed URI that this run cannot open (sealed by another run, whose key is gone): "
        "run the command again to list the input anew"
    )


def seal_if_secret(uri: str) -> tuple[str, str | None]:
    """(``uri`` as recorded, with its secrets masked; the real ``uri`` sealed, or None when
    nothing was masked)."""
    recorded = redact(uri)
    return recorded, (seal(uri) if recorded != uri else None)
