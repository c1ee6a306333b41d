"""Index at scale: this project's build vs autofaiss, same vectors, same memory budget, one run.

    python benchmarks/index_scale.py [--n 1000000] [--budget 100M] [--autofaiss-python V/bin/python]

* vectors: ``--n`` database vectors + 1,000 held-out queries at the stored dimension, drawn to
  resemble real descriptors: each is a random mix of two real GeM descriptors of oxford-dev
  (extracted with the default model, or read from ``--base``) plus Gaussian noise, L2-normalized.
  They are written once as descriptor shards (what ``retrieval extract`` writes) and as ``.npy``
  files (what autofaiss reads).
* project: ``train`` (index type from ``--max-index-memory``) -> ``index`` (groups of shards) ->
  ``merge`` (tree of fan-in 8), in a fresh subprocess: wall time and peak RSS.
* autofaiss: ``build_index`` with ``max_index_memory_usage`` = the same budget, in its own venv
  (it needs numpy<2; see the shared stack notes), in a fresh subprocess: wall time and peak RSS.
* both indexes: bytes on disk, bytes per vector, recall@1 (the exact nearest neighbour ranked
  first) and recall@10 (|top-10 ∩ exact top-10| / 10) against exact inner-product search,
  queries/s for single queries and for one batch of 1,000.
* driver memory: peak RSS of the extraction launcher (listing + planning only, no images read)
  on a 10k- and a 1M-entry manifest (CSV and Parquet).
* merge memory: peak RSS of ``merge`` (8 groups, fan-in 2) against the index it writes, on 20k
  and 1M vectors (``--memory-only`` runs just these two checks).

* 10M where the machine cannot hold it: ``--extrapolate A.json B.json [...]`` builds nothing; it
  fits each tool's growth between its two largest runs (e.g. 1M and 3M) as a power of n and
  writes the predicted figures at ``--to`` vectors (``index_scale_extrapolated.json``).

Writes ``benchmarks/results/index_scale.json`` (figures and ratios). Slow: minutes to hours on
2 cores at 1M; ``--n 20000 --skip-autofaiss`` is the quick smoke run. The two builds can run in
two invocations on one ``--workdir`` and be compared in one JSON with ``--reuse``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OXFORD = REPO.parent / "shared" / "benchmarks" / "oxford-dev" / "images"
NOISE = 0.3  # norm of the noise added to each mix of two real descriptors
CHUNK = 50_000  # vectors per descriptor shard / .npy file
# Both tools' builds run under the same environment. Waiting OpenMP threads sleep instead of
# spinning (what ``retrieval`` sets for itself, see retrieval/__init__.py): on a shared machine a
# spinning faiss thread waits for one that is descheduled, which made OPQ training 8x slower here.
CHILD_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "OMP_WAIT_POLICY": "PASSIVE"}


PEAK_FOOTER = """
import json as _json
with open("/proc/self/status") as _status:
    _kb = next(int(line.split()[1]) for line in _status if line.startswith("VmHWM"))
print(_json.dumps({"peak_rss_mb": round(_kb / 1024, 1)}))
"""


def _search_child(code: str, *args: str, python: str = sys.executable) -> dict:
    return {f"search_{k}" if k in ("peak_rss_mb", "wall_s", "cpu_s") else k: v
            for k, v in _child(code, *args, python=python).items()}  # fmt: skip


def _child(code: str, *args: str, python: str = sys.executable) -> dict:
    """Run ``code`` in a fresh interpreter; its last stdout line is JSON. Adds that process's
    own peak RSS (MB: ``VmHWM`` of its memory map, read at its end; ``ru_maxrss`` would include
    this parent's size, inherited through fork) and its wall time."""
    code = textwrap.dedent(code) + PEAK_FOOTER
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [python, "-c", code, *args],
            stdout=out,
            stderr=err,
            cwd=REPO,
            env={**os.environ, **CHILD_ENV},
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"child failed:\n{err.read()[-3000:]}")
        lines = out.read().strip().splitlines()
        result = {**json.loads(lines[-2]), **json.loads(lines[-1])}
    result["wall_s"] = round(wall, 2)
    # CPU seconds (user + system, all threads): on a shared machine the fairer measure of work
    # done, since wall time also counts the time other people's processes held the cores.
    result["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 2)
    return result


def base_descriptors(base: str | None, scratch: Path) -> np.ndarray:
    from retrieval.shards import descriptor_shards

    if base is None:
        base = str(scratch / "base")
        subprocess.run(
            [sys.executable, "-m", "pipelines.cli", "extract", "--input", str(OXFORD),
             "--output", base, "--runner", "local"],
            check=True, cwd=REPO,
        )  # fmt: skip
    _, _, vectors = descriptor_shards.read_all(base)
    return vectors


def _cached_base(scratch: Path) -> str | None:
    """A descriptor folder extracted by an earlier run in the same --workdir, if any."""
    return str(scratch / "base") if (scratch / "base" / "plan.json").exists() else None


def draw(base: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    i, j = rng.integers(0, len(base), n), rng.integers(0, len(base), n)
    w = rng.random((n, 1), dtype=np.float32)
    x = w * base[i] + (1 - w) * base[j]
    noise = rng.standard_normal(x.shape, dtype=np.float32)
    x += NOISE * noise / np.sqrt(x.shape[1])
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_vectors(base: np.ndarray, n: int, scratch: Path, seed: int) -> tuple[Path, Path]:
    """Database vectors as descriptor shards (+ plan) and as .npy chunks; returns both folders."""
    from retrieval import plan
    from retrieval.corpus import ImageRef, ShardSpec
    from retrieval.shards import descriptor_shards
    from retrieval.shards.descriptor_shards import DescriptorRow

    rng = np.random.default_rng(seed)
    desc, npy = scratch / "descriptors", scratch / "npy"
    npy.mkdir(parents=True)
    d = base.shape[1]
    info = {"id": "bench", "config_hash": "b" * 16, "weights_sha256": "0" * 64, "dim": d}
    specs = []
    for c, start in enumerate(range(0, n, CHUNK)):
        x = draw(base, min(CHUNK, n - start), rng)
        np.save(npy / f"part-{c:05d}.npy", x)
        ids = [f"v{start + k:09d}" for k in range(len(x))]
        spec = ShardSpec(f"part-{c:05d}", tuple(ImageRef(i, f"/v/{i}") for i in ids))
        rows = [DescriptorRow(i, f"/v/{i}", "0" * 64, 1, 1, v) for i, v in zip(ids, x, strict=True)]
        descriptor_shards.write_shard(str(desc), spec, rows, [], info)
        specs.append(spec)
    plan.write_extraction_plan(str(desc), specs, source="bench", shard_size=CHUNK)
    return desc, npy


def exact_top10(npy: Path, queries: np.ndarray) -> np.ndarray:
    """Exact inner-product top-10 of every query, streaming the database chunks from disk."""
    import faiss

    best_d = np.full((len(queries), 10), -np.inf, np.float32)
    best_i = np.full((len(queries), 10), -1, np.int64)
    offset = 0
    for path in sorted(npy.glob("*.npy")):
        x = np.load(path)
        d, i = faiss.knn(queries, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
        best_d, best_i = faiss.merge_knn_results(
            np.stack([best_d, d]), np.stack([best_i, i + offset]), keep_max=True
        )
        offset += len(x)
    return best_i


def recall(found: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    r1 = float(np.mean(found[:, 0] == truth[:, 0]))
    r10 = float(
        np.mean([len(set(f[:10]) & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
    )
    return {"recall@1": round(r1, 4), "recall@10": round(r10, 4)}


PROJECT_BUILD = """
import json, sys, time
from pipelines import stages
from pipelines.config import RunConfig
desc, root, budget, factory = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
config = RunConfig(runner="local", max_index_memory=budget, index_factory=factory)
t = time.perf_counter()
cb = stages.train(desc, root + "/codebook", config)
t1 = time.perf_counter()
stages.index(desc, root + "/codebook", root + "/groups", config)
t2 = time.perf_counter()
m = stages.merge(root + "/groups", root + "/index", config)
t3 = time.perf_counter()
print(json.dumps({"factory": cb["factory"], "train_s": t1 - t, "index_s": t2 - t1,
                  "merge_s": t3 - t2, "build_s": t3 - t, "bytes": m["bytes"]}))
"""

# Queries/s of an index loaded as ``index`` (batched, then one query at a time), the found ids
# saved for recall; shared by both search children (the autofaiss one runs in its own venv,
# so it cannot import this module's code, only be given its text).
TIMED_SEARCH = """
q = np.load(sys.argv[2])
t = time.perf_counter(); _, found = index.search(q, 10); batch = time.perf_counter() - t
t = time.perf_counter()
for row in q[:200]:
    index.search(row[None], 10)
single = time.perf_counter() - t
np.save(sys.argv[3], found)
print(json.dumps({"qps_batch": len(q) / batch, "qps_single": 200 / single}))
"""

PROJECT_SEARCH = (
    """
import json, sys, time
import numpy as np
from retrieval.index.search import load_index
index = load_index(sys.argv[1])
"""
    + TIMED_SEARCH
)

AUTOFAISS_BUILD = """
import json, sys, time
from autofaiss import build_index
npy, out, budget = sys.argv[1], sys.argv[2], sys.argv[3]
t = time.perf_counter()
_, infos = build_index(embeddings=npy, index_path=out + "/knn.index",
                       index_infos_path=out + "/infos.json", max_index_memory_usage=budget,
                       current_memory_available="16G", metric_type="ip", verbose=30)
print(json.dumps({"build_s": time.perf_counter() - t, "factory": infos.get("index_key")}))
"""

AUTOFAISS_SEARCH = (
    """
import json, sys, time
import faiss, numpy as np
index = faiss.read_index(sys.argv[1])
"""
    + TIMED_SEARCH
)

PLANNING = """
import json, sys
from retrieval.extraction import plan_extraction
info = {"id": "x", "config_hash": "c" * 16, "weights_sha256": "0" * 64, "dim": 8}
plan = plan_extraction(sys.argv[1], sys.argv[2], info)
print(json.dumps({"shards": len(plan.shards), "pending": len(plan.pending)}))
"""


MANIFEST_ROW_GROUP = 65_536  # rows per row group of the benchmark's Parquet manifests


def _write_manifest(path: Path, n: int, row_group_size: int | None) -> None:
    """A manifest of ``n`` gs:// URIs in shuffled order (the planner must sort it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    order = np.random.default_rng(n).permutation(n)
    uris = pa.array([f"gs://bucket/photos/{i:08d}.jpg" for i in order])
    if path.suffix == ".csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(pa.table({"uri": uris}), path)
    else:
        pq.write_table(pa.table({"uri": uris}), path, row_group_size=row_group_size)


def driver_memory(scratch: Path, sizes: tuple[int, ...] = (10_000, 1_000_000)) -> dict:
    """Peak RSS of the extraction launcher (listing + external sort + plan written, no images)
    for manifests of each size: CSV, Parquet in row groups of 65,536 rows, and (largest size
    only) Parquet as ``pq.write_table`` writes it by default (one row group of up to 1Mi rows:
    a Parquet reader decodes a whole row group at once, so that row group is held)."""
    out: dict = {}
    small, big = min(sizes), max(sizes)
    cases = [(fmt, n, MANIFEST_ROW_GROUP) for fmt in ("csv", "parquet") for n in sizes]
    cases.append(("parquet-one-row-group", big, None))
    for fmt, n, row_group in cases:
        suffix = ".csv" if fmt == "csv" else ".parquet"
        manifest = scratch / f"manifest-{fmt}-{n}{suffix}"
        if not manifest.exists():
            _write_manifest(manifest, n, row_group)
        result = _child(PLANNING, str(manifest), str(scratch / f"plan-{fmt}-{n}"))
        out.setdefault(fmt, {})[str(n)] = result
    for fmt, runs in out.items():
        first = out["parquet" if fmt == "parquet-one-row-group" else fmt][str(small)]
        runs["growth_ratio"] = round(runs[str(big)]["peak_rss_mb"] / first["peak_rss_mb"], 3)
    return out


MERGE_CHILD = """
import json, sys
def _rss(key):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key)) / 1024
from retrieval.index.merge import merge_index_groups
start = _rss("VmRSS")
m = merge_index_groups(sys.argv[1], sys.argv[2], fan_in=int(sys.argv[3]),
                       on_disk=sys.argv[4] == "1", stream_codes=sys.argv[5] == "1")
print(json.dumps({"start_rss_mb": round(start, 1), "index_bytes": m["bytes"]}))
"""


# (on_disk, stream_codes): the merge as it runs (codes copied file to file, list by list) and,
# side by side, folding every input into one in-memory index (``stream_codes=False``: how the
# merge worked before, and what faiss's ``merge_from`` / ``merge_ondisk`` do).
MERGE_MODES = {
    "in_ram": ("0", "1"),
    "on_disk": ("1", "1"),
    "in_ram_folded": ("0", "0"),
    "on_disk_folded": ("1", "0"),
}


def merge_memory(scratch: Path, sizes: tuple[int, ...] = (20_000, 1_000_000)) -> dict:
    """:func:`merge_memory_at` for each size, and the growth between the smallest and largest:
    extra peak memory per extra byte of index (the fixed cost of a merge process, Python +
    faiss + Arrow and their first use, does not depend on the index and cancels out)."""
    out: dict = {str(n): merge_memory_at(scratch, n) for n in sizes}
    small, big = out[str(min(sizes))], out[str(max(sizes))]
    for mode in MERGE_MODES:
        extra_peak = (big[mode]["peak_rss_mb"] - small[mode]["peak_rss_mb"]) * 2**20
        extra_index = big[mode]["index_bytes"] - small[mode]["index_bytes"]
        out[f"{mode}_peak_growth_over_index_growth"] = round(extra_peak / extra_index, 2)
    return out


def merge_memory_at(scratch: Path, n: int, d: int = 32, groups: int = 8) -> dict:
    """Peak memory of ``retrieval merge`` against the size of the index it writes.

    ``n`` random ``d``-dim vectors with realistic ids and URIs (``photos/01234/IMG_….jpg``,
    ``gs://bucket/…``) as descriptor shards, an ``IVF256,PQ16`` codebook, ``groups`` index
    groups, merged with fan-in 2 (a tree of 3 rounds) in a fresh process, in RAM and on disk.
    Peak = that process's VmHWM; "above start" subtracts its RSS after imports (Python, faiss,
    Arrow), which does not depend on the index.
    """
    from retrieval.corpus import ImageRef, ShardSpec
    from retrieval.index.codebook import train_codebook
    from retrieval.index.group_index import build_index_groups
    from retrieval.shards import descriptor_shards
    from retrieval.shards.descriptor_shards import DescriptorRow

    root = scratch / f"merge-{n}"
    desc = root / "descriptors"
    if not (root / "groups" / "plan.json").exists():
        from retrieval import plan

        rng = np.random.default_rng(0)
        info = {"id": "bench", "config_hash": "b" * 16, "weights_sha256": "0" * 64, "dim": d}
        specs = []
        for c, start in enumerate(range(0, n, CHUNK)):
            x = rng.standard_normal((min(CHUNK, n - start), d), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            ids = [f"photos/{i // 1000:05d}/IMG_{i:08d}.jpg" for i in range(start, start + len(x))]
            refs = tuple(ImageRef(i, f"gs://bucket/{i}") for i in ids)
            spec = ShardSpec(f"part-{c:05d}", refs)
            rows = [
                DescriptorRow(r.id, r.uri, "0" * 64, 640, 480, v)
                for r, v in zip(refs, x, strict=True)
            ]
            descriptor_shards.write_shard(str(desc), spec, rows, [], info)
            specs.append(spec)
        plan.write_extraction_plan(str(desc), specs, source="bench", shard_size=CHUNK)
        train_codebook(str(desc), str(root / "codebook"), factory="IVF256,PQ16", sample_size=20_000)
        build_index_groups(
            str(desc), str(root / "codebook"), str(root / "groups"), group_vectors=-(-n // groups)
        )
    out: dict = {"n": n, "dim": d, "factory": "IVF256,PQ16", "groups": groups, "fan_in": 2}
    for name, (on_disk, stream) in MERGE_MODES.items():
        target = root / f"index-{name}"
        result = _child(MERGE_CHILD, str(root / "groups"), str(target), "2", on_disk, stream)
        files = {f.name: f.stat().st_size for f in target.iterdir() if f.is_file()}
        result["idmap_bytes"] = files.get("idmap.parquet", 0)
        result["above_start_mb"] = round(result["peak_rss_mb"] - result["start_rss_mb"], 1)
        index_mb = result["index_bytes"] / 2**20
        result["above_start_over_index"] = round(result["above_start_mb"] / index_mb, 2)
        with_idmap_mb = (result["index_bytes"] + result["idmap_bytes"]) / 2**20
        result["above_start_over_index_and_idmap"] = round(
            result["above_start_mb"] / with_idmap_mb, 2
        )
        out[name] = result
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--budget", default="100M", help="index memory budget for both tools")
    parser.add_argument(
        "--base", help="descriptor folder of real GeM descriptors (else oxford-dev)"
    )
    parser.add_argument("--autofaiss-python", help="python of a venv with autofaiss installed")
    parser.add_argument(
        "--reuse",
        action="append",
        default=[],
        metavar="JSON",
        help="take a tool's figures from this earlier JSON of a run in the same --workdir (same "
        "vectors, queries and budget) for each tool this run skips (--skip-project, "
        "--skip-autofaiss): the two builds can run one after the other and still be compared; "
        "repeatable",
    )
    parser.add_argument(
        "--project-factory",
        default="auto",
        help="the project's faiss factory string (default auto: chosen from --budget, as "
        "`retrieval train --max-index-memory` does); to compare index types at one budget",
    )
    parser.add_argument("--skip-autofaiss", action="store_true")
    parser.add_argument("--skip-project", action="store_true")
    parser.add_argument("--skip-driver-check", action="store_true")
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="only the launcher and merge memory checks (writes index_scale_memory.json)",
    )
    parser.add_argument(
        "--driver-only",
        action="store_true",
        help="only the launcher check (listing + planning of 10k and 1M entries: peak memory, "
        "wall and CPU seconds; writes index_scale_driver.json)",
    )
    parser.add_argument(
        "--extrapolate",
        nargs="+",
        metavar="JSON",
        help="no build: fit each tool's growth between its two largest runs among these JSONs "
        "(e.g. 1M and 3M) and predict its figures at --to vectors (writes "
        "index_scale_extrapolated.json)",
    )
    parser.add_argument("--to", type=int, default=10_000_000, help="with --extrapolate")
    parser.add_argument("--workdir", help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "index_scale.json"))
    args = parser.parse_args()

    from retrieval.index.factory import parse_bytes

    budget = parse_bytes(args.budget)
    if args.extrapolate:
        runs = [json.loads(Path(path).read_text()) for path in args.extrapolate]
        fitted = extrapolate(runs, args.to)
        fitted["runs"] = args.extrapolate
        out = Path(args.out).with_name("index_scale_extrapolated.json")
        out.write_text(json.dumps(fitted, indent=2) + "\n")
        print(json.dumps(fitted, indent=2))
        return
    scratch = Path(args.workdir or tempfile.mkdtemp(prefix="index-scale-"))
    scratch.mkdir(parents=True, exist_ok=True)
    if args.driver_only:
        driver = {"driver_memory": driver_memory(scratch), "load_average": os.getloadavg()}
        Path(args.out).with_name("index_scale_driver.json").write_text(
            json.dumps(driver, indent=2) + "\n"
        )
        print(json.dumps(driver, indent=2))
        return
    if args.memory_only:
        memory = {"driver_memory": driver_memory(scratch), "merge_memory": merge_memory(scratch)}
        out = Path(args.out).with_name("index_scale_memory.json")
        out.write_text(json.dumps(memory, indent=2) + "\n")
        print(json.dumps(memory, indent=2))
        return
    result: dict = {
        "n": args.n,
        "queries": args.queries,
        "budget_bytes": budget,
        "noise": NOISE,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "note": "shared 2-core machine: timings are noisy",
        "child_env": CHILD_ENV,
        "workdir": str(scratch),
    }
    base = base_descriptors(args.base or _cached_base(scratch), scratch)
    result["dim"] = int(base.shape[1])
    result["base_descriptors"] = len(base)
    t = time.perf_counter()
    desc, npy = _cached_vectors(scratch, args.n) or write_vectors(base, args.n, scratch, seed=0)
    queries = draw(base, args.queries, np.random.default_rng(1))
    np.save(scratch / "queries.npy", queries)
    result["write_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    truth = exact_top10(npy, queries)
    result["exact_search_s"] = round(time.perf_counter() - t, 1)
    result["load_average_before"] = [round(v, 2) for v in os.getloadavg()]
    if not args.skip_project:
        result["project"] = project_build(
            scratch, desc, budget, args.n, truth, args.project_factory
        )
        result["load_average_after_project"] = [round(v, 2) for v in os.getloadavg()]
    for path in args.reuse:
        earlier = json.loads(Path(path).read_text())
        if (earlier["n"], earlier["budget_bytes"]) != (args.n, budget) or earlier.get(
            "workdir", str(scratch)
        ) != str(scratch):
            raise SystemExit(f"{path} is not a run on these vectors and budget")
        for tool, skipped in (("project", args.skip_project), ("autofaiss", args.skip_autofaiss)):
            if skipped and tool in earlier:
                result[tool] = {**earlier[tool], "from": path}
    if "autofaiss" in result:
        infos = json.loads((scratch / "autofaiss" / "infos.json").read_text())
        result["autofaiss"].setdefault("search_params", infos.get("index_param"))
    if not args.skip_autofaiss:
        if not args.autofaiss_python:
            raise SystemExit("--autofaiss-python is required (or --skip-autofaiss)")
        result["autofaiss"] = autofaiss_build(
            scratch, npy, args.budget, args.n, truth, args.autofaiss_python
        )
        result["load_average_after_autofaiss"] = [round(v, 2) for v in os.getloadavg()]
    if "project" in result and "autofaiss" in result:
        project, auto = result["project"], result["autofaiss"]
        result["ratios"] = {
            "build_time_project_over_autofaiss": round(project["build_s"] / auto["build_s"], 3),
            "build_cpu_project_over_autofaiss": round(project["cpu_s"] / auto["cpu_s"], 3),
            "recall@10_project_minus_autofaiss": round(project["recall@10"] - auto["recall@10"], 4),
            "bytes_project_over_autofaiss": round(project["bytes"] / auto["bytes"], 3),
        }
    if not args.skip_driver_check:
        result["driver_memory"] = driver_memory(scratch)
        result["merge_memory"] = merge_memory(scratch)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


# build_s is the sum of the project's train_s, index_s and merge_s, fitted each on its own too.
GROWTH_METRICS = (
    "build_s", "train_s", "index_s", "merge_s", "cpu_s", "peak_rss_mb", "bytes",
    "search_peak_rss_mb",
)  # fmt: skip


def extrapolate(runs: list[dict], to: int) -> dict:
    """Each tool's figures at ``to`` vectors, from its two largest runs among ``runs``: every
    metric of GROWTH_METRICS is taken to grow as a power of n, m(n) = m(n1) * (n / n1) ** b, with
    b fitted on those two runs (b = 1: linear). Recall is not extrapolated (it depends on the
    bytes per vector the budget allows, not on n alone); the runs' budgets per vector are listed,
    so a fit across different ones can be seen for what it is."""
    import math

    out: dict = {
        "to": to,
        "method": "each metric a power of n fitted on the tool's two largest runs: "
        "m(n) = m(n1) * (n / n1) ** exponent; recall not extrapolated",
    }
    for tool in ("project", "autofaiss"):
        points = sorted((r for r in runs if r.get(tool)), key=lambda r: r["n"])[-2:]
        if len(points) < 2:
            out[tool] = None
            continue
        (a, b) = points
        if a["n"] == b["n"]:
            raise SystemExit(f"{tool}: two runs at the same n")
        fit: dict = {
            "from_n": [a["n"], b["n"]],
            "budget_bytes_per_vector": [
                round(a["budget_bytes"] / a["n"], 1),
                round(b["budget_bytes"] / b["n"], 1),
            ],
            "factories": [a[tool].get("factory"), b[tool].get("factory")],
            "recall@10_measured": [a[tool].get("recall@10"), b[tool].get("recall@10")],
        }
        for metric in GROWTH_METRICS:
            ma, mb = a[tool].get(metric), b[tool].get(metric)
            if not ma or not mb:
                continue
            exponent = math.log(mb / ma) / math.log(b["n"] / a["n"])
            fit[metric] = {
                "exponent": round(exponent, 3),
                "predicted": round(mb * (to / b["n"]) ** exponent, 1),
            }
        out[tool] = fit
    if out.get("project") and out.get("autofaiss"):
        out["ratios"] = {
            f"{metric}_project_over_autofaiss": round(
                out["project"][metric]["predicted"] / out["autofaiss"][metric]["predicted"], 3
            )
            for metric in ("build_s", "cpu_s", "bytes")
            if metric in out["project"] and metric in out["autofaiss"]
        }
    return out


def _cached_vectors(scratch: Path, n: int) -> tuple[Path, Path] | None:
    """The shards and .npy files an earlier run in the same --workdir wrote for the same n."""
    desc, npy = scratch / "descriptors", scratch / "npy"
    if not (desc / "plan.json").exists() or not npy.exists():
        return None
    if sum(len(np.load(p, mmap_mode="r")) for p in npy.glob("*.npy")) != n:
        raise SystemExit(f"{scratch} holds vectors for another --n: use another --workdir")
    return desc, npy


def project_build(
    scratch: Path, desc: Path, budget: int, n: int, truth: np.ndarray, factory: str = "auto"
) -> dict:
    """This project's train -> index -> merge in a fresh process, then its search figures."""
    import shutil

    from retrieval.index.search import DEFAULT_NPROBE

    shutil.rmtree(scratch / "project", ignore_errors=True)
    project = _child(PROJECT_BUILD, str(desc), str(scratch / "project"), str(budget), factory)
    project.update(
        _search_child(
            PROJECT_SEARCH,
            str(scratch / "project" / "index"),
            str(scratch / "queries.npy"),
            str(scratch / "project-found.npy"),
        )
    )
    project.update(recall(np.load(scratch / "project-found.npy"), truth))
    if "IVF" in project["factory"]:
        project["search_params"] = f"nprobe={DEFAULT_NPROBE}"  # what `retrieval search` uses
    project["bytes_per_vector"] = round(project["bytes"] / n, 2)
    return project


def autofaiss_build(
    scratch: Path, npy: Path, budget: str, n: int, truth: np.ndarray, python: str
) -> dict:
    """autofaiss ``build_index`` in a fresh process of its own venv, then its search figures."""
    (scratch / "autofaiss").mkdir(exist_ok=True)
    auto = _child(AUTOFAISS_BUILD, str(npy), str(scratch / "autofaiss"), budget, python=python)
    auto.update(
        _search_child(AUTOFAISS_SEARCH, str(scratch / "autofaiss" / "knn.index"),
               str(scratch / "queries.npy"), str(scratch / "autofaiss-found.npy"),
               python=python)
    )  # fmt: skip
    auto.update(recall(np.load(scratch / "autofaiss-found.npy"), truth))
    infos = json.loads((scratch / "autofaiss" / "infos.json").read_text())
    auto["search_params"] = infos.get("index_param")  # tuned by autofaiss, saved in the index
    auto["bytes"] = (scratch / "autofaiss" / "knn.index").stat().st_size
    auto["bytes_per_vector"] = round(auto["bytes"] / n, 2)
    return auto


if __name__ == "__main__":
    main()
