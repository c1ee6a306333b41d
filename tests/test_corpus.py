"""Listing corpora (folders, manifests, S3 via moto), planning shards, and storage retries."""

from __future__ import annotations

import io
import os
import posixpath
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from support import free_port, stop_server, wait_until_answering

from retrieval import storage
from retrieval.corpus import ImageRef, image_id, list_corpus, plan_shards

# --- folders -----------------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    for name in (
        "a.png",
        "b.JPG",
        "e.tif",
        "sub/c.jpeg",
        "sub/deeper/d.webp",
        "notes.txt",
        "list.csv",
        "sub/model.h5",
        "noext",
    ):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return root


def test_list_folder(folder: Path):
    refs = list_corpus(str(folder))
    assert [r.id for r in refs] == ["a.png", "b.JPG", "e.tif", "sub/c.jpeg", "sub/deeper/d.webp"]
    assert [r.uri for r in refs] == [
        str(folder / n) for n in ("a.png", "b.JPG", "e.tif", "sub/c.jpeg", "sub/deeper/d.webp")
    ]
    assert all(r.problem is None for r in refs)
    assert list_corpus(str(folder) + "/") == refs


def test_list_folder_relative_path(folder: Path, monkeypatch):
    monkeypatch.chdir(folder.parent)
    refs = list_corpus("corpus")
    assert [r.id for r in refs] == ["a.png", "b.JPG", "e.tif", "sub/c.jpeg", "sub/deeper/d.webp"]
    assert all(os.path.isabs(r.uri) and os.path.exists(r.uri) for r in refs)


def test_folder_named_like_a_manifest_is_listed(tmp_path: Path):
    root = tmp_path / "shots.csv"
    root.mkdir()
    (root / "x.jpg").write_bytes(b"x")
    assert [r.id for r in list_corpus(str(root))] == ["x.jpg"]


def test_files_differing_only_in_extension_are_two_images(folder: Path):
    (folder / "a.jpg").write_bytes(b"x")
    (folder / "sub" / "c.png").write_bytes(b"x")
    refs = list_corpus(str(folder))
    assert [r.id for r in refs] == [
        "a.jpg",
        "a.png",
        "b.JPG",
        "e.tif",
        "sub/c.jpeg",
        "sub/c.png",
        "sub/deeper/d.webp",
    ]
    assert all(r.problem is None for r in refs)


def test_duplicate_manifest_ids_are_kept_and_marked(tmp_path: Path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,uri\nsame,b.jpg\nsame,a.jpg\nother,c.jpg\n")
    refs = list_corpus(str(manifest))
    by_uri = {os.path.relpath(r.uri, tmp_path): r.problem for r in refs}
    assert by_uri["a.jpg"] is None  # the first in URI order is indexed
    assert by_uri["b.jpg"].startswith("duplicate_id: ")
    assert str(tmp_path / "a.jpg") in by_uri["b.jpg"]
    assert by_uri["c.jpg"] is None


def test_image_id():
    assert image_id("/data/x/y/z.jpg", "/data/x") == "y/z.jpg"
    assert image_id("/data/x/y/z.jpg", "/data/x/") == "y/z.jpg"
    assert image_id("gs://bucket/dir/a.b.png", "gs://bucket/dir") == "a.b.png"
    assert image_id("s3://b/dir/é x/photo.webp", "s3://b/dir") == "é x/photo.webp"


@pytest.mark.parametrize(
    "root", ["/data/x", "/data/x/", "/", "/data//x", "/data/./x", "data/x", "."]
)
@pytest.mark.parametrize(
    "rel", ["a.jpg", "y/z.jpg", "./a.jpg", "a//b.jpg", "../a.jpg", "y/../a.jpg", "a/./b", "..a"]
)
def test_image_id_is_relpath(root: str, rel: str):
    # The fast path (a normal path under the root) must give exactly what relpath gives; an
    # input outside the root gets its own (absolute, normal) path, never a climbing relpath.
    for uri in (root.rstrip("/") + "/" + rel, root + "/" + rel, "/elsewhere/" + rel, rel):
        relative = posixpath.relpath(uri, root.rstrip("/") or "/")
        climbs = relative == ".." or relative.startswith("../")
        expected = posixpath.normpath(posixpath.abspath(uri)) if climbs else relative
        assert image_id(uri, root) == expected, uri
        assert ".." not in image_id(uri, root).split("/"), uri


def test_ids_never_climb():
    assert image_id("/elsewhere/a.jpg", "/data/x") == "/elsewhere/a.jpg"
    assert image_id("/data/x/../../etc/a.jpg", "/data/x") == "/etc/a.jpg"
    assert image_id("gs://other/a.jpg", "gs://bucket/dir") == "other/a.jpg"
    assert image_id("gs://bucket/a.jpg", "gs://bucket/dir") == "bucket/a.jpg"
    assert image_id("s3://bucket/dir/a.jpg", "gs://bucket/dir") == "bucket/dir/a.jpg"
    # A signed URL's id is its path: the signature is no part of what the image is called.
    signed = "https://host/p/a.jpg?X-Amz-Date=1&X-Amz-Signature=abc#f"
    assert image_id(signed, "/lists") == "host/p/a.jpg"
    assert image_id(signed, "https://host/p") == "a.jpg"


def test_image_id_of_bucket_uri_in_local_manifest_ignores_current_folder(tmp_path, monkeypatch):
    (tmp_path / "m.csv").write_text("uri\ngs://bucket/photos/a.jpg\n")
    ids = []
    for folder in (tmp_path, tmp_path.parent):
        monkeypatch.chdir(folder)
        ids.append([r.id for r in list_corpus(str(tmp_path / "m.csv"))])
    assert ids == [["bucket/photos/a.jpg"]] * 2


# --- manifests ---------------------------------------------------------------------------------


def test_csv_manifest_with_id_column(tmp_path: Path):
    (tmp_path / "lists").mkdir()
    manifest = tmp_path / "lists" / "m.csv"
    manifest.write_text(
        "\ufeffid,uri\n"  # Excel writes a BOM
        "x2,/abs/two.png\n"
        "x1, images/one.jpg \n"
        "x3,s3://bucket/three.jpg\n"
        ",images/sub/four.jpg\n"
    )
    refs = list_corpus(str(manifest))
    assert refs == [
        ImageRef("images/sub/four.jpg", str(tmp_path / "lists" / "images" / "sub" / "four.jpg")),
        ImageRef("x1", str(tmp_path / "lists" / "images" / "one.jpg")),
        ImageRef("x2", "/abs/two.png"),
        ImageRef("x3", "s3://bucket/three.jpg"),
    ]


def test_csv_manifest_without_id_column(tmp_path: Path, monkeypatch):
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri\nimg/b.jpg\nimg/sub/a.png\nimg/b.png\n")
    refs = list_corpus(str(manifest))
    assert [(r.id, r.uri, r.problem) for r in refs] == [
        ("img/b.jpg", str(tmp_path / "img" / "b.jpg"), None),
        ("img/b.png", str(tmp_path / "img" / "b.png"), None),
        ("img/sub/a.png", str(tmp_path / "img" / "sub" / "a.png"), None),
    ]
    monkeypatch.chdir(tmp_path)
    assert [r.uri for r in list_corpus("m.csv")] == [r.uri for r in refs]


def test_parquet_manifest(tmp_path: Path):
    table = pa.table(
        {"uri": ["pics/z.jpg", "pics/y.jpg", "gs://b/w.png"], "id": ["zeta", None, "omega"]}
    )
    pq.write_table(table, tmp_path / "m.parquet")
    refs = list_corpus(str(tmp_path / "m.parquet"))
    assert refs == [
        ImageRef("omega", "gs://b/w.png"),
        ImageRef("pics/y.jpg", str(tmp_path / "pics" / "y.jpg")),
        ImageRef("zeta", str(tmp_path / "pics" / "z.jpg")),
    ]


def test_manifest_paths_are_confined(tmp_path: Path):
    (tmp_path / "lists").mkdir()
    manifest = tmp_path / "lists" / "m.csv"
    manifest.write_text(
        "id,uri\nup,../secret.jpg\ndeep,a/../../x.jpg\nok,a/../b.jpg\nabs,/etc/hosts\n"
    )
    refs = {r.id: r for r in list_corpus(str(manifest))}
    assert refs["!refused/row-1"].problem.startswith("unsafe_uri: ")  # up
    assert refs["!refused/row-2"].problem.startswith("unsafe_uri: ")  # deep
    assert refs["ok"] == ImageRef("ok", str(tmp_path / "lists" / "b.jpg"))
    assert refs["abs"].problem is None  # a local manifest may name local files


def test_file_uris_follow_the_rules_of_local_paths(tmp_path: Path):
    (tmp_path / "lists").mkdir()
    (tmp_path / "x.jpg").write_bytes(b"x")  # what file://../x.jpg would read
    manifest = tmp_path / "lists" / "m.csv"
    manifest.write_text(
        "id,uri\n"
        "up2,file://../../x.jpg\n"
        "up1,file://../x.jpg\n"
        "win,file://..\\x.jpg\n"
        "in,file://sub/a.jpg\n"
        "abs,file:///abs/b.jpg\n"
    )
    refs = {r.id: r for r in list_corpus(str(manifest))}
    for row, name in ((1, "up2"), (2, "up1"), (3, "win")):
        problem = refs[f"!refused/row-{row}"].problem
        assert problem.startswith("unsafe_uri: a relative path that leaves"), name
        assert problem.endswith(f"(row {row}, id {name!r})")
    assert refs["in"] == ImageRef("in", str(tmp_path / "lists" / "sub" / "a.jpg"))
    assert refs["abs"] == ImageRef("abs", "file:///abs/b.jpg")  # a local manifest may name them


@pytest.mark.parametrize(
    "written",
    [
        "file:///etc/hosts",
        "file://x.jpg",
        "file://../x.jpg",
        "/etc/hosts",
        "../x.jpg",
        "gs://bucket/lists/../../other/x.jpg",
        "s3://bucket/a/../x.jpg",
        "https://host/a/../../x.jpg",
    ],
)
def test_one_confinement_rule_for_every_scheme_in_a_bucket_manifest(written: str):
    from retrieval.corpus import resolve_manifest_uri

    _, problem = resolve_manifest_uri(written, "gs://bucket/lists", remote=True)
    assert problem is not None and problem.startswith("unsafe_uri: "), written
    assert resolve_manifest_uri("x.jpg", "gs://bucket/lists", remote=True) == (
        "gs://bucket/lists/x.jpg",
        None,
    )


def test_refused_rows_claim_no_id(tmp_path: Path):
    (tmp_path / "good.jpg").write_bytes(b"x")
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "id,uri\n"
        "same,../escape.jpg\n"  # refused: leaves the folder
        "same,\n"  # refused: empty
        "same,good.jpg\n"
        "!refused/row-5,good.jpg\n"  # a reserved id: refused, under its own row's id
        "../up,good.jpg\n"  # a climbing id
    )
    refs = list_corpus(str(manifest))
    by_id = {r.id: r for r in refs}
    assert by_id["same"] == ImageRef("same", str(tmp_path / "good.jpg"))  # not a duplicate
    assert by_id["!refused/row-1"].problem == (
        "unsafe_uri: a relative path that leaves the manifest's folder (row 1, id 'same')"
    )
    assert by_id["!refused/row-2"].problem == "unsafe_uri: empty uri (row 2, id 'same')"
    assert by_id["!refused/row-4"].problem.startswith("unsafe_id: ")
    assert by_id["!refused/row-5"].problem.startswith("unsafe_id: ")
    assert len(by_id) == len(refs) == 5
    assert not any(r.problem and r.problem.startswith("duplicate_id") for r in refs)


def test_refused_rows_do_not_cost_a_valid_row_in_the_run(tmp_path: Path):
    """Through planning: the valid row is planned (no duplicate), each refused row is one
    planned input with its problem, under an id no image can have."""
    from retrieval.corpus import iter_shards
    from retrieval.plan import read_shard_spec, write_extraction_plan

    (tmp_path / "good.jpg").write_bytes(b"x")
    (tmp_path / "m.csv").write_text("id,uri\nsame,../escape.jpg\nsame,good.jpg\n")
    source = str(tmp_path / "m.csv")
    out = str(tmp_path / "out")
    from retrieval.corpus import iter_corpus

    run = write_extraction_plan(
        out, iter_shards(iter_corpus(source), 8), source=source, shard_size=8
    )
    [spec] = [read_shard_spec(out, s) for s in run.shard_ids]
    assert [(r.id, r.problem is None) for r in spec.refs] == [
        ("!refused/row-1", False),
        ("same", True),
    ]


def test_manifest_needs_uri_column(tmp_path: Path):
    (tmp_path / "m.csv").write_text("path\na.jpg\n")
    with pytest.raises(ValueError, match="'uri' column"):
        list_corpus(str(tmp_path / "m.csv"))
    (tmp_path / "empty.csv").write_text("uri\n")
    assert list_corpus(str(tmp_path / "empty.csv")) == []


# --- shards ------------------------------------------------------------------------------------


def _refs(n: int) -> list[ImageRef]:
    return [ImageRef(f"img{i:03d}", f"/data/img{i:03d}.jpg") for i in range(n)]


def test_plan_shards_is_deterministic():
    refs = _refs(10)
    plan = plan_shards(refs, 4)
    assert [s.shard_id for s in plan] == ["part-00000", "part-00001", "part-00002"]
    assert [len(s.refs) for s in plan] == [4, 4, 2]
    assert [r for s in plan for r in s.refs] == refs
    again = plan_shards(list(refs), 4)
    assert again == plan
    assert [s.input_digest for s in again] == [s.input_digest for s in plan]
    assert plan_shards([], 4) == []
    assert len(plan_shards(refs, 100)) == 1
    with pytest.raises(ValueError):
        plan_shards(refs, 0)


def test_input_digest_tracks_inputs():
    refs = _refs(6)
    base = plan_shards(refs, 3)
    moved = refs.copy()
    moved[4] = ImageRef("img004", "/elsewhere/img004.jpg")
    changed = plan_shards(moved, 3)
    assert changed[0].input_digest == base[0].input_digest
    assert changed[1].input_digest != base[1].input_digest
    renamed = refs.copy()
    renamed[0] = ImageRef("other", refs[0].uri)
    assert plan_shards(renamed, 3)[0].input_digest != base[0].input_digest
    assert plan_shards(refs[:5], 3)[1].input_digest != base[1].input_digest


# --- storage -----------------------------------------------------------------------------------


def test_with_retries_retries_transient_errors(monkeypatch):
    delays: list[float] = []
    monkeypatch.setattr(storage.time, "sleep", delays.append)
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    assert storage.with_retries(flaky, what="test") == "ok"
    assert len(calls) == 3 and len(delays) == 2
    assert delays[1] > 0 and all(d <= 10.0 for d in delays)


def test_with_retries_gives_up(monkeypatch):
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    calls = []

    def down() -> None:
        calls.append(1)
        raise TimeoutError("slow down")

    with pytest.raises(TimeoutError):
        storage.with_retries(down, what="test", attempts=3)
    assert len(calls) == 3


@pytest.mark.parametrize(
    "error", [FileNotFoundError("gone"), PermissionError("no"), storage.FileTooLargeError("big")]
)
def test_with_retries_does_not_retry_permanent_errors(monkeypatch, error):
    monkeypatch.setattr(storage.time, "sleep", lambda s: pytest.fail("must not wait"))
    calls = []

    def fail() -> None:
        calls.append(1)
        raise error

    with pytest.raises(type(error)):
        storage.with_retries(fail, what="test")
    assert len(calls) == 1


def test_local_read_write(tmp_path: Path):
    uri = str(tmp_path / "a" / "b.bin")
    storage.write_bytes(uri, b"hello")
    assert storage.read_bytes(uri) == b"hello"
    assert os.listdir(tmp_path / "a") == ["b.bin"]  # no temporary file left behind
    with pytest.raises(storage.FileTooLargeError):
        storage.read_bytes(uri, max_bytes=4)
    assert storage.read_bytes(uri, max_bytes=5) == b"hello"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(str(tmp_path / "missing"))
    assert storage.sha256_file(uri) == storage.sha256_bytes(b"hello")


# --- S3 (moto) ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on a free port, with the environment s3fs/botocore read pointed at it."""
    moto = Path(sys.executable).parent / "moto_server"
    if not moto.exists():
        pytest.fail("moto_server is not installed (the S3 tests need it: pip install moto[server])")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_answering(endpoint, server, "moto_server")
        with pytest.MonkeyPatch.context() as env:
            env.setenv("AWS_ACCESS_KEY_ID", "testing")
            env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            env.setenv("AWS_ENDPOINT_URL", endpoint)  # botocore (and so s3fs) honours it
            for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
                env.delenv(name, raising=False)  # a region makes moto refuse CreateBucket
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()
            try:
                yield endpoint
            finally:
                s3fs.S3FileSystem.clear_instance_cache()
    finally:
        stop_server(server)


def _png(colour: str) -> bytes:
    sink = io.BytesIO()
    Image.new("RGB", (32, 24), colour).save(sink, "PNG")
    return sink.getvalue()


def test_list_corpus_on_s3(s3_endpoint):
    import s3fs

    fs = s3fs.S3FileSystem()
    assert fs.client_kwargs.get("endpoint_url") in (None, s3_endpoint)
    bucket = f"corpus-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)  # no region: see STACK.md pitfall 5
    images = {
        "prefix/a.png": _png("red"),
        "prefix/sub/b.jpg": _png("green"),
        "prefix/c.png": _png("blue"),
    }
    for key, data in images.items():
        fs.pipe(f"{bucket}/{key}", data)
    fs.pipe(f"{bucket}/prefix/readme.txt", b"not an image")
    fs.pipe(f"{bucket}/other/z.png", _png("white"))

    refs = list_corpus(f"s3://{bucket}/prefix")
    assert [r.id for r in refs] == ["a.png", "c.png", "sub/b.jpg"]
    assert [r.uri for r in refs] == [
        f"s3://{bucket}/prefix/{k}" for k in ("a.png", "c.png", "sub/b.jpg")
    ]
    assert list_corpus(f"s3://{bucket}/prefix/") == refs
    for ref in refs:
        assert storage.read_bytes(ref.uri) == images[ref.uri.split("/", 3)[3]]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"s3://{bucket}/prefix/missing.png")

    # A manifest in the bucket, with URIs relative to it.
    storage.write_bytes(f"s3://{bucket}/m.csv", b"id,uri\nq,prefix/c.png\n")
    [ref] = list_corpus(f"s3://{bucket}/m.csv")
    assert ref == ImageRef("q", f"s3://{bucket}/prefix/c.png")
    assert storage.read_bytes(ref.uri) == images["prefix/c.png"]
    # ... which cannot send workers to their own disks or out of its folder.
    storage.write_bytes(f"s3://{bucket}/lists/m.csv", b"id,uri\nabs,/etc/hosts\nup,../m.csv\n")
    refs = list_corpus(f"s3://{bucket}/lists/m.csv")
    assert [r.problem.split(":")[0] for r in refs] == ["unsafe_uri", "unsafe_uri"]
    assert storage.exists(f"s3://{bucket}/m.csv")
