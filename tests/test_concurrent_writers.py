"""Two runs into one place at once, each the real CLI in its own process, over three rounds:
two ``retrieval reindex`` of different corpora on one root, and two ``retrieval extract`` of
different corpora into one output. A losing run stops with one line naming the other
(``--lease-wait 0``) or waits for it and then succeeds; afterwards ``CURRENT`` names the newest
complete version, every version holds exactly the corpus it says it indexed, no run reported
counts the folders do not hold, and nothing printed a traceback."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import save_tiny_saved_model

from retrieval import corpus_state, storage, versions
from retrieval.index.search import load_index
from retrieval.shards import descriptor_shards

ROUNDS = (0, 600, 0)  # --lease-wait of each round: stop at once, wait, stop at once
HELD = "is being written by another run"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("writers")
    model = save_tiny_saved_model(folder / "tiny")
    corpora = {}
    for name, n, seed in (("a", 12, 1), ("b", 9, 2)):
        corpus = folder / f"corpus-{name}"
        corpus.mkdir()
        for i, data in enumerate(_photos(n, seed)):
            (corpus / f"{name}-{i:02d}.jpg").write_bytes(data)
        corpora[str(corpus)] = sorted(p.name for p in corpus.iterdir())
    flags = ["--backbone", f"savedmodel:{model}", "--image-size", "256", "--runner", "local"]
    flags += ["--workers", "1", "--shard-size", "4"]
    return folder, corpora, flags


def _photos(n: int, seed: int) -> list[bytes]:
    """``n`` 480x640 JPEGs of random blocks and noise: big enough that reading, decoding and
    local features take each run a while, so that the two runs of a round overlap."""
    rng = np.random.default_rng(seed)
    photos = []
    for _ in range(n):
        blocks = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        pixels = np.kron(blocks, np.ones((40, 40, 1), np.uint8)).astype(np.float32)
        pixels = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)
        sink = io.BytesIO()
        Image.fromarray(pixels).save(sink, "JPEG", quality=90)
        photos.append(sink.getvalue())
    return photos


def _run_pair(commands: list[list[str]]) -> list[subprocess.CompletedProcess[str]]:
    """Start every command at once (each ``python -m pipelines.cli ...``), wait for all."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    started = [
        subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", *argv],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv in commands
    ]
    done = []
    for argv, process in zip(commands, started, strict=True):
        out, err = process.communicate(timeout=800)
        done.append(subprocess.CompletedProcess(argv, process.returncode, out, err))
    return done


def _check_outcome(run: subprocess.CompletedProcess[str], place: str) -> bool:
    """True for a run that succeeded; a losing run must have stopped with one line."""
    assert "Traceback" not in run.stderr, run.stderr
    if run.returncode == 0:
        return True
    errors = [line for line in run.stderr.splitlines() if line.startswith("retrieval: error:")]
    assert run.returncode == 2 and len(errors) == 1, (run.returncode, run.stderr[-3000:])
    assert f"{place} {HELD}" in errors[0], errors[0]
    return False


def test_two_reindexes_on_one_root(setup):
    folder, corpora, flags = setup
    root = folder / "root"
    (a, _), (b, _) = corpora.items()
    reported: dict[str, dict[str, int]] = {}
    for wait in ROUNDS:
        argv = ["reindex", "--root", str(root), "--keep", "10", "--lease-wait", str(wait)]
        runs = _run_pair([[*argv, "--corpus", a, *flags], [*argv, "--corpus", b, *flags]])
        winners = [run for run in runs if _check_outcome(run, str(root))]
        assert winners, [r.stderr[-2000:] for r in runs]
        if wait:
            assert len(winners) == 2  # the second waited for the first, then succeeded
        for run in winners:
            line = run.stdout.strip().splitlines()[-1]
            match = re.match(r"(v\d{6}): (\d+) new, (\d+) changed, (\d+) deleted, (\d+) unch", line)
            assert match, run.stdout
            name = match.group(1)
            assert name not in reported, f"two runs reported {name}"
            counts = map(int, match.groups()[1:])
            reported[name] = dict(
                zip(("new", "changed", "deleted", "unchanged"), counts, strict=True)
            )

    complete = versions.versions(str(root))
    assert sorted(reported) == complete  # every success is a version of its own, and only they
    assert versions.current(str(root)) == complete[-1]  # the newest, never moved back
    for name in complete:
        vdir = versions.version_dir(str(root), name)
        summary = storage.read_json(storage.join(vdir, "summary.json"))
        wanted = corpora[summary["corpus"]]
        assert {k: summary[k] for k in reported[name]} == reported[name]  # what it printed
        state = corpus_state.iter_state_file(str(Path(vdir) / corpus_state.STATE_FILE))
        assert sorted(row[0] for row in state) == wanted
        ids, _, _ = descriptor_shards.read_all(storage.join(vdir, "descriptors"))
        assert sorted(ids) == wanted
        assert sorted(load_index(storage.join(vdir, "index")).ids) == wanted
        record = json.loads((Path(vdir) / "version.json").read_text())
        assert record["indexed"] == summary["indexed"] == len(wanted)
    assert not [n for n in os.listdir(root / "versions") if n not in complete]  # none left half


def test_two_extracts_of_different_corpora_into_one_output(setup):
    folder, corpora, flags = setup
    out, local = folder / "desc", folder / "local"
    (a, _), (b, _) = corpora.items()
    for wait in ROUNDS:
        argv = ["extract", "--output", str(out), "--local-output", str(local)]
        argv += ["--lease-wait", str(wait), *flags]
        runs = _run_pair([[*argv, "--input", a], [*argv, "--input", b]])
        winners = {}
        for corpus, run in zip((a, b), runs, strict=True):
            if _check_outcome(run, str(out)):
                winners[corpus] = run
                counts = re.match(r"(\d+) inputs = (\d+) indexed \+ (\d+) failed", run.stdout)
                assert counts and int(counts.group(1)) == len(corpora[corpus]), run.stdout
        assert winners and (len(winners) == 2 or not wait)
        # The folders hold exactly the corpus of the run that wrote them last, as it said.
        summary = storage.read_json(str(out / "summary.json"))
        assert summary["input"] in winners
        wanted = corpora[summary["input"]]
        last = winners[summary["input"]].stdout
        assert last.startswith(f"{len(wanted)} inputs = {summary['indexed']} indexed")
        ids, _, _ = descriptor_shards.read_all(str(out))
        assert (
            sorted(ids)
            == wanted
            == sorted(
                i for m in descriptor_shards.list_shards(str(out)) for i in _local_ids(local, m)
            )
        )


def _local_ids(local: Path, manifest: dict) -> list[str]:
    from retrieval.shards import local_feature_shards

    listed = {m["shard"]: m for m in local_feature_shards.list_shards(str(local))}
    return listed[manifest["shard"]]["ids"]
