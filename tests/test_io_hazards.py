"""Outages, full disks, special files and decode memory (issue 16, defects 1, 5, 8, 9 and 10).

- An ``http://`` image behind a refused connection or a 503 is retried inside the run, then
  becomes a transient ``read_failed`` row that the next run extracts again (a real local HTTP
  server; a closed port for "refused"); a real 404 stays ``missing``.
- A full disk (ENOSPC, simulated under the output folder) is not retried, ends ``retrieval
  extract`` with one line and exit status 2, and leaves no ``*.tmp-*`` file.
- A FIFO, a link to a FIFO or a device, and a symbolic link loop in a local corpus do not hang
  or loop the job: final error rows (``not_a_file``, ``symlink_loop``), kept by a re-run.
- A large progressive JPEG does not take the decoder's memory past a bound (measured as the
  peak RSS of a fresh process: libjpeg's buffers are invisible to tracemalloc).
"""

from __future__ import annotations

import builtins
import csv
import errno
import io
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image
from support import free_port, pattern_images, save_tiny_saved_model

from pipelines import cli, stages
from pipelines.config import RunConfig
from retrieval import storage
from retrieval.descriptors.gem import GeMConfig
from retrieval.extraction import load_image
from retrieval.image_refs import ImageRef
from retrieval.images import DecodeLimits, ImageError, decode_image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny_saved_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def config(model) -> RunConfig:
    return RunConfig(
        runner="local",
        shard_size=16,
        gem=GeMConfig(backbone=f"savedmodel:{model}", image_size=64),
    )


def model_flags(model: Path) -> list[str]:
    return ["--backbone", f"savedmodel:{model}", "--image-size", "64", "--runner", "local"]


# --- outages of an http:// corpus ---------------------------------------------------------------


class ImageServer:
    """A local HTTP server of ``files`` (path -> bytes). ``answers[path]`` lists the status codes
    of the next requests to that path (HEAD or GET), a 200 once it is empty; ``down`` paths
    always answer 503. ``requests`` counts requests by path."""

    def __init__(self, files: dict[str, bytes], port: int = 0) -> None:
        self.files = files
        self.answers: dict[str, list[int]] = {}
        self.down: set[str] = set()
        self.requests: Counter[str] = Counter()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                status, body = server.answer(self.path)
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(body)

            do_HEAD = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, path: str) -> tuple[int, bytes]:
        with self.lock:
            self.requests[path] += 1
            if path in self.down:
                return 503, b"down for maintenance"
            queued = self.answers.get(path)
            status = queued.pop(0) if queued else 200
        if status != 200:
            return status, b"try again later"
        if path not in self.files:
            return 404, b"no such image"
        return 200, self.files[path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def write_manifest(path: Path, uris: dict[str, str]) -> str:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "uri"])
        writer.writerows(sorted(uris.items()))
    return str(path)


def test_http_outages_are_retried_and_rerun(tmp_path, config, monkeypatch):
    """Refused connections and 503s are retried inside the run; what still fails is a
    transient row that the next run, with the servers back, indexes. A 404 stays missing."""
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)  # backoff is not under test
    images = list(pattern_images(5).values())
    files = {f"/img{i}.png": data for i, data in enumerate(images)}
    server = ImageServer(files)
    closed_port = free_port()  # nothing listens there: connections are refused
    server.answers["/img1.png"] = [503, 503]  # a short outage: retried within the run
    server.answers["/img2.png"] = [429]  # throttled once
    server.down = {"/img3.png"}  # down for the whole first run
    uris = {
        "ok": f"{server.url}/img0.png",
        "flaky": f"{server.url}/img1.png",
        "throttled": f"{server.url}/img2.png",
        "down": f"{server.url}/img3.png",
        "refused": f"http://127.0.0.1:{closed_port}/img4.png",
        "gone": f"{server.url}/nothing-here.png",
    }
    manifest = write_manifest(tmp_path / "list.csv", uris)
    out = str(tmp_path / "desc")
    back = None
    try:
        first = stages.extract(manifest, out, config)
        assert first["failures_by_kind"] == {"read_failed": 2, "missing": 1}, first
        assert first["indexed"] == 3
        assert server.requests["/img3.png"] > 1  # retried, not given up after one answer
        rows = {r.id: r for r in load_failures(out)}
        assert {rows["down"].error_kind, rows["refused"].error_kind} == {"read_failed"}
        assert rows["gone"].error_kind == "missing"

        server.down = set()  # the server is back ...
        back = ImageServer({"/img4.png": images[4]}, port=closed_port)  # ... and the other one
        again = stages.extract(manifest, out, config)
    finally:
        server.close()
        if back is not None:
            back.close()
    assert again["shards_retried"] == 1
    assert (again["indexed"], again["failures_by_kind"]) == (5, {"missing": 1})


def load_failures(out: str):
    from retrieval.extraction import failures

    return failures(out)


def test_http_errors_are_classified_by_their_cause(tmp_path, monkeypatch):
    """fsspec raises FileNotFoundError for every failed HTTP request: the cause decides."""
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    server = ImageServer({"/a.png": b"x"})
    server.down = {"/b.png"}
    try:
        with pytest.raises(FileNotFoundError) as outage:
            storage.read_bytes(f"{server.url}/b.png")
        with pytest.raises(FileNotFoundError) as missing:
            storage.read_bytes(f"{server.url}/c.png")
        with pytest.raises(FileNotFoundError) as refused:
            storage.read_bytes(f"http://127.0.0.1:{free_port()}/d.png")
    finally:
        server.close()
    assert storage.is_transient(outage.value) and storage.is_transient(refused.value)
    assert not storage.is_transient(missing.value)


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), False),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), False),
        (OSError(errno.EROFS, "Read-only file system"), False),
        (OSError(errno.ELOOP, "Too many levels of symbolic links"), False),
        (OSError(errno.EIO, "EIO from s3fs"), True),
    ],
)
def test_final_os_errors_are_not_transient(error, transient):
    assert storage.is_transient(error) is transient


# --- FIFOs, devices and symbolic link loops in a local corpus ------------------------------------


def run_extract(folder: Path, out: Path, model: Path) -> dict:
    """`retrieval extract` in a child process: a hang (the FIFO) is a failure, not a stuck
    test session, and the child is killed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = ["extract", "--input", str(folder), "--output", str(out), *model_flags(model)]
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pipelines.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("retrieval extract hung on a special file")
    assert done.returncode == 0, done.stderr
    return json.loads((out / "summary.json").read_text())


def test_special_files_are_final_error_rows(tmp_path, model):
    folder = tmp_path / "corpus"
    folder.mkdir()
    photo = next(iter(pattern_images(1).values()))
    (folder / "photo.jpg").write_bytes(photo)
    os.symlink(folder / "photo.jpg", folder / "link to photo.jpg")  # read: a regular file
    os.mkfifo(folder / "fifo.jpg")  # opening it waits for a writer that never comes
    os.symlink(folder / "fifo.jpg", folder / "link to fifo.jpg")
    os.symlink("/dev/zero", folder / "zero.jpg")  # endless bytes
    os.symlink("loop.jpg", folder / "loop.jpg")  # ELOOP
    out = tmp_path / "desc"

    first = run_extract(folder, out, model)
    assert (first["inputs"], first["indexed"]) == (6, 2)
    assert first["failures_by_kind"] == {"not_a_file": 3, "symlink_loop": 1}

    again = run_extract(folder, out, model)  # final rows: the shard is not extracted again
    assert again["shards_retried"] == 0 and again["shards_skipped"] == again["shards"]
    assert again["failures_by_kind"] == first["failures_by_kind"]


def test_not_a_file_rows_name_the_kind(tmp_path):
    # (The FIFO itself is tested above, in a child process: read here, it would hang the session.)
    os.symlink("/dev/null", tmp_path / "null.jpg")
    os.symlink("loop.jpg", tmp_path / "loop.jpg")
    limits = DecodeLimits()
    null = load_image(ImageRef("n", str(tmp_path / "null.jpg")), max_side=64, limits=limits)
    loop = load_image(ImageRef("l", str(tmp_path / "loop.jpg")), max_side=64, limits=limits)
    assert (null.error_kind, loop.error_kind) == ("not_a_file", "symlink_loop")
    assert "a character device" in null.message


# --- a full disk --------------------------------------------------------------------------------


class FullDisk:
    """``open`` for writing under ``folder`` (files whose name contains ``name_part``) gives a
    file whose writes fail with ENOSPC, as on a full disk; everything else is the real ``open``.
    ``attempts`` counts the files opened that way."""

    def __init__(self, folder: Path, name_part: str) -> None:
        self.folder = str(folder)
        self.name_part = name_part
        self.attempts = 0
        self.real_open = builtins.open

    def __call__(self, file, mode="r", *args, **kwargs):
        handle = self.real_open(file, mode, *args, **kwargs)
        path = os.fspath(file) if isinstance(file, str | os.PathLike) else ""
        full = path.startswith(self.folder) and self.name_part in os.path.basename(path)
        if full and any(flag in mode for flag in "wax+"):
            self.attempts += 1
            return _NoSpace(handle)
        return handle


class _NoSpace(io.RawIOBase):
    def __init__(self, handle) -> None:
        self.handle = handle

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.handle.fileno()

    def close(self) -> None:
        self.handle.close()
        super().close()


@pytest.mark.parametrize("full_at", ["plan", "shards"])
def test_disk_full_ends_in_one_line(full_at, tmp_path, model, monkeypatch, capsys, caplog):
    """The disk fills while the plan is written, or later while shards are written: no retry,
    one line naming the file, exit status 2, no traceback, no temporary file left."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name, data in pattern_images(4).items():
        (folder / name).write_bytes(data)
    out = tmp_path / "out"
    disk = FullDisk(out, "" if full_at == "plan" else "part-")
    monkeypatch.setattr(builtins, "open", disk)
    with caplog.at_level("WARNING"):
        code = cli.main(
            ["extract", "--input", str(folder), "--output", str(out), *model_flags(model)]
        )
    monkeypatch.undo()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert code == 2, err
    assert len(errors) == 1 and errors[0].startswith("retrieval: error: "), err
    assert "no space left on device" in errors[0] and str(out) in errors[0]
    assert "Traceback" not in err
    assert disk.attempts == 1 and "retry" not in caplog.text  # final: not retried
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_failed_index_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    import faiss

    from retrieval.index import faiss_io

    def write_half(index, path):  # faiss's writer, interrupted by a full disk
        Path(path).write_bytes(b"half an index")
        raise RuntimeError("Error in faiss::FileIOWriter: No space left on device")

    monkeypatch.setattr(faiss_io.faiss, "write_index", write_half)
    with pytest.raises(RuntimeError, match="No space"):
        faiss_io.write_index_file(str(tmp_path / "index.faiss"), faiss.IndexFlatL2(4))
    assert list(tmp_path.iterdir()) == []


# --- decode memory -------------------------------------------------------------------------------

# Peak RSS of a fresh process around one decode (libjpeg allocates outside Python's heap).
DECODE_PEAK = """
import json, sys
from retrieval.images import DecodeLimits, ImageError, decode_image

def peak_kb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

data = open(sys.argv[1], "rb").read()
before = peak_kb()
try:
    decode_image(data, max_side=362)
    outcome = "decoded"
except ImageError as exc:
    outcome = exc.kind
print(json.dumps({"outcome": outcome, "increase_kb": peak_kb() - before}))
"""


def decode_peak(path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", DECODE_PEAK, str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def progressive_jpeg(path: Path, side: int, **options) -> Path:
    """A flat progressive JPEG: a few hundred KB on disk, but libjpeg buffers every DCT
    coefficient of a progressive image at full size (2 bytes per pixel and component)."""
    Image.new("RGB", (side, side), (40, 160, 90)).save(
        path, "JPEG", progressive=True, subsampling=0, quality=90, **options
    )
    return path


def test_large_progressive_jpeg_decodes_in_bounded_memory(tmp_path):
    # 6000 x 6000 x 3 components x 2 bytes: a 216 MB coefficient buffer; the draft scale (the
    # decode at 1/8) does not shrink it. Measured before the bound: +210 MB.
    measured = decode_peak(progressive_jpeg(tmp_path / "big.jpg", 6000))
    assert measured["increase_kb"] < 64 * 1024, measured
    assert measured["outcome"] == "too_large"


def test_progressive_jpeg_limit(tmp_path):
    small = progressive_jpeg(tmp_path / "small.jpg", 800).read_bytes()
    assert decode_image(small, max_side=362).pixels.shape == (362, 362, 3)  # still decoded
    with pytest.raises(ImageError, match="coefficient buffer") as info:
        decode_image(small, max_side=362, limits=DecodeLimits(max_jpeg_buffer_bytes=3_000_000))
    assert info.value.kind == "too_large"  # 800 x 800 x 3 x 2 = 3.84 MB
