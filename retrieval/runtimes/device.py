"""How a worker uses its machine: model copies, threads, decode fan-in and batch budget.

CPU: one model copy per worker process, the cores split between them, small batches (their
activations stay in cache; batching buys little on a CPU, see the README).
GPU: one worker per GPU holding one model copy; batches sized to the GPU's memory so it stays busy,
and decoding spread over all the CPU cores (decode, not the model, is the limit there).

The plan is plain data so it is tested on any machine: ``plan_worker("gpu", ...)`` on a CPU-only
machine gives the GPU plan, and the TensorFlow runtime falls back to the CPU under it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from retrieval.runtimes.batching import (
    ACTIVATION_BYTES_PER_PIXEL,
    DEFAULT_CPU_BATCH_BYTES,
    max_batch_images,
)

# Share of the GPU's memory given to one batch's activations (the rest: weights, workspace,
# the framework's allocator slack).
GPU_MEMORY_SHARE = 0.5
DEFAULT_GPU_MEMORY_BYTES = 16 * 1024**3  # when the size cannot be read (no nvidia-smi)
# Images decoded ahead of the model per decode thread: enough to hide a slow read.
PREFETCH_PER_THREAD = 4


@dataclass(frozen=True)
class WorkerPlan:
    device: str  # "cpu" or "gpu"
    inference_threads: int  # threads the runtime uses inside one worker
    decode_threads: int  # threads reading and decoding ahead of the model, per worker
    batch_bytes: int  # activation memory budget of one batch
    max_batch_images: int  # images handed to the model at once (upper bound)

    @property
    def prefetch(self) -> int:
        return self.decode_threads * PREFETCH_PER_THREAD


def gpu_memory_bytes() -> int | None:
    """Total memory of the first GPU, from nvidia-smi; None when there is no NVIDIA GPU."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return int(out.split()[0]) * 1024**2
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def plan_worker(
    device: str,
    *,
    cores: int | None = None,
    workers: int = 1,
    threads: int | None = None,
    image_side: int = 362,
    gpu_memory: int | None = None,
) -> WorkerPlan:
    """The plan of one of ``workers`` worker processes sharing ``cores`` CPU cores.

    ``threads`` overrides the runtime's threads; ``image_side`` (the longest resized side) sizes
    the batch cap; ``gpu_memory`` overrides the GPU's memory (read with nvidia-smi otherwise).
    """
    cores = cores or os.cpu_count() or 1
    if device == "gpu":
        memory = gpu_memory or gpu_memory_bytes() or DEFAULT_GPU_MEMORY_BYTES
        budget = int(memory * GPU_MEMORY_SHARE)
        return WorkerPlan(
            device="gpu",
            inference_threads=threads or 1,
            decode_threads=max(1, cores // max(1, workers)),
            batch_bytes=budget,
            max_batch_images=_cap(image_side, budget),
        )
    if device != "cpu":
        raise ValueError(f"device must be 'cpu' or 'gpu', not {device!r}")
    per_worker = threads or max(1, cores // max(1, workers))
    return WorkerPlan(
        device="cpu",
        inference_threads=per_worker,
        # One decode thread ahead of the model: it overlaps reading (network latency) and
        # decoding with inference; on busy cores it costs nothing the model would have used.
        decode_threads=1,
        batch_bytes=DEFAULT_CPU_BATCH_BYTES,
        max_batch_images=_cap(image_side, DEFAULT_CPU_BATCH_BYTES),
    )


def _cap(image_side: int, budget: int) -> int:
    # Batches of 4:3 images at the longest side (the common case) that fit the budget, so that
    # after grouping by shape the model still gets full batches.
    height = max(1, image_side * 3 // 4)
    return max(
        1, min(1024, max_batch_images(image_side, height, budget, ACTIVATION_BYTES_PER_PIXEL))
    )
