"""What a Delta Lake table (delta-rs) would write for a 1% re-index of the descriptors, and
what two concurrent writers see: the measurement behind the README's "Why not a table format".

    python3 -m venv V && V/bin/pip install deltalake "pyarrow<26" "numpy<2.5"
    V/bin/python benchmarks/table_format_probe.py [--rows 20000]

``deltalake`` is not a dependency of the project, so this runs in a venv of its own. It writes
``--rows`` descriptors (1280 float32 values, as the default model's) in files of about a shard's
size, deletes 0.75% of the ids at random (the changed and deleted images of a 1% re-index) and
appends 0.75% (the changed and new ones), and counts the bytes of the files each commit created
or rewrote. Then two deletes at once: optimistic concurrency lets one commit. Writes
``benchmarks/results/table_format_probe.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
from deltalake import DeltaTable, __version__, write_deltalake

DIM = 1280
REPO = Path(__file__).resolve().parents[1]


def files(path: str) -> dict[str, tuple[int, int]]:
    found = {}
    for folder, _, names in os.walk(path):
        for name in names:
            stat = os.stat(os.path.join(folder, name))
            found[os.path.join(folder, name)] = (stat.st_size, stat.st_mtime_ns)
    return found


def written(before: dict, after: dict) -> int:
    return sum(size for path, (size, mtime) in after.items() if before.get(path) != (size, mtime))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/table_format_probe.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    def table(ids: list[str]) -> pa.Table:
        vectors = rng.standard_normal((len(ids), DIM)).astype(np.float32).reshape(-1)
        column = pa.FixedSizeListArray.from_arrays(pa.array(vectors), DIM)
        return pa.table({"id": pa.array(ids), "descriptor": column})

    root = tempfile.mkdtemp(prefix="delta-probe-")
    try:
        n = args.rows
        ids = [f"{i:07d}.jpg" for i in range(n)]
        write_deltalake(root, table(ids), mode="overwrite", target_file_size=1_320_000)
        full = written({}, files(root))
        data_files = len(DeltaTable(root).file_uris())
        picked = rng.choice(n, size=n // 100, replace=False)
        gone = [ids[i] for i in picked[: 3 * n // 400]]
        before = files(root)
        metrics = DeltaTable(root).delete(predicate=f"id in ({', '.join(map(repr, gone))})")
        after_delete = files(root)
        appended = gone[: n // 200] + [f"new{i:07d}.jpg" for i in range(n // 400)]
        write_deltalake(root, table(appended), mode="append")
        after = files(root)
        log = os.path.join(root, "_delta_log")
        vectors_written = any(
            "deletionVector" in Path(log, name).read_text()
            for name in os.listdir(log)
            if name.endswith(".json")
        )
        errors: list[str] = []

        def delete_one(image_id: str) -> None:
            try:
                DeltaTable(root).delete(predicate=f"id = '{image_id}'")
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")

        racers = [threading.Thread(target=delete_one, args=(ids[i],)) for i in picked[-2:]]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "deltalake": __version__,
        "rows": n,
        "data_files": data_files,
        "full_bytes": full,
        "deleted_rows": len(gone),
        "delete": {
            "bytes": written(before, after_delete),
            "files_removed": metrics.get("num_removed_files"),
            "rows_copied": metrics.get("num_copied_rows"),
        },
        "append_bytes": written(after_delete, after),
        "deletion_vectors_written": vectors_written,
        "reindex_fraction": round(
            (written(before, after_delete) + written(after_delete, after)) / full, 4
        ),
        "two_concurrent_deletes": errors or ["both committed"],
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
