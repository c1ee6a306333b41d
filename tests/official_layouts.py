"""Small archives in each benchmark's official layout, and a local HTTP server with Range
support to serve them (imported by the dataset tests as ``from official_layouts import ...``).

The layouts follow the published archives: Oxford ``oxbuild_images-v1.tgz`` (flat JPEGs) and
``gt_files_170407.tgz`` (flat ``<landmark>_<n>_{good,ok,junk,query}.txt``, query lines
``oxc1_<image> x1 y1 x2 y2``); Paris ``paris_1-v1.tgz`` (``paris/<landmark>/paris_*.jpg``) and
``paris_120310.tgz``; revisitop ``gnd_<set>.pkl`` (a dict imlist / qimlist / gnd with
bbx, easy, hard, junk index lists); Holidays ``jpg1.tar.gz`` (``jpg/NNNNNN.jpg``); UKBench
``ukbench.zip`` (``full/ukbenchNNNNN.jpg``); GLDv2 CSVs.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg_bytes(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def tar_bytes(members: dict[str, bytes], gz: bool = True) -> bytes:
    """A tar(.gz) of ``members``, byte-identical on every call (gzip mtime 0)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return gzip.compress(buffer.getvalue(), mtime=0) if gz else buffer.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


# Two landmarks, 2 queries each; images per landmark: 0..5. Query of landmark L number n is
# image L_00000n with a box; good = images 0..2, ok = 3, junk = 4; image 5 is a distractor.
OXFORD_LANDMARKS = ("all_souls", "radcliffe_camera")


def oxford_files() -> dict[str, bytes]:
    images = {
        f"{lm}_{i:06d}.jpg": jpeg_bytes(100 * j + i)
        for j, lm in enumerate(OXFORD_LANDMARKS)
        for i in range(6)
    }
    gt: dict[str, bytes] = {}
    for lm in OXFORD_LANDMARKS:
        for n in (1, 2):
            query = f"{lm}_{n:06d}"
            gt[f"{lm}_{n}_query.txt"] = f"oxc1_{query} 4.5 3.2 50.7 40.0\n".encode()
            gt[f"{lm}_{n}_good.txt"] = "".join(f"{lm}_{i:06d}\n" for i in range(3)).encode()
            gt[f"{lm}_{n}_ok.txt"] = f"{lm}_000003\n".encode()
            gt[f"{lm}_{n}_junk.txt"] = f"{lm}_000004\n".encode()
    return {
        "oxbuild_images-v1.tgz": tar_bytes(images),
        "gt_files_170407.tgz": tar_bytes(gt),
    }


def paris_files() -> dict[str, bytes]:
    lms = ("defense", "eiffel")
    images = {
        f"paris/{lm}/paris_{lm}_{i:06d}.jpg": jpeg_bytes(300 + 10 * j + i)
        for j, lm in enumerate(lms)
        for i in range(4)
    }
    gt: dict[str, bytes] = {}
    for lm in lms:
        gt[f"{lm}_1_query.txt"] = f"paris_{lm}_000000 1 2 30 40\n".encode()
        gt[f"{lm}_1_good.txt"] = f"paris_{lm}_000000\nparis_{lm}_000001\n".encode()
        gt[f"{lm}_1_ok.txt"] = f"paris_{lm}_000002\n".encode()
        gt[f"{lm}_1_junk.txt"] = b""
    half = len(images) // 2
    items = list(images.items())
    return {
        "paris_1-v1.tgz": tar_bytes(dict(items[:half])),
        "paris_2-v1.tgz": tar_bytes(dict(items[half:])),
        "paris_120310.tgz": tar_bytes(gt),
    }


def revisitop_gnd() -> dict:
    """A gnd dict as revisitop ships it: imlist without the query images, indices into imlist
    (a mix of lists and NumPy arrays, as copies in the wild hold both)."""
    imlist = [f"{lm}_{i:06d}" for lm in OXFORD_LANDMARKS for i in (0, 3, 4, 5)]
    qimlist = [f"{lm}_{n:06d}" for lm in OXFORD_LANDMARKS for n in (1, 2)]
    gnd = []
    for j, _ in enumerate(OXFORD_LANDMARKS):
        base = 4 * j
        for n in (1, 2):
            gnd.append(
                {
                    "bbx": np.array([4.5, 3.2, 50.7 - n, 40.0]),
                    "easy": [base + 0],
                    "hard": np.array([base + 1], dtype=np.int64),
                    "junk": [base + 2],
                }
            )
    return {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}


def roxford_files() -> dict[str, bytes]:
    files = oxford_files()
    del files["gt_files_170407.tgz"]
    files["gnd_roxford5k.pkl"] = pickle.dumps(revisitop_gnd(), protocol=4)
    return files


def holidays_files() -> dict[str, bytes]:
    first = {
        f"jpg/{g}{i:02d}.jpg": jpeg_bytes(int(g) + i) for g in ("1000", "1001") for i in (0, 1)
    }
    second = {f"jpg/1002{i:02d}.jpg": jpeg_bytes(2000 + i) for i in range(3)}
    return {"jpg1.tar.gz": tar_bytes(first), "jpg2.tar.gz": tar_bytes(second)}


def ukbench_files() -> dict[str, bytes]:
    members = {f"full/ukbench{i:05d}.jpg": jpeg_bytes(500 + i) for i in range(8)}
    members["index.html"] = b"<html></html>"
    return {"ukbench.zip": zip_bytes(members)}


def gldv2_files() -> dict[str, bytes]:
    return {
        "index.csv": b"id\naaaa000000000001\naaaa000000000002\naaaa000000000003\n",
        "test.csv": b"id\nbbbb000000000001\nbbbb000000000002\nbbbb000000000003\n",
        "index_image_to_landmark.csv": b"id,landmark_id\naaaa000000000001,7\n"
        b"aaaa000000000002,7\naaaa000000000003,9\n",
        "retrieval_solution_v2.1.csv": b"id,images,Usage\n"
        b"bbbb000000000001,aaaa000000000001 aaaa000000000002,Public\n"
        b"bbbb000000000002,aaaa000000000003,Private\n"
        b"bbbb000000000003,None,Ignored\n",
    }


# --------------------------------------------------------------------------- the server


class ServedFiles:
    """What the server serves, and what it saw: request paths with their Range headers.
    ``cut_after`` makes the first full (non-Range) answer of a file stop after that many
    bytes while announcing the whole length: an interrupted transfer."""

    def __init__(self, files: dict[str, bytes], cut_after: int | None = None) -> None:
        self.files = files
        self.cut_after = cut_after
        self.requests: list[tuple[str, str | None]] = []
        self._cut: set[str] = set()


def _handler(served: ServedFiles) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            name = self.path.lstrip("/")
            range_header = self.headers.get("Range")
            served.requests.append((name, range_header))
            data = served.files.get(name)
            if data is None:
                self.send_error(404)
                return
            start = 0
            if range_header and range_header.startswith("bytes="):
                start = int(range_header.removeprefix("bytes=").split("-")[0])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if served.cut_after is not None and not range_header and name not in served._cut:
                served._cut.add(name)
                self.wfile.write(body[: served.cut_after])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


@contextmanager
def http_server(served: ServedFiles) -> Iterator[str]:
    """Serve ``served`` on 127.0.0.1 (a free port) in a thread; yields the base URL. Binding
    failures propagate: a test that needs the server fails when it cannot start."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(served))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def write_files(files: dict[str, bytes], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
