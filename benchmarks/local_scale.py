"""Local features at scale: what re-ranking reads per query, today's layout against the new one.

    python benchmarks/local_scale.py [--images 100000] [--queries 100] [--shortlist 100]

* store: ``--images`` images of random local features at the default's real size and count
  (``--features`` 900 RootSIFT descriptors of 128 float16 values, keypoints, scales), drawn so
  that they compress as real ones do (``synthetic_features``), cut into shards of 256 like
  ``retrieval extract`` cuts them. Each shard holds 256 distinct feature sets (the same 256,
  shuffled, from shard to shard: generating 100,000 would take longer than the measurement).
* the two layouts, each written, measured and deleted in turn (~18 GB each at 100,000 images):
  ``shard``, today's (up to this change): one Parquet file per shard, read and checksummed whole
  to get one image; ``image``, the new one: one Arrow record batch per image, its byte range and
  SHA-256 in the manifest, one ranged read per image (``retrieval/shards/local_feature_shards``).
  Both are written and read by the project's own code (the ``shard`` layout through the store's
  path for shards of that layout, which reads exactly as the old store did).
* queries: ``--queries`` shortlists of ``--shortlist`` images drawn at random from the corpus
  (a large corpus's shortlists spread over as many shards as they have images), fetched as
  re-ranking fetches them (``prefetch`` of the shortlist, then one lookup per image), through a
  store with its default cache. The ``shard`` layout reads ~46 MB per shortlisted image, so it
  runs the first ``--shard-queries`` (default 5) of the same queries.

Per layout: ``bytes_read_per_query``, ``shortlist_feature_bytes_per_query`` (the bytes of the
shortlisted images' own features in that layout: an image's byte range, or its share of its
shard's file), ``read_amplification`` (their ratio), ``ms_per_query``, ``store_open_s`` and
``manifest_bytes_per_image`` (what opening a store reads: the manifests). Writes
``benchmarks/results/local_scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from retrieval import plan, shard_manifests, storage
from retrieval.corpus import ImageRef, ShardSpec
from retrieval.local_features.features import LocalFeatureConfig, LocalFeatures, local_model_info
from retrieval.shards import local_feature_shards
from retrieval.shards.descriptor_shards import data_uri, error_table, errors_uri
from retrieval.shards.local_feature_shards import LocalFeatureRow, LocalFeatureStore

REPO = Path(__file__).resolve().parents[1]
SHARD_SIZE = 256
LAYOUTS = ("shard", "image")


def synthetic_features(rng: np.random.Generator, count: int, dim: int) -> LocalFeatures:
    """Keypoints and RootSIFT-like descriptors of one 640x480 image: sparse gradient histograms
    quantised as OpenCV's SIFT quantises them (x512, clipped at 255, whole numbers: a quarter
    of the values are 0), then RootSIFT (L1-normalised, square root). Stored as float16 they
    take ~181 KB per 900 features, the size measured on oxford-dev (~184 KB)."""
    histograms = rng.gamma(0.3, size=(count, dim)).astype(np.float32)
    histograms /= np.linalg.norm(histograms, axis=1, keepdims=True)
    histograms = np.minimum(np.round(histograms * 512), 255)
    histograms /= np.maximum(histograms.sum(axis=1, keepdims=True), 1)
    locations = rng.uniform((0, 0), (640, 480), size=(count, 2)).astype(np.float32)
    scales = rng.lognormal(1.5, 0.6, size=count).astype(np.float32)
    return LocalFeatures(locations, scales, np.sqrt(histograms), 640, 480)


def write_shard_layout(
    folder: str, spec: ShardSpec, rows: list[LocalFeatureRow], info: dict[str, Any]
) -> None:
    """A shard as the project wrote it before reading by image: one Parquet file, a manifest
    without ``format`` (read whole by the store)."""
    dim, dtype = int(info["dim"]), info["config"]["dtype"]
    table = local_feature_shards.local_feature_table(rows, info["id"], dim, dtype)
    data_path, errors_path = data_uri(folder, spec.shard_id), errors_uri(folder, spec.shard_id)
    data = storage.write_parquet(data_path, table)
    errors = storage.write_parquet(errors_path, error_table([]))
    shard_manifests.commit(
        folder,
        spec.shard_id,
        {
            "kind": local_feature_shards.KIND,
            "input_digest": spec.input_digest,
            "inputs": len(rows),
            "rows": len(rows),
            "errors": 0,
            "features": sum(len(r.features) for r in rows),
            "dim": dim,
            "extract_s": 0.0,
            "ids": [r.id for r in rows],
            "files": {
                "data": shard_manifests.file_entry(data_path, data, len(rows)),
                "errors": shard_manifests.file_entry(errors_path, errors, 0),
            },
            "model": info,
        },
    )


def build_store(
    folder: str, layout: str, images: int, pool: list[LocalFeatures], info: dict[str, Any]
) -> float:
    """Write ``images`` images' features in ``layout`` under ``folder``; returns seconds."""
    start = time.perf_counter()
    rng = np.random.default_rng(7)
    specs = []
    for first in range(0, images, SHARD_SIZE):
        refs = tuple(
            ImageRef(f"img{i:07d}.jpg", f"/corpus/img{i:07d}.jpg")
            for i in range(first, min(first + SHARD_SIZE, images))
        )
        spec = ShardSpec(f"part-{first // SHARD_SIZE:05d}", refs)
        specs.append(spec)
        order = rng.permutation(len(pool))
        rows = [LocalFeatureRow(r.id, r.uri, pool[order[j]]) for j, r in enumerate(refs)]
        if layout == "image":
            local_feature_shards.write_shard(folder, spec, rows, [], info)
        else:
            write_shard_layout(folder, spec, rows, info)
    plan.write_extraction_plan(folder, specs, source="/corpus", shard_size=SHARD_SIZE)
    return time.perf_counter() - start


def own_bytes(manifest: dict[str, Any]) -> dict[str, float]:
    """Each image's stored bytes: its byte range, or its share of its shard's file (by number
    of features) for a shard read whole."""
    if manifest.get("format") == local_feature_shards.BATCH_PER_IMAGE:
        return {i: b - a for i, (a, b, _) in zip(manifest["ids"], manifest["batches"], strict=True)}
    total = manifest["files"]["data"]["bytes"]
    share = total / max(len(manifest["ids"]), 1)  # synthetic images all have --features
    return dict.fromkeys(manifest["ids"], share)


def measure(folder: str, shortlists: list[list[str]]) -> dict[str, Any]:
    """Open a store over ``folder`` and fetch each shortlist as re-ranking does."""
    opened = time.perf_counter()
    store = LocalFeatureStore(folder)
    open_s = time.perf_counter() - opened
    manifests = local_feature_shards.list_shards(folder)
    sizes: dict[str, float] = {}
    for manifest in manifests:
        sizes.update(own_bytes(manifest))
    manifest_bytes = sum(
        os.path.getsize(shard_manifests.manifest_uri(folder, m["shard"])) for m in manifests
    )
    needed = 0.0
    start = time.perf_counter()
    for shortlist in shortlists:
        store.prefetch(shortlist)
        for image_id in shortlist:
            store.get(image_id)
        needed += sum(sizes[i] for i in shortlist)
    seconds = time.perf_counter() - start
    queries = len(shortlists)
    return {
        "queries": queries,
        "bytes_read_per_query": round(store.bytes_read / queries),
        "shortlist_feature_bytes_per_query": round(needed / queries),
        "read_amplification": round(store.bytes_read / needed, 3),
        "ms_per_query": round(1000 * seconds / queries, 1),
        "store_open_s": round(open_s, 2),
        "manifest_bytes_per_image": round(manifest_bytes / len(sizes), 1),
        "data_bytes_per_image": round(
            sum(m["files"]["data"]["bytes"] for m in manifests) / len(sizes)
        ),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    # The size measured (128 float16 values, ~181 KB an image: the default before the compact
    # codes): read amplification depends on the layout, not on the bytes of an image.
    config = LocalFeatureConfig(dtype="float16", pca_dim=0)
    info = local_model_info(config, args.dim, "synthetic")
    pool = [
        synthetic_features(rng, args.features, args.dim)
        for _ in range(min(SHARD_SIZE, args.images))
    ]
    ids = [f"img{i:07d}.jpg" for i in range(args.images)]
    shortlists = [
        [ids[j] for j in rng.choice(args.images, args.shortlist, replace=False)]
        for _ in range(args.queries)
    ]
    result: dict[str, Any] = {
        "images": args.images,
        "features_per_image": args.features,
        "dim": args.dim,
        "dtype": config.stored_dtype,
        "shard_size": SHARD_SIZE,
        "shortlist": args.shortlist,
        "machine": f"{platform.node()} ({os.cpu_count()} cores)",
        "storage": "local disk",
    }
    for layout in LAYOUTS:
        folder = tempfile.mkdtemp(prefix=f"local-scale-{layout}-", dir=args.workdir)
        try:
            write_s = build_store(folder, layout, args.images, pool, info)
            queries = shortlists if layout == "image" else shortlists[: args.shard_queries]
            result[layout] = {"write_s": round(write_s, 1), **measure(folder, queries)}
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        print(json.dumps({layout: result[layout]}), flush=True)
    result["read_amplification_ratio"] = round(
        result["shard"]["read_amplification"] / result["image"]["read_amplification"], 1
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--shard-queries", type=int, default=5)
    parser.add_argument("--shortlist", type=int, default=100)
    parser.add_argument("--features", type=int, default=900)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where the stores are written (tmp)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "local_scale.json"))
    args = parser.parse_args()
    result = run(args)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
