"""Learned whitening (Radenović et al., "Fine-tuning CNN image retrieval with no human
annotation", TPAMI 2018, section 3.3), from matching pairs mined in the corpus.

    1. PCA of the corpus descriptors, keeping ``dim`` components (few pairs cannot whiten more);
    2. whitening by the covariance of matching-pair differences (what varies between two photos
       of the same thing gets down-weighted), shrunk towards a multiple of the identity so that a
       few hundred pairs give a stable inverse;
    3. a rotation onto the principal axes of the whitened corpus (orders the output dimensions).

A descriptor ``x`` becomes ``normalize(P (x - m))``. The transform is a versioned artefact
(``whitening.npz`` + ``whitening.json``) whose SHA-256 enters the fingerprint of every
descriptor it produced, so whitened and raw descriptors are never searched together.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

import schemas
from retrieval import checksums, storage
from retrieval.descriptors.pooling import l2_normalize

WHITENING_VERSION = 1
ARRAYS_FILE = "whitening.npz"
INFO_FILE = "whitening.json"

# Chosen on oxford-dev and ukbench-56 together (README, "Learning from the corpus").
DEFAULT_DIM = 256
DEFAULT_SHRINKAGE = 0.3


class InsufficientPairsError(ValueError):
    """Mining found too few verified pairs to learn a whitening."""


@dataclass(frozen=True)
class LearnedWhitening:
    """``y = normalize(projection @ (x - mean))``; ``info`` says how it was learned."""

    mean: np.ndarray  # (d,)
    projection: np.ndarray  # (dim, d)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.projection.shape[0])

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """Whiten (n, d) descriptors into L2-normalized (n, dim) float32 ones."""
        x = np.asarray(vectors, np.float64) - self.mean
        return l2_normalize(x @ self.projection.T).astype(np.float32)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, mean=self.mean, projection=self.projection)
        return buffer.getvalue()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()


def _top_eigenvectors(matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    values, vectors = np.linalg.eigh(matrix)
    order = np.argsort(values)[::-1][:k]
    return values[order], vectors[:, order]


def learn_whitening(
    vectors: np.ndarray,
    pairs: np.ndarray,
    *,
    dim: int = DEFAULT_DIM,
    shrinkage: float = DEFAULT_SHRINKAGE,
) -> LearnedWhitening:
    """Learn the whitening from descriptors (n, d) and matching pairs (m, 2) of row indices.

    ``dim`` is capped by the number of descriptors (a PCA of n points has n - 1 components).
    ``shrinkage`` in [0, 1] blends the pair-difference covariance with its mean variance times
    the identity: 0 is Radenović's plain estimate, 1 leaves the PCA space unwhitened.
    """
    x = np.asarray(vectors, np.float64)
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    if len(pairs) == 0:
        raise ValueError("learned whitening needs at least one matching pair")
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError("shrinkage must be in [0, 1]")
    n, d = x.shape
    dim = max(1, min(dim, d, n - 1))
    mean = x.mean(axis=0)
    centred = x - mean
    _, pca = _top_eigenvectors(centred.T @ centred / n, dim)  # (d, dim)
    reduced = centred @ pca  # (n, dim)

    differences = reduced[pairs[:, 0]] - reduced[pairs[:, 1]]
    within = differences.T @ differences / len(differences)
    within = (1.0 - shrinkage) * within + shrinkage * (np.trace(within) / dim) * np.eye(dim)
    values, vectors_w = np.linalg.eigh(within)
    inverse_sqrt = (vectors_w / np.sqrt(np.maximum(values, 1e-12))) @ vectors_w.T

    whitened = reduced @ inverse_sqrt.T
    _, rotation = _top_eigenvectors(whitened.T @ whitened / n, dim)
    projection = rotation.T @ inverse_sqrt @ pca.T  # (dim, d)
    return LearnedWhitening(
        mean,
        projection,
        {"dim": dim, "shrinkage": shrinkage, "pairs": len(pairs), "images": n},
    )


def save_whitening(whitening: LearnedWhitening, directory: str, **info: Any) -> dict[str, Any]:
    """Write ``whitening.npz`` then ``whitening.json`` (the commit); returns the JSON."""
    data = whitening.to_bytes()
    storage.write_bytes(storage.join(directory, ARRAYS_FILE), data)
    record = {
        "kind": "learned_whitening",
        "version": WHITENING_VERSION,
        "sha256": storage.sha256_bytes(data),
        "input_dim": int(whitening.mean.shape[0]),
        **whitening.info,
        **info,
    }
    storage.write_json(storage.join(directory, INFO_FILE), record)
    return record


def load_whitening(directory: str) -> LearnedWhitening:
    """Read a saved whitening, refusing another version or a file that does not match its
    checksum. Arrays are read with ``allow_pickle=False`` (never unpickle what we read)."""
    record = storage.read_json(storage.join(directory, INFO_FILE))
    if record.get("kind") != "learned_whitening" or record.get("version") != WHITENING_VERSION:
        raise ValueError(
            f"{directory}: not a learned whitening of version {WHITENING_VERSION} "
            f"(kind {record.get('kind')!r}, version {record.get('version')!r})"
        )
    data = storage.read_bytes(storage.join(directory, ARRAYS_FILE))
    if storage.sha256_bytes(data) != record["sha256"]:
        raise checksums.mismatch(
            storage.join(directory, ARRAYS_FILE),
            "learn it again (`retrieval learn`, or the job or `retrieval reindex` that made it)",
        )
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        return LearnedWhitening(arrays["mean"], arrays["projection"], record)


def whitened_model_info(
    base: dict[str, Any], record: dict[str, Any], whitening_uri: str
) -> dict[str, Any]:
    """The model fingerprint of descriptors whitened by ``record``: a new id and config hash
    (so raw and whitened vectors are never mixed), and where the transform lives, so search can
    whiten raw query descriptors of the base model the same way."""
    config_hash = hashlib.sha256(f"{base['config_hash']}+{record['sha256']}".encode()).hexdigest()[
        :16
    ]
    return {
        **base,
        "id": f"{base['id']}+lw{record['dim']}-{record['sha256'][:12]}",
        "config_hash": config_hash,
        "dim": int(record["dim"]),
        "whitening": {
            "uri": whitening_uri,
            "sha256": record["sha256"],
            "dim": int(record["dim"]),
            "base_id": base["id"],
            "base_config_hash": base["config_hash"],
        },
    }


def whiten_descriptor_folder(source: str, whitening_uri: str, output: str) -> dict[str, Any]:
    """Write the whitened copy of every descriptor shard of ``source`` to ``output`` (same plan,
    same shard ids, same error rows; data first, manifests last). Returns the new model info."""
    from retrieval import plan, shard_manifests
    from retrieval.shards import descriptor_shards

    whitening = load_whitening(whitening_uri)
    record = whitening.info
    source_plan = plan.read_plan(source)
    plan.write_plan(output, source_plan.shards, stage="whiten", source=source)
    info: dict[str, Any] | None = None
    for manifest in descriptor_shards.list_shards(source):
        if info is None:
            info = whitened_model_info(manifest["model"], record, whitening_uri)
        table = descriptor_shards.read_table(source, manifest)  # a reference: the rows it keeps
        shard = descriptor_shards.shard_of(manifest, table)
        vectors = whitening.apply(shard.vectors)
        flat = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), whitening.dim)
        table = pa.table(
            {
                **{name: table.column(name) for name in table.schema.names},
                "model_id": pa.array([info["id"]] * len(vectors), pa.string()),
                "descriptor": flat,
            },
            schema=schemas.arrow_schema("descriptors", dim=whitening.dim),
        )
        data_path = descriptor_shards.data_uri(output, shard.shard_id)
        errors_path = descriptor_shards.errors_uri(output, shard.shard_id)
        data = storage.write_parquet(data_path, table)
        if "errors" in manifest["files"]:
            errors = storage.read_bytes(descriptor_shards.errors_uri(source, shard.shard_id))
            storage.write_bytes(errors_path, errors)
        else:  # a reference lists indexed rows only: its whitened copy has no error rows
            errors = storage.write_parquet(errors_path, descriptor_shards.error_table([]))
        # The whitened copy is a shard of its own (its rows written here), never a reference.
        dropped = ("schema_version", "created", "source", "drop")
        body = {k: v for k, v in manifest.items() if k not in dropped}
        shard_manifests.commit(
            output,
            shard.shard_id,
            {
                **body,
                "dim": whitening.dim,
                "files": {
                    "data": shard_manifests.file_entry(data_path, data, len(vectors)),
                    "errors": shard_manifests.file_entry(errors_path, errors, manifest["errors"]),
                },
                "model": info,
            },
        )
    if info is None:
        raise FileNotFoundError(f"no descriptor shards under {source}")
    return info


def query_whitening(
    index_model: dict[str, Any], query_models: list[dict[str, Any]]
) -> LearnedWhitening | None:
    """The whitening to apply to query descriptors before searching an index, or None.

    An index of whitened descriptors accepts raw query descriptors of its base model (they are
    whitened here, at query time) as well as already-whitened ones; anything else is refused by
    the index's own model check.
    """
    spec = index_model.get("whitening")
    if not spec or not query_models:
        return None
    raw = [m["config_hash"] == spec["base_config_hash"] for m in query_models]
    if not any(raw):
        return None
    if not all(raw):
        raise ValueError("query descriptors mix raw and whitened shards")
    whitening = load_whitening(spec["uri"])
    if whitening.info["sha256"] != spec["sha256"]:
        raise ValueError(
            f"{spec['uri']}: the whitening there ({whitening.info['sha256'][:12]}) is not the one "
            f"the index was built with ({spec['sha256'][:12]})"
        )
    return whitening
