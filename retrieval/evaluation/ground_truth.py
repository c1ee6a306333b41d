"""Benchmark ground truth: which images exist, which are queries, and what counts as a hit.

A benchmark folder holds ``gt.json`` and ``images/`` (format in
``shared/benchmarks/README.md``). Loading validates the file up front, because a typo in a
ground-truth id would otherwise surface as a silently lower mAP, not as an error.

Optional fields carry the standard benchmarks' protocols (``retrieval datasets fetch`` writes
them):

- ``"query_images": [ids]``: images in ``queries/`` that are queries only, not part of the
  searched database (Revisited Oxford/Paris, GLDv2 test images);
- ``"query_in_ranking": true``: the query image stays in its own ranking and counts as a
  result (Oxford5k/Paris6k, whose query images are database images and good results of their
  own crops); by default it is removed (leave-one-out, Holidays);
- per query ``"bbox": [x1, y1, x2, y2]``: the query is this crop of its image (pixels);
- per query ``"easy"`` / ``"hard"``: the Revisited split of the positives, from which
  ``retrieval.evaluation.protocols`` derives the Easy / Medium / Hard ground truth.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

GT_FILENAME = "gt.json"
IMAGES_DIRNAME = "images"
QUERY_IMAGES_DIRNAME = "queries"
# Extensions tried, in order, when the image is not stored as `<id>.jpg`.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
UKBENCH_GROUP_SIZE = 4


@dataclass(frozen=True)
class Query:
    """One query: its expected positives, and the junk images that must not be scored."""

    id: str
    landmark: str
    positives: frozenset[str]
    junk: frozenset[str]
    bbox: tuple[float, float, float, float] | None = None
    easy: frozenset[str] | None = None
    hard: frozenset[str] | None = None


@dataclass
class Benchmark:
    """The images of a benchmark and its queries.

    ``root`` is the benchmark folder (the one holding ``images/``); it is None for a
    benchmark built in memory, which can be evaluated but has no image files to show.
    """

    name: str
    images: list[str]
    queries: list[Query]
    root: Path | None = None
    query_images: list[str] = field(default_factory=list)
    query_in_ranking: bool = False
    protocol: str | None = None

    @cached_property
    def _image_set(self) -> frozenset[str]:
        return frozenset(self.images)

    @cached_property
    def _query_image_set(self) -> frozenset[str]:
        return frozenset(self.query_images)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._image_set or image_id in self._query_image_set

    @property
    def needs_query_inputs(self) -> bool:
        """Whether queries must be described from their own inputs (a crop, or an image that
        is not in the database) rather than reuse the database descriptor of their image."""
        return bool(self.query_images) or any(q.bbox is not None for q in self.queries)

    def query_keys(self) -> dict[str, Query]:
        """Every query under a unique key: its id, or ``"<id>@<landmark>"`` for an image that
        is a query of several landmarks.

        Query ids are not unique: in Oxford5k a photo showing two landmarks is a good image of
        both (oxford-dev has ``all_souls_000183`` for all_souls and radcliffe_camera), so it is
        a query twice, with different positives. Per-query scores are keyed by this key.
        """
        counts = Counter(q.id for q in self.queries)
        return {(q.id if counts[q.id] == 1 else f"{q.id}@{q.landmark}"): q for q in self.queries}

    def image_path(self, image_id: str) -> Path:
        """Path of an image file: ``<root>/images/<id>.jpg``, or the file that exists with
        another usual extension (.jpeg, .png).

        If no file exists, the ``.jpg`` path is returned anyway, so that the caller's open()
        raises a FileNotFoundError naming the expected file.
        """
        if self.root is None:
            raise ValueError(f"benchmark {self.name!r} has no root folder, so no image files")
        if image_id not in self:
            raise KeyError(f"{image_id!r} is not an image of benchmark {self.name!r}")
        in_queries = image_id in self._query_image_set and image_id not in self._image_set
        folder = self.root / (QUERY_IMAGES_DIRNAME if in_queries else IMAGES_DIRNAME)
        for ext in IMAGE_EXTENSIONS:
            candidate = folder / f"{image_id}{ext}"
            if candidate.is_file():
                return candidate
        return folder / f"{image_id}{IMAGE_EXTENSIONS[0]}"

    def ukbench_groups(self) -> list[frozenset[str]] | None:
        """The UKBench groups (each query with its 3 positives), or None if the benchmark
        is not UKBench-shaped.

        UKBench-shaped means: every query has exactly 3 positives, each query's group of 4 is
        the same set for all its members, and every member is itself a query, so that the
        groups partition the queries. Only then is the N-S score (0..4) meaningful.
        """
        if not self.queries:
            return None
        by_id = {q.id: q for q in self.queries}
        if len(by_id) != len(self.queries):  # an image that is a query twice
            return None
        groups: dict[frozenset[str], None] = {}  # ordered set, first-seen order
        for query in self.queries:
            group = frozenset({query.id, *query.positives})
            if len(query.positives) != UKBENCH_GROUP_SIZE - 1 or len(group) != UKBENCH_GROUP_SIZE:
                return None
            for member in group:
                other = by_id.get(member)
                if other is None or frozenset({other.id, *other.positives}) != group:
                    return None
            groups[group] = None
        return list(groups)


def load_benchmark(path: str | Path) -> Benchmark:
    """Read and validate ``<path>/gt.json`` (``path`` may also be the gt.json file itself).

    The benchmark's name is its folder's name. Raises ValueError naming the first problem
    found: a missing key, a duplicate image or query, or a query/positive/junk id not among
    the images.
    """
    path = Path(path)
    gt_file = path if path.is_file() else path / GT_FILENAME
    root = gt_file.parent
    try:
        with gt_file.open(encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {GT_FILENAME} in {root}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{gt_file}: not valid JSON: {exc}") from exc
    except RecursionError:
        # json's decoder recurses once per nesting level: a gt.json nested ~1,000 deep ends
        # the interpreter's recursion, which no ground truth (3 levels) comes near.
        raise ValueError(f"{gt_file}: nested too deeply to be a ground truth") from None
    return parse_benchmark(data, name=root.name, root=root, source=str(gt_file))


def parse_benchmark(
    data: Any, *, name: str, root: Path | None = None, source: str = "gt.json"
) -> Benchmark:
    """Build a validated Benchmark from the decoded gt.json content (see load_benchmark)."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object at top level")
    images = _string_list(data, "images", source)
    _require_unique(images, f"{source}: duplicate image id")
    query_images = _string_list(data, "query_images", source, default=[])
    _require_unique(query_images, f"{source}: duplicate query image id")
    both = sorted(frozenset(images) & frozenset(query_images))
    if both:
        raise ValueError(f"{source}: ids both in 'images' and 'query_images': {_preview(both)}")
    image_set = frozenset(images)
    query_in_ranking = data.get("query_in_ranking", False)
    if not isinstance(query_in_ranking, bool):
        raise ValueError(f"{source}: 'query_in_ranking' must be true or false")

    raw_queries = data.get("queries")
    if not isinstance(raw_queries, list):
        raise ValueError(f"{source}: 'queries' must be a list")
    queries = [
        _parse_query(
            raw, i, image_set, image_set | frozenset(query_images), source, query_in_ranking
        )
        for i, raw in enumerate(raw_queries)
    ]
    # The same image may be a query of several landmarks (see Benchmark.query_keys), but not
    # twice for the same landmark.
    _require_unique(
        (f"{q.id}@{q.landmark}" for q in queries), f"{source}: duplicate query (id@landmark)"
    )
    protocol = data.get("protocol")
    return Benchmark(
        name=name,
        images=images,
        queries=queries,
        root=root,
        query_images=query_images,
        query_in_ranking=query_in_ranking,
        protocol=protocol if isinstance(protocol, str) else None,
    )


def _parse_query(
    raw: Any,
    index: int,
    image_set: frozenset[str],
    query_set: frozenset[str],
    source: str,
    query_in_ranking: bool = False,
) -> Query:
    where = f"{source}: queries[{index}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object")
    query_id = raw.get("id")
    if not isinstance(query_id, str):
        raise ValueError(f"{where}: 'id' must be a string")
    where = f"{source}: query {query_id!r}"
    landmark = raw.get("landmark")
    if not isinstance(landmark, str):
        raise ValueError(f"{where}: 'landmark' must be a string")
    positives = frozenset(_string_list(raw, "positives", where))
    junk = frozenset(_string_list(raw, "junk", where, default=[]))

    easy = _optional_set(raw, "easy", where)
    hard = _optional_set(raw, "hard", where)
    if (easy is None) != (hard is None):
        raise ValueError(f"{where}: 'easy' and 'hard' come together (Revisited ground truth)")
    bbox = _parse_bbox(raw.get("bbox"), where)

    if query_id not in query_set:
        raise ValueError(f"{where}: the query id is not in 'images' or 'query_images'")
    splits = (("easy", easy or frozenset()), ("hard", hard or frozenset()))
    for kind, ids in (("positive", positives), ("junk", junk), *splits):
        unknown = sorted(ids - image_set)
        if unknown:
            raise ValueError(f"{where}: {kind} ids not in 'images': {_preview(unknown)}")
    if query_id in positives and not query_in_ranking:
        # Only meaningful where the query stays in its ranking (Oxford5k: the full query
        # image is a good result for its crop); otherwise it would be a free hit.
        raise ValueError(f"{where}: the query lists itself as a positive")
    if easy is not None and hard is not None and (easy | hard) != positives:
        raise ValueError(f"{where}: 'positives' must be 'easy' + 'hard' (Revisited ground truth)")
    both = sorted(positives & junk)
    if both:
        raise ValueError(f"{where}: ids both positive and junk: {_preview(both)}")
    return Query(
        id=query_id,
        landmark=landmark,
        positives=positives,
        junk=junk,
        bbox=bbox,
        easy=easy,
        hard=hard,
    )


def _optional_set(raw: dict[str, Any], key: str, where: str) -> frozenset[str] | None:
    return frozenset(_string_list(raw, key, where)) if key in raw else None


def _parse_bbox(value: Any, where: str) -> tuple[float, float, float, float] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != 4
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(f"{where}: 'bbox' must be [x1, y1, x2, y2] (numbers)")
    x1, y1, x2, y2 = (float(v) for v in value)
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"{where}: 'bbox' {value} is empty (needs x2 > x1 and y2 > y1)")
    return (x1, y1, x2, y2)


def _string_list(
    obj: dict[str, Any], key: str, where: str, default: list[str] | None = None
) -> list[str]:
    value = obj.get(key, default)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: {key!r} must be a list of strings")
    return value


def _require_unique(ids: Iterable[str], message: str) -> None:
    seen: set[str] = set()
    for image_id in ids:
        if image_id in seen:
            raise ValueError(f"{message} {image_id!r}")
        seen.add(image_id)


def _preview(ids: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f" (and {len(ids) - limit} more)" if len(ids) > limit else "")
