"""Helpers shared by the test modules (imported as ``from support import ...``; pytest puts tests/
on ``sys.path`` because tests/ has no ``__init__.py``): local servers run as subprocesses, and a
tiny SavedModel backbone, and descriptor shards of random vectors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from retrieval import plan
from retrieval.corpus import ImageRef, ShardSpec
from retrieval.shards import descriptor_shards
from retrieval.shards.descriptor_shards import DescriptorRow, ErrorRow

TINY_CHANNELS = 4


# --- benchmarks ----------------------------------------------------------------------------------


def require_benchmark(name: str) -> Path:
    """The shared benchmark folder ``name``; skips when the data is absent (CI requires it:
    conftest turns a missing benchmarks folder into an error there)."""
    from pipelines.cli import benchmarks_dir

    folder = benchmarks_dir() / name
    if not (folder / "gt.json").exists():
        pytest.skip(f"benchmark {name} not available at {folder.parent}")
    return folder


# --- local servers -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answering(
    endpoint: str, server: subprocess.Popen, name: str, timeout_s: float = 20
) -> None:
    """Return once ``endpoint`` gives any HTTP answer; fail the test if ``server`` exits first or
    ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer (an emulator's root may be a 404) means the server is up
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{name} did not start")
            time.sleep(0.05)


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


# --- a tiny SavedModel -------------------------------------------------------------------------


def tiny_kernel(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(3, 3, 3, TINY_CHANNELS)).astype(np.float32)


def save_tiny_saved_model(path: Path, *, feature_map: bool = True, seed: int = 0) -> Path:
    """A SavedModel whose call maps (N, H, W, 3) float32 to a (N, H/2, W/2, 4) feature map.

    The conv kernel is a fixed (seeded) variable, so the weights fingerprint is reproducible.
    With ``feature_map=False`` the model pools to a (N, 4) vector instead, which GeM cannot use.
    """
    import tensorflow as tf

    kernel = tiny_kernel(seed)

    class Tiny(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kernel = tf.Variable(kernel, name="kernel")

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
        def __call__(self, images: tf.Tensor) -> tf.Tensor:
            features = tf.nn.softplus(tf.nn.conv2d(images, self.kernel, 2, "SAME"))
            return features if feature_map else tf.reduce_mean(features, axis=[1, 2])

    tf.saved_model.save(Tiny(), str(path))
    return path


# --- descriptor shards ---------------------------------------------------------------------------

D = 32
MODEL_INFO = {"id": "gem-test", "config_hash": "f" * 16, "weights_sha256": "0" * 64, "dim": D}


def write_descriptors(
    directory: Path,
    shard_sizes: list[int],
    seed: int = 0,
    errors_per_shard: int = 0,
    model_info: dict = MODEL_INFO,
    vectors: np.ndarray | None = None,
) -> tuple[list[str], np.ndarray]:
    """Unit vectors (random, or ``vectors`` in order) as committed descriptor shards; returns
    ids and vectors in order."""
    rng = np.random.default_rng(seed)
    all_ids, blocks, specs = [], [], []
    given = None if vectors is None else np.split(vectors, np.cumsum(shard_sizes)[:-1])
    for s, size in enumerate(shard_sizes):
        ids = [f"s{s:02d}/img{i:03d}" for i in range(size)]
        failed = [f"s{s:02d}/bad{i}" for i in range(errors_per_shard)]
        if given is not None:
            vectors = given[s]
        else:
            vectors = rng.standard_normal((size, D)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        spec = ShardSpec(f"part-{s:05d}", tuple(ImageRef(i, f"/img/{i}.jpg") for i in ids + failed))
        rows = [
            DescriptorRow(i, f"/img/{i}.jpg", "0" * 64, 64, 48, v)
            for i, v in zip(ids, vectors, strict=True)
        ]
        errors = [ErrorRow(i, f"/img/{i}.jpg", "decode", "truncated", "x") for i in failed]
        descriptor_shards.write_shard(str(directory), spec, rows, errors, model_info)
        specs.append(spec)
        all_ids += ids
        blocks.append(vectors)
    # What `retrieval extract` does: the folder's plan names exactly these shards.
    plan.write_extraction_plan(str(directory), specs, source="/img", shard_size=max(shard_sizes))
    return all_ids, np.concatenate(blocks)


# --- a tiny DELF-signature SavedModel ------------------------------------------------------------

DELF_TEST_DIM = 40


def save_tiny_delf(path: Path, *, seed: int = 0) -> Path:
    """A SavedModel with DELF's ``default`` signature and conventions (uint8 image, (y, x)
    locations, 40-D descriptors): one feature per 16x16 cell of each pyramid level whose mean
    brightness (its "attention") reaches the threshold, the strongest ``max_feature_num`` kept;
    descriptors are a fixed projection of the cell's colours."""
    import tensorflow as tf

    projection = np.random.default_rng(seed).normal(size=(3, DELF_TEST_DIM)).astype(np.float32)

    class TinyDelf(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.projection = tf.Variable(projection, name="projection")

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, None, 3], tf.uint8, name="image"),
                tf.TensorSpec([], tf.float32, name="score_threshold"),
                tf.TensorSpec([None], tf.float32, name="image_scales"),
                tf.TensorSpec([], tf.int32, name="max_feature_num"),
            ]
        )
        def default(self, image, score_threshold, image_scales, max_feature_num):
            pixels = tf.cast(image, tf.float32)
            size = tf.cast(tf.shape(pixels)[:2], tf.float32)

            def level(scale):
                scaled = tf.image.resize(pixels[tf.newaxis], tf.cast(size * scale, tf.int32))
                cells = tf.nn.avg_pool2d(scaled, 16, 16, "VALID")[0]  # (h, w, 3)
                grid = tf.cast(tf.where(tf.ones(tf.shape(cells)[:2], tf.bool)), tf.float32)
                flat = tf.reshape(cells, [-1, 3])
                centres = (grid * 16.0 + 8.0) / scale  # (y, x) in input pixels
                return centres, flat, tf.fill([tf.shape(flat)[0]], scale)

            centres = tf.zeros([0, 2])
            colours = tf.zeros([0, 3])
            scale_of = tf.zeros([0])
            for j in tf.range(tf.shape(image_scales)[0]):  # the image pyramid
                tf.autograph.experimental.set_loop_options(
                    shape_invariants=[
                        (centres, tf.TensorShape([None, 2])),
                        (colours, tf.TensorShape([None, 3])),
                        (scale_of, tf.TensorShape([None])),
                    ]
                )
                c, f, s = level(image_scales[j])
                centres = tf.concat([centres, c], 0)
                colours = tf.concat([colours, f], 0)
                scale_of = tf.concat([scale_of, s], 0)
            brightness = tf.reduce_mean(colours, axis=1)
            keep = brightness >= score_threshold
            centres, colours = tf.boolean_mask(centres, keep), tf.boolean_mask(colours, keep)
            scale_of, brightness = (
                tf.boolean_mask(scale_of, keep),
                tf.boolean_mask(brightness, keep),
            )
            pick = tf.math.top_k(
                brightness, tf.minimum(max_feature_num, tf.size(brightness))
            ).indices
            return {
                "locations": tf.gather(centres, pick),
                "descriptors": tf.math.l2_normalize(tf.gather(colours, pick) @ self.projection, 1),
                "scales": tf.gather(scale_of, pick),
                "attention": tf.gather(brightness, pick),
            }

    module = TinyDelf()
    tf.saved_model.save(module, str(path), signatures={"default": module.default})
    return path


# --- object storage servers and a faulty proxy in front of them ---------------------------------


def start_moto(tmp_dir: Path) -> tuple[subprocess.Popen, str]:
    """A moto S3 server on a free port (fails the test, never skips, if it cannot start)."""
    import sys

    moto = Path(sys.executable).parent / "moto_server"
    if not moto.exists():
        pytest.fail(f"moto_server is not installed in {moto.parent} (pip install 'moto[server]')")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        cwd=tmp_dir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until_answering(endpoint, server, "moto_server")
    return server, endpoint


@contextmanager
def moto_s3(tmp_dir: Path):
    """A moto S3 server with s3fs pointed at it through the environment (test credentials, no
    region or profile of the machine's); yields (endpoint, use): ``use(url)`` points s3fs at
    another endpoint (a proxy in front of the server). Stopped on exit."""
    server, endpoint = start_moto(tmp_dir)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("AWS_ACCESS_KEY_ID", "testing")
            env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
                env.delenv(name, raising=False)
            import s3fs

            def use(url: str) -> None:
                env.setenv("AWS_ENDPOINT_URL", url)  # read by botocore (also in Beam workers)
                s3fs.S3FileSystem.clear_instance_cache()

            use(endpoint)
            yield endpoint, use
            s3fs.S3FileSystem.clear_instance_cache()
    finally:
        stop_server(server)


class FaultyProxy:
    """An HTTP proxy in front of a storage server that fails a fraction of requests.

    Faults (chosen by a seeded generator): an S3/GCS-style ``503`` answer, a connection reset
    before any answer, a stall (no answer for ``stall_s``: the client must time out, see
    ``storage.request_timeout_s``), or, for GETs, a short read (full ``Content-Length``
    announced, half the body sent, connection closed). Every fault happens before the request
    reaches the server or on a read, so a retried request has exactly the effect of one that
    never failed. Faults are transient: the same request (method, path and query without upload
    ids, byte range) is faulted at most once, so its retry goes through. Without that cap a
    seeded run now and then drew a fault for every one of an operation's attempts (an outage,
    not a transient fault) and the test failed by chance. Outages are modelled on purpose:
    ``fail_paths`` always fail with 503 and ``stall_paths`` always stall (to exhaust retries);
    ``requests`` counts requests by path.
    """

    KINDS = ("503", "reset", "short", "timeout")

    def __init__(
        self, upstream: str, rate: float = 0.1, seed: int = 0, stall_s: float = 30.0
    ) -> None:
        import random
        import threading
        from http.server import ThreadingHTTPServer

        self.upstream = upstream.removeprefix("http://")
        self.rate = rate
        self.stall_s = stall_s
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self.fail_paths: set[str] = set()
        self.stall_paths: set[str] = set()
        self.requests: dict[str, int] = {}
        self.faulted: set[tuple[str, ...]] = set()  # requests already faulted once
        self.faults = dict.fromkeys(self.KINDS, 0)
        self.abandoned = 0  # stalled requests the client gave up on (timed out)
        self.stalling = 0  # stalled requests not yet over
        proxy = self

        from http.server import BaseHTTPRequestHandler

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _handle(self) -> None:
                proxy.forward(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        import time

        deadline = time.monotonic() + 2  # let stalls whose client hung up count it
        while self.stalling and time.monotonic() < deadline:
            time.sleep(0.05)
        self.closing.set()  # releases the remaining stalled requests
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def _request_key(method: str, target: str, byte_range: str | None) -> tuple[str, ...]:
        """What makes two requests "the same request" sent again: a retried upload gets a new
        upload id from the server (GCS ``upload_id``, S3 ``uploadId``), so those are left out."""
        from urllib.parse import parse_qsl, urlencode, urlsplit

        parts = urlsplit(target)
        query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("upload_id", "uploadId")]
        return (method, parts.path, urlencode(sorted(query)), byte_range or "")

    def _fault(self, method: str, path: str, key: tuple[str, ...]) -> str | None:
        with self.lock:
            self.requests[path] = self.requests.get(path, 0) + 1
            if any(path.startswith(p) for p in self.fail_paths):
                return "503"
            if any(path.startswith(p) for p in self.stall_paths):
                return "timeout"
            if self.rng.random() >= self.rate or key in self.faulted:
                return None
            self.faulted.add(key)
            kind = self.rng.choice(self.KINDS)
            if kind == "short" and method != "GET":
                kind = "503"
            self.faults[kind] += 1
            return kind

    def _stall(self, connection) -> None:
        """Answer nothing until the client hangs up (counted in ``abandoned``: its timeout
        worked) or ``stall_s`` passes."""
        import select
        import socket
        import time

        deadline = time.monotonic() + self.stall_s
        with self.lock:
            self.stalling += 1
        try:
            while not self.closing.is_set() and (left := deadline - time.monotonic()) > 0:
                readable, _, _ = select.select([connection], [], [], min(left, 0.05))
                if not readable:
                    continue
                try:
                    hung_up = not connection.recv(1, socket.MSG_PEEK)
                except OSError:
                    hung_up = True
                if hung_up:
                    with self.lock:
                        self.abandoned += 1
                    return
        finally:
            with self.lock:
                self.stalling -= 1

    def forward(self, handler) -> None:
        import http.client
        import socket
        import struct

        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        path = handler.path.split("?", 1)[0]
        key = self._request_key(handler.command, handler.path, handler.headers.get("Range"))
        fault = self._fault(handler.command, path, key)
        if fault == "timeout":  # hold the request, never forward it
            self._stall(handler.connection)
            handler.close_connection = True
            return
        if fault == "reset":
            handler.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            handler.close_connection = True
            return
        if fault == "503":
            payload = (
                b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code>'
                b"<Message>injected fault</Message></Error>"
            )
            handler.send_response(503)
            handler.send_header("Content-Type", "application/xml")
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            if handler.command != "HEAD":
                handler.wfile.write(payload)
            return
        upstream = http.client.HTTPConnection(self.upstream, timeout=30)
        headers = {k: v for k, v in handler.headers.items() if k.lower() != "connection"}
        upstream.request(handler.command, handler.path, body=body, headers=headers)
        answer = upstream.getresponse()
        data = answer.read()
        upstream.close()
        handler.send_response(answer.status)
        skip = {"connection", "transfer-encoding", "keep-alive", "content-length", "server", "date"}
        for key, value in answer.getheaders():
            if key.lower() not in skip:
                handler.send_header(key, value)
        announced = answer.getheader("Content-Length") if handler.command == "HEAD" else None
        handler.send_header("Content-Length", announced or str(len(data)))
        handler.end_headers()
        if handler.command == "HEAD":
            return
        if fault == "short" and len(data) > 1:
            handler.wfile.write(data[: len(data) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
            return
        handler.wfile.write(data)


def start_gcs_emulator(
    tmp_dir: Path, bucket: str, *, preconditions: bool = False
) -> tuple[subprocess.Popen, str]:
    """gcp-storage-emulator (in memory, bucket ``bucket``) on a free port; fails the test, never
    skips, if it cannot start. With ``preconditions``, started through
    ``tests/gcs_preconditions.py``, which answers an upload with ``ifGenerationMatch=0`` onto
    an existing object with 412, as GCS does (the emulator itself ignores it)."""
    import sys

    emulator = Path(sys.executable).parent / "gcp-storage-emulator"
    if not emulator.exists():
        pytest.fail(f"gcp-storage-emulator is not installed in {emulator.parent}")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    command = [str(emulator)]
    if preconditions:
        command = [sys.executable, str(Path(__file__).with_name("gcs_preconditions.py"))]
    server = subprocess.Popen(
        [
            *command,
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--default-bucket",
            bucket,
            "--in-memory",
            "--quiet",
        ],
        cwd=tmp_dir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until_answering(endpoint, server, "gcp-storage-emulator")
    return server, endpoint


def use_gcs_emulator(env: pytest.MonkeyPatch, endpoint: str):
    """Point gcsfs at the emulator, in this process and in the worker processes it starts.

    gcsfs needs three things against ``gcp-storage-emulator`` (STACK.md pitfall 4):
    ``STORAGE_EMULATOR_HOST`` (read on every request, so :func:`point_gcs_at` can move it to a
    proxy), anonymous credentials (fsspec's config here, ``FSSPEC_GS`` for fresh processes, so
    ``url_to_fs("gs://...")`` in library code picks them up), and the plain
    ``gcsfs.core.GCSFileSystem``: with ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT`` unset when gcsfs is
    first imported, ``gcsfs.GCSFileSystem`` is the experimental class, which asks the bucket's
    type over gRPC and hangs 60 s per call. Setting the variable after that import changes
    nothing, so the plain class is also registered for ``gs``/``gcs`` in fsspec itself (worker
    processes import gcsfs with the variable already set). Returns the plain class.
    """
    import fsspec
    from fsspec.registry import _registry as fsspec_registry

    env.setenv("STORAGE_EMULATOR_HOST", endpoint)
    env.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # for a first import
    env.setenv("FSSPEC_GS", '{"token": "anon"}')  # read by fsspec when a worker imports it
    import gcsfs.core

    plain = gcsfs.core.GCSFileSystem
    for protocol in ("gs", "gcs"):  # in case gcsfs was imported before (see docstring)
        env.setitem(fsspec_registry, protocol, plain)
    env.setitem(fsspec.config.conf, "gs", {"token": "anon"})
    plain.clear_instance_cache()
    return plain


def point_gcs_at(env: pytest.MonkeyPatch, endpoint: str) -> None:
    """Send gcsfs's requests (here and in workers started from now on) to ``endpoint``."""
    import gcsfs.core

    env.setenv("STORAGE_EMULATOR_HOST", endpoint)
    gcsfs.core.GCSFileSystem.clear_instance_cache()


# --- a Spark standalone cluster on 127.0.0.1 ----------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class SparkCluster:
    """A running standalone cluster: ``master`` is the URL to give ``--master``; ``web_ui`` the
    master's web UI (``state()`` reads its ``/json/``); ``work_dirs`` each worker's
    SPARK_WORKER_DIR (an application's executor ``N`` logs to ``app-*/N/stderr`` there)."""

    master: str
    web_ui: str
    work_dirs: tuple[Path, ...]
    logs: tuple[Path, ...]

    def state(self) -> dict:
        """The master's view: ``status``, ``workers``, ``activeapps``, ``completedapps``..."""
        with urllib.request.urlopen(f"{self.web_ui}/json/", timeout=5) as answer:
            return json.load(answer)


def spark_home() -> Path:
    """The pyspark package folder: pip's pyspark is a whole Spark (bin/spark-class, jars/)."""
    import pyspark

    return Path(pyspark.__file__).parent


def log_tails(logs: tuple[Path, ...] | list[Path], lines: int = 30) -> str:
    tails = []
    for log in logs:
        text = log.read_text(errors="replace") if log.exists() else "(no log: not started)"
        tails.append(f"--- last lines of {log} ---\n" + "\n".join(text.splitlines()[-lines:]))
    return "\n".join(tails)


@contextmanager
def spark_standalone_cluster(
    tmp_dir: Path,
    workers: int = 2,
    *,
    cores: int = 1,
    memory: str = "1g",
    timeout_s: float = 120,
    master_class: str = "org.apache.spark.deploy.master.Master",
) -> Iterator[SparkCluster]:
    """A real Spark standalone cluster on 127.0.0.1 from the pyspark package (Java 17): one
    master and ``workers`` workers of ``cores`` cores and ``memory`` each, every JVM started by
    ``$SPARK_HOME/bin/spark-class`` in its own process group, on free ports, with its work,
    log and pid folders under ``tmp_dir``.

    Yields once the master is ALIVE and lists ``workers`` ALIVE workers (read from its
    ``/json/``). Fails the test, never skips, with the end of every JVM's log if a JVM exits
    first or ``timeout_s`` passes. On the way out (also when the test failed or the start did)
    every process group is terminated, then killed, executors and their Python workers with it.

    The workers' environment is this process's, plus: ``PYSPARK_PYTHON`` = this interpreter,
    ``SPARK_LOCAL_IP`` = 127.0.0.1, and ``PYTHONPATH`` starting with this checkout, so that
    executors import the same code as the test (the editable install may point elsewhere).
    """
    home = spark_home()
    conf_dir = tmp_dir / "conf"  # empty: no spark-env.sh or spark-defaults.conf from elsewhere
    log_dir, pid_dir = tmp_dir / "logs", tmp_dir / "pids"
    for folder in (conf_dir, log_dir, pid_dir):
        folder.mkdir(parents=True, exist_ok=True)
    python_path = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(":"))]
    env = {
        **os.environ,
        "SPARK_HOME": str(home),
        "SPARK_CONF_DIR": str(conf_dir),
        "SPARK_LOG_DIR": str(log_dir),
        "SPARK_PID_DIR": str(pid_dir),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYSPARK_PYTHON": sys.executable,
        "PYTHONPATH": ":".join(dict.fromkeys(python_path)),
        # The daemons only keep books; the C2 compiler's threads would compete with the
        # executors for the two cores of CI while the JVMs warm up.
        "SPARK_DAEMON_JAVA_OPTS": "-XX:TieredStopAtLevel=1",
    }
    for name in ("PYSPARK_GATEWAY_PORT", "PYSPARK_GATEWAY_SECRET", "SPARK_MASTER_HOST"):
        env.pop(name, None)
    port, ui_port = free_port(), free_port()
    master = f"spark://127.0.0.1:{port}"
    web_ui = f"http://127.0.0.1:{ui_port}"
    processes: list[subprocess.Popen] = []

    def start(name: str, args: list[str], work_dir: Path | None = None) -> None:
        with (log_dir / f"{name}.log").open("wb") as sink:
            processes.append(
                subprocess.Popen(
                    [str(home / "bin" / "spark-class"), *args],
                    env={**env, "SPARK_WORKER_DIR": str(work_dir)} if work_dir else env,
                    cwd=tmp_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: stopped as one
                )
            )

    work_dirs = tuple(tmp_dir / f"worker-{i}" for i in range(workers))
    names = ["master", *(f"worker-{i}" for i in range(workers))]
    cluster = SparkCluster(master, web_ui, work_dirs, tuple(log_dir / f"{n}.log" for n in names))
    deadline = time.monotonic() + timeout_s
    try:
        ports = ["--port", str(port), "--webui-port", str(ui_port)]
        start("master", [master_class, "--host", "127.0.0.1", *ports])
        # Workers start once the master is ALIVE: a worker that registers sooner is told the
        # master is in standby and tries again only 5 to 15 s later.
        _wait_for_workers(cluster, processes, 0, deadline)
        for name, work_dir in zip(names[1:], work_dirs, strict=True):
            work_dir.mkdir(parents=True, exist_ok=True)
            worker = ["org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1"]
            worker += ["--cores", str(cores), "--memory", memory, "--work-dir", str(work_dir)]
            start(name, [*worker, "--webui-port", str(free_port()), master], work_dir)
        _wait_for_workers(cluster, processes, workers, deadline)
        yield cluster
    finally:
        stop_process_groups(processes[::-1])  # workers (and their executors) first


def _wait_for_workers(
    cluster: SparkCluster, processes: list[subprocess.Popen], workers: int, deadline: float
) -> None:
    """Return once the master is ALIVE with ``workers`` ALIVE workers; fail the test with the
    logs' tails if one of ``processes`` exits first or the monotonic clock passes ``deadline``."""
    seen = "no answer from the master's web UI"
    while True:
        try:
            state = cluster.state()
            alive = [w for w in state.get("workers", []) if w.get("state") == "ALIVE"]
            if state.get("status") == "ALIVE" and len(alive) >= workers:
                return
            seen = f"master {state.get('status')}, {len(alive)} of {workers} workers ALIVE"
        except (OSError, ValueError):
            pass
        exited = [p for p in processes if p.poll() is not None]
        if exited or time.monotonic() > deadline:
            why = "timed out"
            if exited:  # args: spark-class, the class, its arguments
                why = f"{exited[0].args[1]} exited with status {exited[0].returncode}"
            pytest.fail(
                f"the Spark standalone cluster did not start ({why}; {seen})\n"
                + log_tails(cluster.logs),
                pytrace=False,
            )
        time.sleep(0.25)


def stop_process_groups(processes: list[subprocess.Popen], timeout_s: float = 15) -> None:
    """SIGTERM each process's group (its own session, see ``start_new_session``), wait for
    every member to be gone, then SIGKILL what is left: no JVM or Python worker outlives it."""
    groups = [p.pid for p in processes]
    for group in groups:
        _signal_group(group, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in processes:
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
    while any(_group_alive(g) for g in groups) and time.monotonic() < deadline:
        time.sleep(0.1)
    for group in groups:
        _signal_group(group, signal.SIGKILL)
    for process in processes:
        process.wait()


def processes_in(folder: Path) -> list[int]:
    """Ids of the processes (this user's) whose working directory is ``folder`` or inside it:
    the cluster's JVMs, executors and Python workers all run there."""
    found = []
    for proc in Path("/proc").iterdir():
        with suppress(OSError):
            if proc.name.isdigit() and (proc / "cwd").resolve().is_relative_to(folder.resolve()):
                found.append(int(proc.name))
    return found


def _signal_group(group: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.killpg(group, sig)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


# --- the whole pipeline on object storage -----------------------------------------------------


def pattern_images(n: int, seed: int = 0) -> dict[str, bytes]:
    """``n`` small random-pattern images, alternately JPEG and PNG: {file name: bytes}."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    images = {}
    for i in range(n):
        pixels = (rng.random((40 + i, 56, 3)) * 255).astype(np.uint8)
        sink = io.BytesIO()
        fmt = "PNG" if i % 2 else "JPEG"
        Image.fromarray(pixels).save(sink, fmt)
        images[f"img{i:02d}.{fmt.lower()}"] = sink.getvalue()
    return images


def write_tiny_benchmark(folder: Path, images: dict[str, bytes]) -> Path:
    """A benchmark folder (images/ + gt.json) over ``images``: two queries, one of them a crop
    (so `evaluate` writes query inputs to its output), each with the next image as positive."""
    import json

    (folder / "images").mkdir(parents=True)
    ids = []
    for name, data in images.items():
        (folder / "images" / name.replace(".jpeg", ".jpg")).write_bytes(data)
        ids.append(name.rsplit(".", 1)[0])
    queries = [
        {"id": ids[0], "landmark": "a", "positives": [ids[1]], "bbox": [4, 4, 40, 36]},
        {"id": ids[2], "landmark": "b", "positives": [ids[3]]},
    ]
    (folder / "gt.json").write_text(json.dumps({"images": ids, "queries": queries}))
    return folder


def run_pipeline(corpus: str, root: str, config, benchmark: Path | None = None) -> dict:
    """extract -> train -> index -> merge -> search (the corpus as its own queries) with every
    output under ``root``; then, with ``benchmark``, `evaluate` with its report in ``root``.
    Checks that every stage's summary.json adds up; returns what the tests compare."""
    from dataclasses import replace

    from pipelines import stages
    from pipelines.evaluate import evaluate_benchmark
    from retrieval import storage

    summaries = {
        "extract": stages.extract(corpus, f"{root}/desc", config),
        "train": stages.train(f"{root}/desc", f"{root}/cb", config),
        "index": stages.index(f"{root}/desc", f"{root}/cb", f"{root}/shards", config),
        "merge": stages.merge(f"{root}/shards", f"{root}/index"),
        "search": stages.search(f"{root}/index", f"{root}/desc", f"{root}/search", k=5),
    }
    for stage in ("extract", "index", "search"):
        s = summaries[stage]
        assert s["inputs"] == s["indexed"] + s["failed"], stage
    for folder in ("desc", "cb", "shards", "index", "search"):  # what each stage wrote there
        s = storage.read_json(f"{root}/{folder}/summary.json")
        assert s["inputs"] == s["indexed"] + s["failed"], folder
    ids, _, vectors = descriptor_shards.read_all(f"{root}/desc")
    results = storage.read_parquet(f"{root}/search/results.parquet").to_pylist()
    out = {"summaries": summaries, "ids": ids, "vectors": vectors, "results": results}
    if benchmark is not None:
        report_dir = f"{root}/report"
        report = evaluate_benchmark(
            str(benchmark), report_dir, replace(config, runner="local"), variants=False
        )
        written = storage.read_json(f"{report_dir}/report.json")
        assert written["results"] == report["results"]
        for name in ("report.md", "report.html", "rankings.parquet"):
            assert storage.exists(f"{report_dir}/{name}"), name
        accounting = written["accounting"]
        assert accounting["inputs"] == accounting["indexed"] + accounting["failed"]
        out["report"] = written
    return out


# --- secrets: a server that needs them, and a scan for them -------------------------------------


class GuardedFiles:
    """Files served over HTTP only to a client that shows a secret, as real stores ask for one:
    a path under ``/auth/`` needs the Basic credentials ``basic_auth`` (user, password); a path
    listed in ``signed`` needs every query parameter given there, with its value (a signed URL:
    ``{"/signed/a.jpg": {"X-Amz-Signature": "..."}}``); a wrong or missing secret is a 401 or
    403. HEAD and single ``Range: bytes=a-b`` requests are answered as object stores do.
    ``granted`` counts the requests served per path, ``refused`` those refused."""

    def __init__(
        self,
        files: dict[str, bytes],
        *,
        basic_auth: tuple[str, str],
        signed: dict[str, dict[str, str]],
    ) -> None:
        import base64
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import parse_qsl, urlsplit

        self.files = files
        self.granted: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        expected_auth = "Basic " + base64.b64encode(":".join(basic_auth).encode()).decode()
        guarded = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _answer(self, with_body: bool) -> None:
                parts = urlsplit(self.path)
                query = dict(parse_qsl(parts.query))
                path = parts.path
                status = 200
                if path.startswith("/auth/") and self.headers.get("Authorization") != expected_auth:
                    status = 401
                needed = signed.get(path)
                if needed is not None and any(query.get(k) != v for k, v in needed.items()):
                    status = 403
                data = guarded.files.get(path)
                if status == 200 and data is None:
                    status = 404
                book = guarded.granted if status == 200 else guarded.refused
                book[path] = book.get(path, 0) + 1
                if status != 200:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start, end = 0, len(data) - 1
                wanted = self.headers.get("Range", "")
                if wanted.startswith("bytes="):
                    first, _, last = wanted.removeprefix("bytes=").partition("-")
                    start = int(first or 0)
                    end = min(int(last), end) if last else end
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start : end + 1]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def do_GET(self) -> None:
                self._answer(True)

            def do_HEAD(self) -> None:
                self._answer(False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def _strings(value) -> Iterator[str]:
    """Every string (or bytes, decoded) inside a value read from Parquet: lists, structs, maps."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, bytes):
        yield value.decode("utf-8", "replace")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def _has_text(data_type) -> bool:
    import pyarrow as pa

    if pa.types.is_string(data_type) or pa.types.is_large_string(data_type):
        return True
    if pa.types.is_binary(data_type) or pa.types.is_large_binary(data_type):
        return True
    if pa.types.is_dictionary(data_type):
        return _has_text(data_type.value_type)
    return any(_has_text(data_type.field(i).type) for i in range(data_type.num_fields))


def scan_for_secrets(
    folders: list[Path], secrets: list[str], texts: dict[str, str] | None = None
) -> list[str]:
    """Where any of ``secrets`` appears: in the name or the raw bytes of any file under
    ``folders`` (JSON, text, logs, indexes...), in any string of a Parquet file (every column
    holding text, read with pyarrow: the raw bytes are compressed) and in its metadata, and in
    each of ``texts`` (captured stdout, stderr, logs: name -> text). Returns one line per find
    (empty: nothing leaked); a folder that does not exist is a find too, so a typo cannot make
    the scan pass."""
    import pyarrow.parquet as pq

    needles = [s for s in secrets if s]
    found: list[str] = []

    def look(where: str, text: str) -> None:
        found.extend(f"{where}: {s!r}" for s in needles if s in text)

    for folder in folders:
        if not folder.is_dir():
            found.append(f"{folder}: not a folder")
            continue
        for path in sorted(p for p in folder.rglob("*")):
            look(f"{path} (name)", str(path.relative_to(folder)))
            if not path.is_file():
                continue
            data = path.read_bytes()
            look(f"{path} (bytes)", data.decode("utf-8", "replace"))
            if data[:4] == b"PAR1":
                parquet = pq.ParquetFile(path)
                metadata = parquet.schema_arrow.metadata or {}
                look(f"{path} (metadata)", " ".join(map(str, _strings(dict(metadata)))))
                table = parquet.read()
                for name in table.column_names:
                    if _has_text(table.schema.field(name).type):
                        column = table.column(name).to_pylist()
                        look(f"{path} (column {name})", "\n".join(_strings(column)))
    for name, text in (texts or {}).items():
        look(name, text)
    return found
