"""The field's ground-truth formats, read safely, and converted to the project's gt.json.

- Revisited Oxford/Paris ``gnd_<set>.pkl``: a pickle, so it is read with a restricted
  unpickler that builds only plain containers, numbers, strings and NumPy arrays (never an
  arbitrary class or function: a plain ``pickle.load`` of a downloaded file can run code).
- Oxford5k / Paris6k ``<landmark>_<n>_{good,ok,junk,query}.txt``, the query file holding the
  query image and its bounding box.
- INRIA Holidays: groups by file name (``NNNNxx.jpg`` share ``NNNN``; ``NNNN00`` is the query).
- UKBench: ``ukbenchNNNNN.jpg``, consecutive groups of 4.
- Google Landmarks v2 retrieval: ``retrieval_solution_v2.1.csv`` (id, images, Usage) with
  ``index.csv``, ``test.csv`` and ``index_image_to_landmark.csv``.

Each ``convert_*`` function takes the folder the archives were unpacked into and the output
folder, moves the images into ``images/`` (and ``queries/``), writes ``gt.json`` and returns
the counts. Structure problems (a missing ground-truth file, a ground truth naming an image the
archive lacks) raise ``FormatError`` naming the file.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import re
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.evaluation.ground_truth import (
    GT_FILENAME,
    IMAGES_DIRNAME,
    QUERY_IMAGES_DIRNAME,
    parse_benchmark,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class FormatError(ValueError):
    """A ground-truth file or archive does not have the structure of its format."""


# --------------------------------------------------------------------------- safe pickle


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for something other than plain containers and NumPy arrays."""


# Module and name -> object, for the few globals a pickled dict of lists / NumPy arrays uses.
# numpy 1.x pickles name "numpy.core.multiarray"; numpy 2 writes "numpy._core.multiarray".
_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    **{
        (module, name): (lambda name=name: getattr(np._core.multiarray, name))
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    },
    **{
        (module, "_frombuffer"): lambda: _checked_frombuffer  # pickle protocol 5
        for module in ("numpy.core.numeric", "numpy._core.numeric")
    },
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: _checked_dtype,
    ("builtins", "set"): lambda: set,
    ("builtins", "frozenset"): lambda: frozenset,
    ("__builtin__", "set"): lambda: set,
    ("_codecs", "encode"): lambda: _latin1_encode,  # Python 2 / protocol-2 bytes
}


def _checked_dtype(name: Any, align: Any = False, copy: Any = False) -> np.dtype:
    dtype = np.dtype(name)
    if dtype.hasobject:
        # An object array would unpickle arbitrary objects through its items.
        raise UnsafePickleError(f"refused NumPy dtype {dtype} (holds Python objects)")
    return dtype


def _checked_frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    return np._core.numeric._frombuffer(buffer, _checked_dtype(dtype), shape, order)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise UnsafePickleError(
                f"refused {module}.{name}: a ground-truth pickle holds only plain containers "
                "and NumPy arrays"
            )
        return factory()

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refused a persistent id")


def safe_load_pickle(data: bytes) -> Any:
    """Unpickle ``data`` admitting only dicts, lists, tuples, sets, numbers, strings, bytes and
    NumPy arrays of plain dtypes; anything else raises ``UnsafePickleError`` before it is built.
    Python 2 pickles (revisitop's files were written by Python 3, but copies vary) are read with
    latin1 strings so NumPy buffers survive."""
    return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


# --------------------------------------------------------------------------- revisitop gnd


def read_revisitop_gnd(path: str | os.PathLike) -> dict[str, Any]:
    """``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl`` as {"imlist", "qimlist", "gnd"}: image and
    query names, and per query {"bbx": [x1, y1, x2, y2], "easy", "hard", "junk"} with indices
    into imlist (as Python ints). Validated: indices in range, bbox of 4 numbers."""
    path = Path(path)
    try:
        cfg = safe_load_pickle(path.read_bytes())
    except UnsafePickleError as exc:
        raise FormatError(f"{path.name}: {exc}") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise FormatError(f"{path.name}: not a readable pickle: {exc}") from exc
    if not isinstance(cfg, dict) or not {"imlist", "qimlist", "gnd"} <= cfg.keys():
        raise FormatError(f"{path.name}: expected a dict with imlist, qimlist and gnd")
    imlist = [str(x) for x in cfg["imlist"]]
    qimlist = [str(x) for x in cfg["qimlist"]]
    gnd = list(cfg["gnd"])
    if len(gnd) != len(qimlist):
        raise FormatError(f"{path.name}: {len(gnd)} gnd entries for {len(qimlist)} queries")
    entries = []
    for i, entry in enumerate(gnd):
        if not isinstance(entry, dict):
            raise FormatError(f"{path.name}: gnd[{i}] is not a dict")
        parsed: dict[str, Any] = {}
        for key in ("easy", "hard", "junk"):
            indices = [int(v) for v in np.asarray(entry.get(key, []), dtype=np.int64).ravel()]
            bad = [v for v in indices if not 0 <= v < len(imlist)]
            if bad:
                raise FormatError(f"{path.name}: gnd[{i}][{key!r}] index {bad[0]} out of range")
            parsed[key] = indices
        bbx = [float(v) for v in np.asarray(entry.get("bbx", []), dtype=np.float64).ravel()]
        if len(bbx) != 4:
            raise FormatError(f"{path.name}: gnd[{i}]['bbx'] is not 4 numbers")
        parsed["bbx"] = bbx
        entries.append(parsed)
    return {"imlist": imlist, "qimlist": qimlist, "gnd": entries}


def revisitop_to_gt(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """gt.json content from a read gnd file: database = imlist, query images = qimlist (kept
    out of the database, as the protocol requires), positives = easy + hard (Medium), junk =
    junk, with easy/hard kept for the Easy and Hard setups and the bbox for the crop."""
    imlist, qimlist = cfg["imlist"], cfg["qimlist"]
    queries = []
    for qid, entry in zip(qimlist, cfg["gnd"], strict=True):
        easy = sorted(imlist[i] for i in entry["easy"])
        hard = sorted(imlist[i] for i in entry["hard"])
        queries.append(
            {
                "id": qid,
                "landmark": _landmark_of(qid),
                "positives": sorted({*easy, *hard}),
                "junk": sorted(imlist[i] for i in entry["junk"]),
                "easy": easy,
                "hard": hard,
                "bbox": entry["bbx"],
            }
        )
    return {
        "source": source,
        "protocol": "revisited (Easy/Medium/Hard; positives here are Medium's); query crops; "
        "query images are not in the database",
        "images": list(imlist),
        "query_images": list(qimlist),
        "queries": queries,
    }


def _landmark_of(image_id: str) -> str:
    """all_souls_000013 -> all_souls; paris_defense_000605 -> defense."""
    name = re.sub(r"_\d+$", "", image_id)
    return name.removeprefix("paris_")


# --------------------------------------------------------------------------- Oxford/Paris txt

_QUERY_FILE = re.compile(r"^(?P<landmark>.+)_(?P<n>\d+)_query\.txt$")


def read_oxford_txt(gt_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Queries from the Oxford5k / Paris6k ground-truth files in ``gt_dir``: for each
    ``<landmark>_<n>_query.txt`` ("[oxc1_]<image> x1 y1 x2 y2") and its good/ok/junk lists.

    Positives are good + ok; the query keeps its bbox. Raises FormatError if a list is missing.
    """
    gt_dir = Path(gt_dir)
    queries = []
    for query_file in sorted(gt_dir.glob("*_query.txt")):
        match = _QUERY_FILE.match(query_file.name)
        if not match:
            continue
        stem = query_file.name.removesuffix("_query.txt")
        fields = query_file.read_text(encoding="utf-8").split()
        if len(fields) != 5:
            raise FormatError(f"{query_file.name}: expected '<image> x1 y1 x2 y2'")
        image = fields[0].removeprefix("oxc1_")
        try:
            bbox = [float(v) for v in fields[1:]]
        except ValueError as exc:
            raise FormatError(f"{query_file.name}: bad bounding box: {exc}") from exc
        lists = {}
        for kind in ("good", "ok", "junk"):
            path = gt_dir / f"{stem}_{kind}.txt"
            if not path.exists():
                raise FormatError(f"{query_file.name}: {path.name} is missing")
            lists[kind] = path.read_text(encoding="utf-8").split()
        queries.append(
            {
                "id": image,
                "landmark": match.group("landmark"),
                "number": int(match.group("n")),
                "positives": sorted({*lists["good"], *lists["ok"]}),
                "junk": sorted(set(lists["junk"]) - set(lists["good"]) - set(lists["ok"])),
                "bbox": bbox,
            }
        )
    if not queries:
        raise FormatError(f"{gt_dir}: no *_query.txt ground-truth files")
    return queries


# --------------------------------------------------------------------------- Holidays, UKBench

_HOLIDAYS_NAME = re.compile(r"^\d{6}$")
_UKBENCH_NAME = re.compile(r"^ukbench(\d{5})$")


def holidays_queries(image_ids: Iterable[str]) -> list[dict[str, Any]]:
    """INRIA Holidays groups: images ``NNNNxx`` form group ``NNNN``; its first image (the
    smallest id, ``NNNN00`` in the published set) is the query, the others its positives."""
    groups: dict[str, list[str]] = defaultdict(list)
    for image_id in image_ids:
        if not _HOLIDAYS_NAME.match(image_id):
            raise FormatError(f"Holidays image {image_id!r} is not named NNNNNN (6 digits)")
        groups[image_id[:4]].append(image_id)
    queries = []
    for group, members in sorted(groups.items()):
        members.sort()
        if len(members) < 2:
            raise FormatError(f"Holidays group {group} has a single image ({members[0]})")
        queries.append({"id": members[0], "landmark": group, "positives": members[1:], "junk": []})
    return queries


def ukbench_queries(image_ids: Iterable[str]) -> list[dict[str, Any]]:
    """UKBench: ``ukbench%05d`` images in consecutive groups of 4 (object n = number // 4);
    every image is a query and its positives are the other 3 views."""
    groups: dict[int, list[str]] = defaultdict(list)
    for image_id in image_ids:
        match = _UKBENCH_NAME.match(image_id)
        if not match:
            raise FormatError(f"UKBench image {image_id!r} is not named ukbenchNNNNN")
        groups[int(match.group(1)) // 4].append(image_id)
    queries = []
    for group, members in sorted(groups.items()):
        if len(members) != 4:
            raise FormatError(f"UKBench object {group} has {len(members)} images, not 4")
        for member in sorted(members):
            positives = sorted(m for m in members if m != member)
            queries.append(
                {"id": member, "landmark": f"object_{group:05d}", "positives": positives}
            )
    return queries


# --------------------------------------------------------------------------- GLDv2


def read_gldv2_csv(path: str | os.PathLike, columns: Iterable[str]) -> list[dict[str, str]]:
    """Rows of a GLDv2 CSV, checking that the header has ``columns``."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = set(columns) - set(reader.fieldnames or ())
        if missing:
            raise FormatError(f"{path.name}: missing column(s) {sorted(missing)}")
        return list(reader)


def gldv2_to_gt(raw: Path) -> dict[str, Any]:
    """gt.json from the GLDv2 retrieval lists: database = index.csv ids, query images = the
    test ids scored in retrieval_solution_v2.1.csv (Usage Public or Private; "Ignored" rows
    have no ground truth), positives = their listed index images, landmark = the index images'
    landmark (index_image_to_landmark.csv)."""
    index_ids = [row["id"] for row in read_gldv2_csv(_find(raw, "index.csv"), ["id"])]
    landmark_rows = read_gldv2_csv(_find(raw, "index_image_to_landmark.csv"), ["id", "landmark_id"])
    landmark_of = {row["id"]: row["landmark_id"] for row in landmark_rows}
    solution = read_gldv2_csv(_find(raw, "retrieval_solution_v2.1.csv"), ["id", "images", "Usage"])
    index_set = set(index_ids)
    queries = []
    for row in solution:
        if row["Usage"] not in ("Public", "Private"):
            continue
        positives = row["images"].split()
        unknown = [p for p in positives if p not in index_set]
        if unknown:
            raise FormatError(
                f"retrieval_solution_v2.1.csv: {row['id']}: {unknown[0]} is not in index.csv"
            )
        landmarks = sorted({landmark_of.get(p, "?") for p in positives})
        queries.append(
            {
                "id": row["id"],
                "landmark": landmarks[0] if len(landmarks) == 1 else "+".join(landmarks),
                "positives": sorted(positives),
                "usage": row["Usage"],
            }
        )
    test_ids = {row["id"] for row in read_gldv2_csv(_find(raw, "test.csv"), ["id"])}
    missing = [q["id"] for q in queries if q["id"] not in test_ids]
    if missing:
        raise FormatError(f"retrieval_solution_v2.1.csv: query {missing[0]} not in test.csv")
    return {
        "source": "Google Landmarks v2 retrieval (index + test), retrieval_solution_v2.1.csv",
        "protocol": "gldv2: test queries against the index; Kaggle scores mAP@100",
        "images": index_ids,
        "query_images": sorted(q["id"] for q in queries),
        "queries": queries,
    }


# --------------------------------------------------------------------------- conversion


def _find(raw: Path, filename: str) -> Path:
    matches = sorted(raw.rglob(filename))
    if not matches:
        raise FormatError(f"{filename} not found in the downloaded files")
    return matches[0]


def _image_files(raw: Path) -> dict[str, Path]:
    """Every image file under ``raw`` by id (file name without extension); a name found twice
    with different content is an error (flattening would lose one)."""
    found: dict[str, Path] = {}
    for path in sorted(raw.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        previous = found.get(path.stem)
        if previous is not None and previous.read_bytes() != path.read_bytes():
            raise FormatError(f"two different images named {path.stem}: {previous}, {path}")
        found.setdefault(path.stem, path)
    return found


def _place(files: dict[str, Path], ids: Iterable[str], folder: Path) -> None:
    """Move the images ``ids`` into ``folder`` as ``<id><ext>``; FormatError if one is absent."""
    folder.mkdir(parents=True, exist_ok=True)
    for image_id in ids:
        source = files.get(image_id)
        if source is None:
            raise FormatError(f"the ground truth names image {image_id!r}, not in the archives")
        shutil.move(source, folder / f"{image_id}{source.suffix.lower()}")


def _write_gt(gt: dict[str, Any], out: Path) -> dict[str, int]:
    # Validate with the same reader `retrieval evaluate` uses before writing anything.
    benchmark = parse_benchmark(gt, name=out.name, source=GT_FILENAME)
    text = json.dumps(gt, indent=1, ensure_ascii=False)
    tmp = out / (GT_FILENAME + ".tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    tmp.replace(out / GT_FILENAME)
    return {
        "images": len(benchmark.images),
        "query_images": len(benchmark.query_images),
        "queries": len(benchmark.queries),
    }


def convert_oxford_txt(raw: Path, out: Path, *, source: str = "Oxford5k") -> dict[str, int]:
    """Oxford5k / Paris6k: every image of the archives is in the database (query images too:
    each is a good result of its own crop, so the query stays in its ranking)."""
    query_files = sorted(raw.rglob("*_query.txt"))
    if not query_files:
        raise FormatError(f"no {source} ground truth (*_query.txt) in the downloaded files")
    queries = read_oxford_txt(query_files[0].parent)
    files = _image_files(raw)
    _place(files, sorted(files), out / IMAGES_DIRNAME)
    images = sorted(p.stem for p in (out / IMAGES_DIRNAME).iterdir())
    image_set = set(images)
    for query in queries:
        for key in ("positives", "junk"):
            unknown = [i for i in query[key] if i not in image_set]
            if unknown:
                raise FormatError(f"{query['landmark']}: {key} image {unknown[0]!r} not in archive")
        query.pop("number")
    gt = {
        "source": f"{source} (official archives and ground truth)",
        "protocol": f"{source.lower()}: query = its bounding-box crop; positives good + ok; "
        "junk ignored; the query image stays in its ranking",
        "query_in_ranking": True,
        "images": images,
        "queries": queries,
    }
    return _write_gt(gt, out)


def convert_paris_txt(raw: Path, out: Path) -> dict[str, int]:
    return convert_oxford_txt(raw, out, source="Paris6k")


def convert_revisitop_gnd(raw: Path, out: Path) -> dict[str, int]:
    gnd_file = next(iter(sorted(raw.rglob("gnd_*.pkl"))), None)
    if gnd_file is None:
        raise FormatError("gnd_*.pkl not found in the downloaded files")
    cfg = read_revisitop_gnd(gnd_file)
    files = _image_files(raw)
    _place(files, cfg["imlist"], out / IMAGES_DIRNAME)
    _place(files, cfg["qimlist"], out / QUERY_IMAGES_DIRNAME)
    return _write_gt(revisitop_to_gt(cfg, f"{gnd_file.name} (revisitop) + official images"), out)


def convert_holidays(raw: Path, out: Path) -> dict[str, int]:
    files = _image_files(raw)
    if not files:
        raise FormatError("no Holidays images (NNNNNN.jpg) in the archives")
    images = sorted(files)
    gt = {
        "source": "INRIA Holidays (jpg1.tar.gz + jpg2.tar.gz)",
        "protocol": "holidays: the first image of each group is the query, the others its "
        "positives; the query is removed from its ranking",
        "images": images,
        "queries": holidays_queries(images),
    }
    _place(files, images, out / IMAGES_DIRNAME)
    return _write_gt(gt, out)


def convert_ukbench(raw: Path, out: Path) -> dict[str, int]:
    files = {k: v for k, v in _image_files(raw).items() if _UKBENCH_NAME.match(k)}
    if not files:
        raise FormatError("no UKBench images (ukbenchNNNNN.jpg) in the archive")
    images = sorted(files)
    gt = {
        "source": "UKBench (ukbench.zip)",
        "protocol": "ukbench: every image is a query, positives the other 3 views of its "
        "object; N-S score counts the query itself",
        "images": images,
        "queries": ukbench_queries(images),
    }
    _place(files, images, out / IMAGES_DIRNAME)
    return _write_gt(gt, out)


def convert_gldv2(raw: Path, out: Path) -> dict[str, int]:
    gt = gldv2_to_gt(raw)
    files = _image_files(raw)
    if files:  # images were requested (--with-images): place what arrived
        _place(files, [i for i in gt["images"] if i in files], out / IMAGES_DIRNAME)
        _place(files, [i for i in gt["query_images"] if i in files], out / QUERY_IMAGES_DIRNAME)
    return _write_gt(gt, out)


CONVERTERS: dict[str, Callable[[Path, Path], dict[str, int]]] = {
    "oxford_txt": convert_oxford_txt,
    "paris_txt": convert_paris_txt,
    "revisitop_gnd": convert_revisitop_gnd,
    "holidays": convert_holidays,
    "ukbench": convert_ukbench,
    "gldv2": convert_gldv2,
}


def convert(converter: str, raw: Path, out: Path) -> dict[str, int]:
    """Run the named converter (``DatasetSpec.converter``)."""
    return CONVERTERS[converter](raw, out)
