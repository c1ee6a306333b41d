"""Cutting a list of images into batches the backbone can run as one tensor.

Images keep their own size and aspect ratio (the retrieval protocol), and padding is not an
option: "same" convolutions would see the padding as image content and their stride-2 alignment
depends on the size, so padded descriptors differ from the image's own. Images are therefore
grouped by exact resized shape (most photos share a few: 4:3 and 3:2, landscape and portrait) and
each group is cut into batches that fit a memory budget.

The budget is in bytes of activations; the cost of one image is its pixel count times
``ACTIVATION_BYTES_PER_PIXEL``, an upper estimate from the default backbone's architecture (not a
measurement): its widest early tensors, 96 channels at 1/2 resolution, plus their neighbours, are
about 140 bytes per input pixel in fp32; 400 leaves room for the runtime's own buffers.
On a GPU the budget comes from the device's memory (``device.py``); on a CPU a small budget keeps
a batch's activations in cache.
"""

from __future__ import annotations

from collections.abc import Sequence

# Activation bytes per input pixel of EfficientNet-Lite0 in fp32 (estimate, see above).
ACTIVATION_BYTES_PER_PIXEL = 400
DEFAULT_CPU_BATCH_BYTES = 128 * 1024 * 1024


def max_batch_images(
    height: int, width: int, budget_bytes: int, bytes_per_pixel: int = ACTIVATION_BYTES_PER_PIXEL
) -> int:
    """How many ``height`` x ``width`` images fit the budget (at least one: a single image is
    always run, however large)."""
    return max(1, budget_bytes // max(1, height * width * bytes_per_pixel))


def plan_batches(
    shapes: Sequence[tuple[int, int]],
    budget_bytes: int = DEFAULT_CPU_BATCH_BYTES,
    bytes_per_pixel: int = ACTIVATION_BYTES_PER_PIXEL,
) -> list[list[int]]:
    """Indices of ``shapes`` ((height, width) per image) grouped into same-shape batches that fit
    ``budget_bytes``. Groups come in order of first appearance; every index appears once."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault((int(shape[0]), int(shape[1])), []).append(i)
    batches = []
    for (height, width), members in groups.items():
        size = max_batch_images(height, width, budget_bytes, bytes_per_pixel)
        batches.extend(members[start : start + size] for start in range(0, len(members), size))
    return batches
