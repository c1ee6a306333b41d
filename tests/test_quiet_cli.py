"""A quiet command line: `retrieval extract` prints its progress and result, not the start-up lines
of TensorFlow, LiteRT and absl (in the launcher or in Beam's worker processes); --verbose brings
them back.

The real console entry runs in a subprocess on a few generated images, without the
TF_CPP_MIN_LOG_LEVEL the test session (conftest.py) and the user's shell may set, and with a model
cache of this module: the first run finds it cold, so it imports TensorFlow and converts the model,
which is the noisiest run there is.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import pattern_images

from retrieval import native_logs

REPO = Path(__file__).resolve().parents[1]

# What used to reach the terminal (a CPU-only machine, TF 2.21, LiteRT 2.3), and any other line in
# absl's C++ format ("I0000 00:00:1796513722.748001    3797 port.cc:153] ...").
NOISE = [
    "cuInit",
    "oneDNN",
    "absl",
    "TensorFlow binary is optimized",
    "WARNING: All log messages",
    "cuda drivers",
    "XNNPACK delegate",
    "fully_quantize",
    "Warning:",
]
ABSL_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\] ", re.MULTILINE)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("quiet-images")
    for name, data in pattern_images(4).items():
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def child_env(tmp_path_factory) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "PYTHONPATH")}
    env["PYTHONPATH"] = str(REPO)
    env["RETRIEVAL_MODEL_CACHE"] = str(tmp_path_factory.mktemp("quiet-model-cache"))
    return env


def retrieval(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done


def noise_in(stderr: str) -> list[str]:
    lines = [line for line in stderr.splitlines() if any(n in line for n in NOISE)]
    return lines + ABSL_LINE.findall(stderr)


def test_extract_is_quiet_on_a_cold_model_cache(images, child_env, tmp_path):
    done = retrieval(
        "extract", "--input", str(images), "--output", str(tmp_path / "d"), "--runner", "local",
        env=child_env,
    )  # fmt: skip
    assert "4 inputs = 4 indexed + 0 failed" in done.stdout
    assert noise_in(done.stderr) == []
    assert "extract: 100%" in done.stderr  # the progress bar is still there


def test_beam_workers_are_quiet(images, child_env, tmp_path):
    done = retrieval(
        "extract", "--input", str(images), "--output", str(tmp_path / "d"),
        "--runner", "beam", "--workers", "2",
        env=child_env,
    )  # fmt: skip
    assert "4 inputs = 4 indexed + 0 failed" in done.stdout
    assert noise_in(done.stderr) == []


def test_verbose_brings_the_logs_back(images, child_env, tmp_path):
    # Another runtime than the default: a cold cache again, so TensorFlow is imported.
    done = retrieval(
        "--verbose", "extract", "--input", str(images), "--output", str(tmp_path / "d"),
        "--runner", "local", "--runtime", "tflite-fp32",
        env=child_env,
    )  # fmt: skip
    assert ABSL_LINE.search(done.stderr), done.stderr  # TensorFlow's C++ log
    assert "Created TensorFlow Lite XNNPACK delegate for CPU" in done.stderr  # LiteRT's
    assert "INFO retrieval.extraction" in done.stderr  # and our own progress details


# --- the pieces, in-process ------------------------------------------------------------------


def test_the_users_own_level_wins(monkeypatch):
    from pipelines import cli

    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    monkeypatch.setenv("PYTHONWARNINGS", "default")
    cli._quiet_native_logs(verbose=True)
    assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ
    cli._quiet_native_logs(verbose=False)
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"
    # the user's PYTHONWARNINGS comes last, so it wins; a second call adds nothing
    cli._quiet_native_logs(verbose=False)
    assert os.environ["PYTHONWARNINGS"].split(",") == [*cli.QUIET_WARNINGS, "default"]
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    cli._quiet_native_logs(verbose=False)
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"


@pytest.mark.parametrize(
    ("line", "hidden_from"),
    [
        ("WARNING: All log messages before absl::InitializeLog() is called are written to", 1),
        ("I0000 00:00:1796513722.748001    3797 port.cc:153] oneDNN custom operations are on.", 1),
        ("W0000 00:00:1796514595.478469   16923 tf_tfl_flatbuffer_helpers.cc:364] Ignored x.", 2),
        ("E0000 00:00:1796513727.092572    3797 cuda_platform.cc:52] failed call to cuInit", None),
        ("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.", 1),
        ("fully_quantize: 0, inference_type: 6, input_inference_type: FLOAT32", 1),
        ("ERROR: Didn't find op for builtin opcode 'CONV_2D'", None),
        ("Traceback (most recent call last):", None),
    ],
)
def test_which_native_lines_a_level_hides(line: str, hidden_from: int | None):
    for level in range(4):
        expected = hidden_from is not None and level >= hidden_from
        assert native_logs.is_hidden(line.encode() + b"\n", level) is expected, level


def test_filtered_stderr_writes_back_all_but_the_hidden_lines(monkeypatch, capfd):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    with native_logs.filtered_stderr():
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
        os.write(2, b"something else\n")
        with native_logs.filtered_stderr():  # nested: the outer block writes back
            os.write(2, b"I0000 00:00:1.5    1 port.cc:153] oneDNN custom operations are on.\n")
        os.write(2, b"E0000 00:00:1.5    1 x.cc:1] an error\n")
    assert capfd.readouterr().err == "something else\nE0000 00:00:1.5    1 x.cc:1] an error\n"
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    with native_logs.filtered_stderr():
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
    assert capfd.readouterr().err == "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"
