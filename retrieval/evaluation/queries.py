"""Query inputs for protocols whose queries are not simply database images.

Oxford5k, Paris6k and Revisited Oxford/Paris define each query as a bounding box in its
image; the protocol (``example_process_images.py`` in filipradenovic/revisitop) describes the
crop, not the whole photo. Revisited and GLDv2 query images are also kept out of the database.
``write_query_inputs`` writes one image per query (cropped where the ground truth says so) so
the ordinary extraction stage can describe them.
"""

from __future__ import annotations

import io

from PIL import Image

from retrieval import storage
from retrieval.evaluation.ground_truth import Benchmark

# The decompression-bomb guard the rest of the project uses for untrusted images.
MAX_PIXELS = 100_000_000


def crop_box(
    bbox: tuple[float, float, float, float], width: int, height: int
) -> tuple[int, int, int, int]:
    """Pixel box of a ground-truth bbox: rounded as PIL's ``Image.crop`` rounds the float box
    revisitop hands it, and clamped to the image (some published boxes overrun by a pixel)."""
    x1, y1, x2, y2 = (round(v) for v in bbox)
    x1, x2 = max(0, min(x1, width)), max(0, min(x2, width))
    y1, y2 = max(0, min(y1, height)), max(0, min(y2, height))
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"bbox {bbox} is empty inside a {width}x{height} image")
    return x1, y1, x2, y2


def write_query_inputs(benchmark: Benchmark, folder: str) -> tuple[dict[str, str], dict[str, str]]:
    """One lossless PNG per query id in ``folder`` (``<id>.png``; a local path or a URI such as
    ``gs://...``): the query image, cropped to its bbox when it has one.

    Returns ({query id: URI written}, {query id: reason}) for the queries written and those that
    could not be (unreadable image, box outside it): the caller reports the latter, and they
    score with an empty ranking. A query id with two different boxes is an error (rankings are
    keyed by query id). An input already written by an earlier run is kept (each is written
    whole, atomically, by ``storage.write_bytes``).
    """
    boxes: dict[str, tuple[float, float, float, float] | None] = {}
    for query in benchmark.queries:
        if query.id in boxes and boxes[query.id] != query.bbox:
            raise ValueError(f"query {query.id!r} has two different bounding boxes")
        boxes[query.id] = query.bbox
    written: dict[str, str] = {}
    problems: dict[str, str] = {}
    for query_id, bbox in sorted(boxes.items()):
        target = storage.join(folder, f"{query_id}.png")
        if storage.exists(target):
            written[query_id] = target
            continue
        try:
            with Image.open(benchmark.image_path(query_id)) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise ValueError(f"{image.width}x{image.height} exceeds {MAX_PIXELS} pixels")
                image = image.convert("RGB")
                if bbox is not None:
                    image = image.crop(crop_box(bbox, image.width, image.height))
                sink = io.BytesIO()
                image.save(sink, format="PNG")
        except (OSError, ValueError) as exc:
            problems[query_id] = f"{type(exc).__name__}: {exc}"
            continue
        storage.write_bytes(target, sink.getvalue())
        written[query_id] = target
    return written, problems
