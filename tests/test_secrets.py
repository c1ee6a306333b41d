"""No output file and no log line carries a secret (retrieval/redaction.py).

The whole pipeline through the command line (extract on Beam with 2 worker processes, then
train, index, merge, search with spatial verification), on a manifest of images behind an HTTP
server on 127.0.0.1 that serves nothing without a secret: Basic credentials (given the way the
README says: fsspec's configuration, in the environment), signed URLs (the signature in the
query string), and the manifest itself at a signed URL. Rows with credentials in the URI are
refused. Afterwards every file under the output folders (names, raw bytes, every string of every
Parquet file), the temporary folder the run used, and everything the commands printed are
scanned for every secret.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support import REPO_ROOT, GuardedFiles, pattern_images, save_tiny_saved_model, scan_for_secrets

from retrieval.redaction import MASK

# Distinct, alphanumeric (no URL encoding can hide one) and long enough to be registered.
PASSWORD = "pwBasic7Hq2Zr"
USER = "alice"
AMZ_SIGNATURES = ("amzSig4f9Qx1", "amzSig8k2Lm7")
AMZ_CREDENTIAL = "AKIAcredZ3x9"
SAS_SIGNATURES = ("sasSig5p0Wd3", "sasSig6y1Te8")
WRONG_SIGNATURE = "badSig2c7Vn4"
MISSING_SIGNATURE = "goneSig3r8Jk5"
MANIFEST_SIGNATURE = "manifestSig9s4Ub"
S3_SECRET = "s3Secret1m6Yh"
BEAM_SECRET = "beamAwsSecret0x5"
BEAM_TOKEN = "beamToken3v8Pq"
SECRETS = [
    PASSWORD,
    base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(),  # what the header carries
    *AMZ_SIGNATURES,
    AMZ_CREDENTIAL,
    *SAS_SIGNATURES,
    WRONG_SIGNATURE,
    MISSING_SIGNATURE,
    MANIFEST_SIGNATURE,
    S3_SECRET,
    BEAM_SECRET,
    BEAM_TOKEN,
]


def _amz(signature: str) -> str:
    return (
        f"X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={AMZ_CREDENTIAL}%2F20260101"
        f"&X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
        f"&X-Amz-Signature={signature}"
    )


@pytest.fixture(scope="module")
def served():
    """Six images: two behind Basic credentials, four at signed URLs; the manifest at a signed
    URL too."""
    images = pattern_images(6)
    names = list(images)
    files = {f"/auth/{n}": images[n] for n in names[:2]}
    files |= {f"/signed/{n}": images[n] for n in names[2:]}
    signed = {
        f"/signed/{names[2]}": {"X-Amz-Signature": AMZ_SIGNATURES[0]},
        f"/signed/{names[3]}": {"sig": SAS_SIGNATURES[0]},
        f"/signed/{names[4]}": {"X-Amz-Signature": AMZ_SIGNATURES[1]},
        f"/signed/{names[5]}": {"sig": SAS_SIGNATURES[1]},
        "/signed/gone.jpg": {"sig": MISSING_SIGNATURE},
        "/lists/m.csv": {"sig": MANIFEST_SIGNATURE},
        "/lists/readable.csv": {"sig": MANIFEST_SIGNATURE},
    }
    server = GuardedFiles(files, basic_auth=(USER, PASSWORD), signed=signed)
    url = server.url
    host = url.removeprefix("http://")
    rows = [
        f"{url}/auth/{names[0]}",
        f"{url}/auth/{names[1]}",
        f"{url}/signed/{names[2]}?{_amz(AMZ_SIGNATURES[0])}",
        f"{url}/signed/{names[3]}?sv=2024-11-04&se=2030-01-01&sp=r&sig={SAS_SIGNATURES[0]}",
        f"{url}/signed/{names[4]}?{_amz(AMZ_SIGNATURES[1])}",
        f"{url}/signed/{names[5]}?sv=2024-11-04&sp=r&sig={SAS_SIGNATURES[1]}",
        f"{url}/signed/gone.jpg?sig={MISSING_SIGNATURE}",  # 404: a `missing` error row
        f"{url}/signed/{names[2]}x?sig={WRONG_SIGNATURE}",  # a 403 answer
        f"http://{USER}:{PASSWORD}@{host}/auth/{names[0]}",  # refused: credentials in the URI
        f"s3://AKIAKEYID:{S3_SECRET}@bucket/photo.jpg",  # refused too
    ]
    files["/lists/m.csv"] = ("uri\n" + "\n".join(rows) + "\n").encode()
    # Without the unreadable rows: a re-index stops at an image it cannot look at (its content
    # key), a defect of its own.
    readable = rows[:6] + rows[8:]
    files["/lists/readable.csv"] = ("uri\n" + "\n".join(readable) + "\n").encode()
    yield server, f"{url}/lists/m.csv?sv=2024-11-04&sig={MANIFEST_SIGNATURE}"
    server.close()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_saved_model(tmp_path_factory.mktemp("model") / "tiny")


def _cli(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *argv],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_no_secret_reaches_a_file_or_a_log(tmp_path, served, tiny_model):
    server, manifest = served
    out, scratch = tmp_path / "out", tmp_path / "tmp"
    scratch.mkdir()
    header = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        # Credentials the way the README says: the client's configuration, not the URI.
        "FSSPEC_HTTP": json.dumps({"client_kwargs": {"headers": {"Authorization": header}}}),
        "TMPDIR": str(scratch),  # leftovers of the run's temporary files are scanned too
        "RETRIEVAL_MODEL_CACHE": str(tmp_path / "model-cache"),
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    model = ["--backbone", f"savedmodel:{tiny_model}", "--image-size", "64"]
    beam_args = f"--aws_secret_access_key={BEAM_SECRET} --my_token {BEAM_TOKEN}"
    steps = {
        "extract": [
            "--verbose", "extract", "--input", manifest, "--output", str(out / "desc"),
            "--local-output", str(out / "local"), "--local-image-size", "64", *model,
            "--shard-size", "4", "--runner", "beam", "--workers", "2", "--beam-args", beam_args,
        ],
        "train": [
            "train", "--descriptors", str(out / "desc"), "--output", str(out / "cb"),
            "--runner", "local",
        ],
        "index": [
            "index", "--descriptors", str(out / "desc"), "--codebook", str(out / "cb"),
            "--output", str(out / "groups"), "--runner", "local",
        ],
        "merge": [
            "merge", "--shards", str(out / "groups"), "--output", str(out / "index"),
            "--runner", "local",
        ],
        "search": [
            "--verbose", "search", "--index", str(out / "index"), "--queries", str(out / "desc"),
            "--local", str(out / "local"), "--output", str(out / "search"), "--k", "3",
            "--min-inliers", "4", "--runner", "local",
        ],
        # The nightly re-index of the same corpus: its batch manifest, state and version.
        "reindex": [
            "reindex", "--corpus", manifest.replace("/m.csv", "/readable.csv"),
            "--root", str(out / "root"), *model, "--local-features", "none", "--shard-size", "4",
            "--runner", "local",
        ],
        # A user mistake (credentials in --input), with its traceback.
        "refused input": [
            "--verbose", "extract", "--input", manifest.replace("//", f"//{USER}:{PASSWORD}@"),
            "--output", str(out / "refused"),
        ],
    }  # fmt: skip
    printed: dict[str, str] = {}
    for name, argv in steps.items():
        done = _cli(argv, env, tmp_path)
        printed[f"{name} stdout"], printed[f"{name} stderr"] = done.stdout, done.stderr
        expected = 2 if name == "refused input" else 0
        assert done.returncode == expected, f"{name}:\n{done.stdout}\n{done.stderr[-3000:]}"

    # The run did read what only the secrets open: the sealed signed URLs reached the workers.
    assert all(server.granted.get(f"/signed/{n}") for n in list(pattern_images(6))[2:])
    assert all(server.granted.get(f"/auth/{n}") for n in list(pattern_images(6))[:2])
    summary = json.loads((out / "desc" / "summary.json").read_text())
    assert (summary["inputs"], summary["indexed"], summary["failed"]) == (10, 6, 4)
    # fsspec reports a refused (403) HTTP read as not found, like a 404.
    assert summary["failures_by_kind"] == {"missing": 2, "unsafe_uri": 2}
    assert MASK in summary["input"] and summary["input"].startswith(server.url)
    refs = pq.read_table(out / "desc" / "plan.refs.parquet").to_pylist()
    assert sum(r["sealed"] is not None for r in refs) == 6  # the signed URLs that are read
    assert "credentials in a URI are refused" in printed["refused input stderr"]
    assert "Traceback" in printed["refused input stderr"]
    # Beam did warn about the options it does not know, masked.
    assert "Discarding unparseable args" in printed["extract stderr"]
    results = pq.read_table(out / "search" / "results.parquet").to_pylist()
    assert results and all(MASK in r["uri"] for r in results if "/signed/" in r["uri"])
    assert "6 new, 0 changed, 0 deleted, 0 unchanged" in printed["reindex stdout"]

    findings = scan_for_secrets([out, scratch, tmp_path / "model-cache"], SECRETS, printed)
    assert not findings, "\n".join(findings)


def test_datasets_fetch_masks_a_signed_mirror(tmp_path, caplog):
    """An interrupted download is retried with a warning naming the URL, and a refused one
    ends in an error naming it: both masked."""
    from official_layouts import ServedFiles, http_server

    from retrieval.datasets.fetch import FetchError, download

    data = os.urandom(4096)
    served = ServedFiles({f"a.bin?sig={MISSING_SIGNATURE}": data}, cut_after=1000)
    caplog.set_level(logging.WARNING)
    with http_server(served) as url:
        path = download(f"{url}/a.bin?sig={MISSING_SIGNATURE}", tmp_path / "a.bin", progress=False)
        assert path.read_bytes() == data
        with pytest.raises(FetchError) as refused:
            download(f"{url}/b.bin?sig={MISSING_SIGNATURE}", tmp_path / "b.bin", progress=False)
    assert "interrupted" in caplog.text
    assert not scan_for_secrets([], SECRETS, {"log": caplog.text, "error": str(refused.value)})


def test_beam_options_warning_is_masked(caplog):
    """Beam's own warnings about options it does not know quote them, values included."""
    from pipelines.beam.options import pipeline_options

    caplog.set_level(logging.WARNING)
    options = pipeline_options(
        1, [f"--aws_secret_access_key={BEAM_SECRET}", "--my_token", BEAM_TOKEN]
    )
    options.get_all_options(display_warnings=True)
    assert "Discarding unparseable args" in caplog.text
    assert not scan_for_secrets([], SECRETS, {"log": caplog.text})


def test_the_scan_finds_what_it_looks_for(tmp_path):
    """A scan that finds nothing proves something only if it would have found a leak: in a
    compressed Parquet column, in its metadata, in raw bytes, in a file name, in printed text."""
    import pyarrow as pa

    secret = "scanMe4Kx9"
    table = pa.table({"uri": [f"https://h/a.jpg?sig={secret}"], "n": [1]})
    pq.write_table(table.replace_schema_metadata({"note": secret}), tmp_path / "a.parquet")
    (tmp_path / "b.json").write_text(json.dumps({"input": secret}))
    (tmp_path / f"c-{secret}").write_bytes(b"")
    found = scan_for_secrets([tmp_path, tmp_path / "missing"], [secret], {"stderr": secret})
    assert set(found) >= set(
        [
            f"{tmp_path / 'a.parquet'} (column uri): {secret!r}",
            f"{tmp_path / 'a.parquet'} (metadata): {secret!r}",
            f"{tmp_path / 'b.json'} (bytes): {secret!r}",
            f"{tmp_path / f'c-{secret}'} (name): {secret!r}",
            f"{tmp_path / 'missing'}: not a folder",
            f"stderr: {secret!r}",
        ]
    )


def test_credentials_in_a_uri_are_refused_before_any_request():
    from retrieval import storage

    for uri in (f"s3://AKIAKEYID:{S3_SECRET}@bucket/x.jpg", f"https://{USER}:{PASSWORD}@h/x.jpg"):
        with pytest.raises(storage.CredentialsInURIError) as refused:
            storage.read_bytes(uri)
        assert not scan_for_secrets([], SECRETS, {"message": str(refused.value)})


def test_a_sealed_uri_opens_only_with_its_runs_key(tmp_path, monkeypatch):
    """What a worker is handed: the masked URI and the sealed one; the key, in memory, opens
    it; a token of another run (another key) is refused, never read as a URI."""
    from cryptography.fernet import Fernet

    from retrieval import redaction
    from retrieval.corpus import SEALED_COLUMN, list_corpus

    real = f"https://h/a.jpg?X-Amz-Signature={AMZ_SIGNATURES[0]}"
    ref = redaction.seal_if_secret(real)
    assert ref[0] == "https://h/a.jpg?X-Amz-Signature=***" and redaction.unseal(ref[1]) == real
    other = Fernet(Fernet.generate_key()).encrypt(real.encode()).decode()
    with pytest.raises(redaction.SealError):
        redaction.unseal(other)
    # A manifest handing over sealed URIs (what `reindex` gives `extract`).
    import pyarrow as pa

    pq.write_table(
        pa.table({"uri": [ref[0], ref[0]], "id": ["a", "b"], SEALED_COLUMN: [ref[1], other]}),
        tmp_path / "m.parquet",
    )
    by_id = {r.id: r for r in list_corpus(str(tmp_path / "m.parquet"))}
    assert by_id["a"].uri == ref[0] and by_id["a"].location == real
    assert by_id["!refused/row-2"].problem.startswith("unsafe_uri: a sealed URI that this run")


def test_secret_options_are_masked_in_any_log_line():
    from retrieval.redaction import RedactingFilter, mask_option_values

    mask_option_values(["--service_token", "optTok7Hn2", f"--db_password={PASSWORD}"])
    record = logging.LogRecord(
        "x",
        logging.WARNING,
        __file__,
        1,
        "args %s then %s",
        (["--x_key=k3yV4lue9"], "optTok7Hn2"),
        None,
    )
    RedactingFilter().filter(record)
    assert record.getMessage() == "args ['--x_key=***'] then ***"
