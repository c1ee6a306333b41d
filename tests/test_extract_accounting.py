"""The extract stage on a folder of real and broken files: every input is accounted for, re-runs
skip committed shards, and the Beam runner gives the same descriptors as the local loop."""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import stages
from pipelines.config import RunConfig
from retrieval import backbones
from retrieval import shard_manifests as manifests
from retrieval.descriptors import gem
from retrieval.shards import descriptor_shards

CONFIG = RunConfig(runner="local", workers=1, threads_per_worker=2, shard_size=4)

# uri (relative to the corpus) -> (stage, error_kind) of the inputs that must fail.
EXPECTED_ERRORS = {
    "empty.jpg": ("decode", "empty_file"),
    "truncated.jpg": ("decode", "truncated"),
    "notes.jpg": ("decode", "not_an_image"),
    "pixel.png": ("decode", "too_small"),
    "bomb.png": ("decode", "too_large"),
}


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def _encode(image: Image.Image, fmt: str) -> bytes:
    sink = io.BytesIO()
    image.save(sink, fmt)
    return sink.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, oxford_images) -> tuple[Path, list[str]]:
    """A folder of real photos (symlinked) and broken files; returns it and the ids to index."""
    folder = tmp_path_factory.mktemp("corpus")
    real = oxford_images[:7]
    for src in real[:5]:
        (folder / src.name).symlink_to(src)
    (folder / "sub").mkdir()
    (folder / "sub" / "inner.jpg").symlink_to(real[5])
    (folder / "dup.jpg").symlink_to(real[6])
    (folder / "dup.png").write_bytes(_encode(Image.new("RGB", (64, 64), "blue"), "PNG"))
    (folder / "empty.jpg").write_bytes(b"")
    data = real[0].read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "notes.jpg").write_text("<html>not an image</html>\n")
    (folder / "pixel.png").write_bytes(_encode(Image.new("RGB", (1, 1), "red"), "PNG"))
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    (folder / "bomb.png").write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )
    (folder / "cmyk.jpg").write_bytes(
        _encode(Image.new("CMYK", (96, 64), (0, 200, 200, 10)), "JPEG")
    )
    (folder / "readme.txt").write_text("not listed: no image suffix\n")
    # dup.jpg and dup.png differ only in extension: two images, two ids.
    ids = sorted([p.name for p in real[:5]] + ["sub/inner.jpg", "dup.jpg", "dup.png", "cmyk.jpg"])
    return folder, ids


@pytest.fixture(scope="module")
def default_model(default_backbone):
    """Every extractor built from the default spec in this process reuses the session's model."""
    real = backbones.load_backbone
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            gem,
            "load_backbone",
            lambda spec=backbones.DEFAULT_BACKBONE: (
                default_backbone if spec == backbones.DEFAULT_BACKBONE else real(spec)
            ),
        )
        yield default_backbone


@pytest.fixture(scope="module")
def local_run(corpus, default_model, tmp_path_factory):
    folder, _ = corpus
    out = tmp_path_factory.mktemp("desc-local")
    summary = stages.extract(str(folder), str(out), CONFIG)
    return out, summary


def _files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.suffix in (".jpg", ".png"))


def _errors(out: Path) -> dict[str, tuple[str, str]]:
    found = {}
    for manifest in descriptor_shards.list_shards(str(out)):
        for e in descriptor_shards.read_errors(str(out), manifest):
            found[os.path.basename(e.uri)] = (e.stage, e.error_kind)
    return found


def test_every_input_is_accounted_for(corpus, local_run):
    folder, ids = corpus
    out, summary = local_run
    n = _files(folder)
    assert n == 14
    assert summary["inputs"] == summary["indexed"] + summary["failed"] == n
    assert summary["indexed"] == len(ids) == 9
    assert summary["failed"] == len(EXPECTED_ERRORS)
    assert summary["shards"] == 4 and summary["shards_skipped"] == 0
    assert summary["failures_by_kind"] == {k: 1 for _, k in EXPECTED_ERRORS.values()}
    assert (out / "summary.json").exists()

    assert _errors(out) == EXPECTED_ERRORS
    got_ids, uris, vectors = descriptor_shards.read_all(str(out))
    assert sorted(got_ids) == ids
    assert "sub/inner.jpg" in got_ids
    assert os.path.basename(uris[got_ids.index("dup.png")]) == "dup.png"
    assert vectors.shape == (9, 1280) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    total = 0
    for manifest in descriptor_shards.list_shards(str(out)):
        assert manifest["inputs"] == manifest["rows"] + manifest["errors"]
        total += manifest["inputs"]
    assert total == n


def test_rerun_skips_committed_shards_and_redoes_a_missing_one(local_run, corpus, tmp_path):
    folder, _ = corpus
    out = tmp_path / "desc"
    shutil.copytree(local_run[0], out)

    def stamps() -> dict[str, int]:
        # What a run records about itself, not data: its summary and its lease (_lease/).
        return {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "_lease"}

    before = stamps()
    again = stages.extract(str(folder), str(out), CONFIG)
    assert again["shards_skipped"] == again["shards"] == 4
    assert again["inputs"] == again["indexed"] + again["failed"] == 14
    assert again["timings"]["extract_s"] < 1.0
    after = stamps()
    assert {k: v for k, v in after.items() if k != "summary.json"} == {
        k: v for k, v in before.items() if k != "summary.json"
    }

    (out / "part-00001.manifest.json").unlink()
    redo = stages.extract(str(folder), str(out), CONFIG)
    assert redo["shards_skipped"] == 3
    assert redo["inputs"] == redo["indexed"] + redo["failed"] == 14
    changed = {k for k, v in stamps().items() if before.get(k) != v}
    assert changed == {
        "part-00001.manifest.json",
        "part-00001.parquet",
        "part-00001.errors.parquet",
        "summary.json",
    }
    assert manifests.read(str(out), "part-00001") is not None
    ids_a, _, vectors_a = descriptor_shards.read_all(str(local_run[0]))
    ids_b, _, vectors_b = descriptor_shards.read_all(str(out))
    assert ids_a == ids_b
    np.testing.assert_allclose(vectors_a, vectors_b, atol=1e-6)


def test_beam_runner_matches_local(corpus, local_run, tmp_path):
    folder, _ = corpus
    out = tmp_path / "desc-beam"
    summary = stages.extract(str(folder), str(out), replace(CONFIG, runner="beam", workers=1))
    local_summary = local_run[1]
    for key in ("inputs", "indexed", "failed", "shards", "failures_by_kind"):
        assert summary[key] == local_summary[key], key
    assert _errors(out) == EXPECTED_ERRORS

    ids_l, uris_l, vectors_l = descriptor_shards.read_all(str(local_run[0]))
    ids_b, uris_b, vectors_b = descriptor_shards.read_all(str(out))
    assert ids_b == ids_l and uris_b == uris_l
    np.testing.assert_allclose(vectors_b, vectors_l, atol=1e-4)
    for local_m, beam_m in zip(
        descriptor_shards.list_shards(str(local_run[0])),
        descriptor_shards.list_shards(str(out)),
        strict=True,
    ):
        assert beam_m["shard"] == local_m["shard"]
        assert beam_m["input_digest"] == local_m["input_digest"]
        assert (beam_m["rows"], beam_m["errors"]) == (local_m["rows"], local_m["errors"])


def test_beam_graph_carries_shards_not_images(corpus, default_model, tmp_path):
    """Beam's local runner keeps every PCollection's elements, and a GroupByKey's whole table,
    in the launcher process until the next stage has run: a PCollection with one element per
    image (an image reference, a decoded image, a descriptor row) makes the launcher's memory
    grow with the corpus (measured: benchmarks/load.py). The extraction's PCollections carry at
    most one element per shard; the rows never leave the worker that makes them."""
    import apache_beam as beam
    from apache_beam.metrics import monitoring_infos

    from pipelines.beam.options import pipeline_options
    from pipelines.runners.beam import build_map
    from pipelines.stages import ExtractShards
    from retrieval.extraction import ShardJob, plan_extraction
    from retrieval.runtimes.device import plan_worker

    folder, _ = corpus
    out = tmp_path / "desc"
    info = gem.model_info(CONFIG.gem)
    plan = plan_extraction(str(folder), str(out), info, shard_size=CONFIG.shard_size)
    assert (plan.inputs, len(plan.pending_ids)) == (14, 4)
    pipeline = beam.Pipeline(options=pipeline_options(1))
    worker = plan_worker("cpu", workers=1, threads=2)
    build_map(
        pipeline,
        ExtractShards(ShardJob(str(out), CONFIG.gem, info, CONFIG.limits, worker)),
        plan.pending_ids,
    )
    result = pipeline.run()
    result.wait_until_finish()
    counts: dict[str, int] = {}
    for mi in result.monitoring_infos():
        if mi.urn == monitoring_infos.ELEMENT_COUNT_URN:
            pcoll = mi.labels[monitoring_infos.PCOLLECTION_LABEL]
            counts[pcoll] = max(counts.get(pcoll, 0), monitoring_infos.extract_counter_value(mi))
    assert len(counts) >= 3, counts  # the runner reported the graph's PCollections
    assert max(counts.values()) == 4, counts  # one element per shard at most, never 14
    assert sum(m["inputs"] for m in descriptor_shards.list_shards(str(out))) == 14


def test_beam_workers_as_threads_match_local(corpus, local_run, tmp_path):
    """``--direct_running_mode=multi_threading`` (asked for in beam_args) runs two workers as
    threads of one process; each has its own model (a LiteRT interpreter must not be shared by
    threads), and the result equals the local loop's."""
    from pipelines.beam.options import pipeline_options

    args = "--direct_running_mode=multi_threading"
    assert pipeline_options(2, args).get_all_options()["direct_running_mode"] == "multi_threading"
    assert pipeline_options(2).get_all_options()["direct_running_mode"] == "multi_processing"
    folder, _ = corpus
    out = tmp_path / "desc-threads"
    config = replace(CONFIG, runner="beam", workers=2, beam_args=(args,))
    summary = stages.extract(str(folder), str(out), config)
    for key in ("inputs", "indexed", "failed", "shards", "failures_by_kind"):
        assert summary[key] == local_run[1][key], key
    ids_l, _, vectors_l = descriptor_shards.read_all(str(local_run[0]))
    ids_t, _, vectors_t = descriptor_shards.read_all(str(out))
    assert ids_t == ids_l
    np.testing.assert_allclose(vectors_t, vectors_l, atol=1e-4)


def test_spark_runner_matches_local(spark, corpus, local_run, tmp_path):
    """Broken files through Spark: the same error rows, accounting and descriptors as the loop."""
    folder, _ = corpus
    out = tmp_path / "desc-spark"
    summary = stages.extract(str(folder), str(out), replace(CONFIG, runner="spark", workers=2))
    local_summary = local_run[1]
    for key in ("inputs", "indexed", "failed", "shards", "failures_by_kind"):
        assert summary[key] == local_summary[key], key
    assert _errors(out) == EXPECTED_ERRORS

    ids_l, uris_l, vectors_l = descriptor_shards.read_all(str(local_run[0]))
    ids_s, uris_s, vectors_s = descriptor_shards.read_all(str(out))
    assert ids_s == ids_l and uris_s == uris_l
    np.testing.assert_allclose(vectors_s, vectors_l, atol=1e-5)
    for local_m, spark_m in zip(
        descriptor_shards.list_shards(str(local_run[0])),
        descriptor_shards.list_shards(str(out)),
        strict=True,
    ):
        assert (spark_m["shard"], spark_m["input_digest"]) == (
            local_m["shard"],
            local_m["input_digest"],
        )
        assert (spark_m["rows"], spark_m["errors"]) == (local_m["rows"], local_m["errors"])
