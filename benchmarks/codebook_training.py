"""Codebook training: time and recall of training recipes, side by side on the same vectors.

    python benchmarks/codebook_training.py [--n 100000] [--recipes faiss-default,project]

The vectors are drawn as in ``index_scale.py`` (mixes of two real GeM descriptors + noise, at the
stored dimension). Each recipe trains an empty index on a uniform sample, adds every vector and
searches 1,000 held-out queries at the project's default ``nprobe``; recall@1 / recall@10 are
against exact inner-product search. A recipe is a factory string and the training settings of
``retrieval.index.codebook`` (sample size, OPQ iterations / points), so what is timed is what
``retrieval train`` does. Writes ``benchmarks/results/codebook_training.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from index_scale import _cached_base, base_descriptors, draw, recall

from retrieval.index import codebook, factory
from retrieval.index.drift import quantization_error
from retrieval.index.search import DEFAULT_NPROBE

REPO = Path(__file__).resolve().parents[1]


def recipe(name: str, n: int, d: int, budget: int | None) -> dict:
    """A recipe by name: ``project`` (what ``retrieval train`` does), ``faiss`` (faiss's own
    defaults for the same factory: OPQ from a random rotation, 50 iterations, 65,536 points),
    ``pca`` (``--pretransform pca``), or ``opq[-random][-niterN][-pointsP]``: OPQ started from
    the PCA eigenvalue allocation (or faiss's random rotation) trained N iterations on P points."""
    chosen = factory.choose_factory(n, d, max_index_memory=budget)
    settings = codebook.training_settings(chosen, n, d)
    if name == "project":
        return {"factory": chosen, **settings}
    if name == "faiss":
        name = "opq-random-niter50-points65536"
    if name == "pca":
        chosen = factory.choose_factory(n, d, max_index_memory=budget, pretransform="pca")
        return {"factory": chosen, **settings}
    parts = name.split("-")
    if parts[0] != "opq":
        raise ValueError(f"unknown recipe {name!r}")
    numbers = {p.rstrip("0123456789"): p[len(p.rstrip("0123456789")) :] for p in parts[1:]}
    return {
        "factory": factory.choose_factory(n, d, max_index_memory=budget, pretransform="opq"),
        "sample": settings["sample"],
        "opq_niter": int(numbers.get("niter") or settings["opq_niter"]),
        "opq_points": int(numbers.get("points") or settings["opq_points"]),
        "opq_init": "random" if "random" in parts else "pca",
    }


def codec_only(factory_string: str) -> str:
    """The factory without its IVF part: the OPQ rotation + PQ codec alone, much cheaper to
    train, for comparing OPQ starts and iterations by the held-out quantization error."""
    return ",".join(p for p in factory_string.split(",") if not p.startswith("IVF"))


def run_recipe(
    recipe: dict, x: np.ndarray, queries: np.ndarray, truth: np.ndarray, codec: bool = False
) -> dict:
    if codec:
        recipe = {**recipe, "factory": codec_only(recipe["factory"])}
    index = codebook.new_index(recipe["factory"], x.shape[1])
    positions = codebook.uniform_sample(len(x), recipe["sample"], seed=0)
    sample = np.ascontiguousarray(x[positions])
    t, cpu = time.perf_counter(), time.process_time()
    codebook.apply_training_settings(index, recipe, sample)
    index.train(sample)
    train_cpu_s = time.process_time() - cpu
    error = quantization_error(index, queries)  # held out: not part of the sample
    train_s = time.perf_counter() - t
    if codec:
        return {
            **recipe,
            "train_s": round(train_s, 1),
            "train_cpu_s": round(train_cpu_s, 1),
            "quantization_error": round(error, 5),
        }
    t = time.perf_counter()
    index.add(x)
    add_s = time.perf_counter() - t
    faiss.ParameterSpace().set_index_parameter(index, "nprobe", DEFAULT_NPROBE)
    t = time.perf_counter()
    _, found = index.search(queries, 10)
    search_s = time.perf_counter() - t
    return {
        **recipe,
        "train_s": round(train_s, 1),
        "train_cpu_s": round(train_cpu_s, 1),
        "add_s": round(add_s, 1),
        "qps_batch": round(len(queries) / search_s),
        "quantization_error": round(error, 5),
        **recall(found, truth),
        "bytes_per_vector": round(len(faiss.serialize_index(index)) / len(x), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--budget", help="index memory budget (as --max-index-memory)")
    parser.add_argument("--recipes", default="faiss,project,pca", help="comma-separated names")
    parser.add_argument(
        "--base", help="descriptor folder of real GeM descriptors (else oxford-dev)"
    )
    parser.add_argument(
        "--codec-only",
        action="store_true",
        help="train only the OPQ + PQ codec (no IVF, no search): held-out quantization error",
    )
    parser.add_argument("--threads", type=int, help="faiss OpenMP threads (default: faiss's)")
    parser.add_argument("--workdir", default="/tmp/codebook-training")
    parser.add_argument(
        "--out", default=str(REPO / "benchmarks" / "results" / "codebook_training.json")
    )
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    budget = factory.parse_bytes(args.budget) if args.budget else None
    scratch = Path(args.workdir)
    scratch.mkdir(parents=True, exist_ok=True)
    base = base_descriptors(args.base or _cached_base(scratch), scratch)
    rng = np.random.default_rng(0)
    x = np.concatenate([draw(base, min(50_000, args.n - s), rng) for s in range(0, args.n, 50_000)])
    queries = draw(base, args.queries, np.random.default_rng(1))
    _, truth = faiss.knn(queries, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    key = f"n={args.n},budget={args.budget}" + (",codec-only" if args.codec_only else "")
    runs = result.setdefault(key, {})
    for name in args.recipes.split(","):
        row = run_recipe(
            recipe(name, args.n, x.shape[1], budget), x, queries, truth, args.codec_only
        )
        row["threads"] = faiss.omp_get_max_threads()
        row["load_average"] = [round(v, 2) for v in os.getloadavg()]
        runs[name] = row
        print(name, json.dumps(row), flush=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
