"""The standard instance-retrieval benchmarks this project knows how to fetch and convert.

Every URL is the publisher's own. No SHA-256 digest is published for any of these archives
(revisitop's download code checks none; GLDv2 publishes MD5 files only), so ``sha256`` is None
everywhere here: ``fetch`` then checks the size the server announced and the archive's
structure, and records the digest it computed on the first download in
``<DIR>/downloads/SHA256SUMS``; later downloads into the same folder must match it. A digest
goes into this file only when it comes from a trustworthy published source.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RemoteFile:
    """One file to download. ``optional`` files (GLDv2 images) are fetched only on request."""

    url: str
    sha256: str | None = None
    optional: bool = False

    @property
    def filename(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class DatasetSpec:
    """A benchmark: where it comes from, how big it is, how to cite it, how to convert it."""

    name: str
    title: str
    files: tuple[RemoteFile, ...]
    converter: str  # a function name in retrieval.datasets.formats.CONVERTERS
    download_size: str
    images: str
    queries: str
    protocol: str
    licence: str
    citation: str
    expected_images: int | None = None  # checked after conversion, when known
    expected_queries: int | None = None
    notes: tuple[str, ...] = field(default=())


_OXFORD = "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings"
_PARIS = "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings"
_REVISITOP = "http://cmp.felk.cvut.cz/revisitop/data/datasets"
_GLDV2 = "https://s3.amazonaws.com/google-landmark"

_OXFORD_IMAGES = RemoteFile(f"{_OXFORD}/oxbuild_images-v1.tgz")
_PARIS_IMAGES = (RemoteFile(f"{_PARIS}/paris_1-v1.tgz"), RemoteFile(f"{_PARIS}/paris_2-v1.tgz"))

_OXFORD_CITATION = (
    "J. Philbin, O. Chum, M. Isard, J. Sivic, A. Zisserman. Object retrieval with large "
    "vocabularies and fast spatial matching. CVPR 2007."
)
_PARIS_CITATION = (
    "J. Philbin, O. Chum, M. Isard, J. Sivic, A. Zisserman. Lost in quantization: improving "
    "particular object retrieval in large scale image databases. CVPR 2008."
)
_REVISITED_CITATION = (
    "F. Radenović, A. Iscen, G. Tolias, Y. Avrithis, O. Chum. Revisiting Oxford and Paris: "
    "large-scale image retrieval benchmarking. CVPR 2018."
)
_FLICKR_LICENCE = (
    "Flickr photos collected by the Oxford Visual Geometry Group for research; each photo "
    "keeps its owner's copyright. Research use; do not redistribute the images."
)

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="oxford5k",
            title="Oxford Buildings (Oxford5k)",
            files=(_OXFORD_IMAGES, RemoteFile(f"{_OXFORD}/gt_files_170407.tgz")),
            converter="oxford_txt",
            download_size="about 1.9 GB",
            images="5,063",
            queries="55 (11 landmarks × 5, with query crops)",
            protocol="oxford5k: query = its bounding-box crop; positives good+ok, junk ignored; "
            "the query image stays in its ranking",
            licence=_FLICKR_LICENCE,
            citation=_OXFORD_CITATION,
            expected_images=5063,
            expected_queries=55,
        ),
        DatasetSpec(
            name="paris6k",
            title="Paris Buildings (Paris6k)",
            files=(*_PARIS_IMAGES, RemoteFile(f"{_PARIS}/paris_120310.tgz")),
            converter="paris_txt",
            download_size="about 2.4 GB",
            images="6,412 (20 of them are unreadable in the official archive)",
            queries="55 (11 landmarks × 5, with query crops)",
            protocol="paris6k: as oxford5k",
            licence=_FLICKR_LICENCE,
            citation=_PARIS_CITATION,
            expected_queries=55,
            notes=("The official archive holds 20 corrupt JPEGs; they become failure rows.",),
        ),
        DatasetSpec(
            name="roxford5k",
            title="Revisited Oxford (ROxford5k)",
            files=(_OXFORD_IMAGES, RemoteFile(f"{_REVISITOP}/roxford5k/gnd_roxford5k.pkl")),
            converter="revisitop_gnd",
            download_size="about 1.9 GB",
            images="4,993 database images + 70 query images",
            queries="70 (cropped), Easy / Medium / Hard",
            protocol="revisited: `retrieval evaluate --protocol roxford` (Easy, Medium, Hard)",
            licence=_FLICKR_LICENCE + " Revisited annotation: research use.",
            citation=_REVISITED_CITATION + " " + _OXFORD_CITATION,
            expected_images=4993,
            expected_queries=70,
        ),
        DatasetSpec(
            name="rparis6k",
            title="Revisited Paris (RParis6k)",
            files=(*_PARIS_IMAGES, RemoteFile(f"{_REVISITOP}/rparis6k/gnd_rparis6k.pkl")),
            converter="revisitop_gnd",
            download_size="about 2.4 GB",
            images="6,322 database images + 70 query images",
            queries="70 (cropped), Easy / Medium / Hard",
            protocol="revisited: `retrieval evaluate --protocol rparis` (Easy, Medium, Hard)",
            licence=_FLICKR_LICENCE + " Revisited annotation: research use.",
            citation=_REVISITED_CITATION + " " + _PARIS_CITATION,
            expected_images=6322,
            expected_queries=70,
        ),
        DatasetSpec(
            name="holidays",
            title="INRIA Holidays",
            files=(
                RemoteFile("ftp://ftp.inrialpes.fr/pub/lear/douze/data/jpg1.tar.gz"),
                RemoteFile("ftp://ftp.inrialpes.fr/pub/lear/douze/data/jpg2.tar.gz"),
            ),
            converter="holidays",
            download_size="about 1.1 GB",
            images="1,491 (full resolution; some are rotated, as published)",
            queries="500 (the first image of each group)",
            protocol="holidays: the query is removed from its ranking; positives = the rest "
            "of its group (ids NNNNxx share NNNN)",
            licence="INRIA personal holiday photos; research use only.",
            citation="H. Jégou, M. Douze, C. Schmid. Hamming embedding and weak geometric "
            "consistency for large scale image search. ECCV 2008.",
            expected_images=1491,
            expected_queries=500,
            notes=("Served over FTP: an interrupted download restarts (no HTTP Range).",),
        ),
        DatasetSpec(
            name="ukbench",
            title="UKBench (Recognition Benchmark Images)",
            files=(RemoteFile("https://archive.org/download/ukbench/ukbench.zip"),),
            converter="ukbench",
            download_size="about 1.5 GB",
            images="10,200 (2,550 objects × 4 views)",
            queries="10,200 (every image)",
            protocol="ukbench: N-S score = mean number of the 4 group images in the top 4 "
            "(the query counts), 0-4",
            licence="University of Kentucky; research use.",
            citation="D. Nistér, H. Stewénius. Scalable recognition with a vocabulary tree. "
            "CVPR 2006.",
            expected_images=10200,
            expected_queries=10200,
            notes=(
                "The original host (vis.uky.edu/~stewe/ukbench) is gone; the Internet Archive "
                "copy of the same ukbench.zip is used.",
            ),
        ),
        DatasetSpec(
            name="gldv2-retrieval",
            title="Google Landmarks v2, retrieval task (index + test)",
            files=(
                RemoteFile(f"{_GLDV2}/metadata/index.csv"),
                RemoteFile(f"{_GLDV2}/metadata/test.csv"),
                RemoteFile(f"{_GLDV2}/metadata/index_image_to_landmark.csv"),
                RemoteFile(f"{_GLDV2}/ground_truth/retrieval_solution_v2.1.csv"),
                *(
                    RemoteFile(f"{_GLDV2}/index/images_{i:03d}.tar", optional=True)
                    for i in range(100)
                ),
                *(
                    RemoteFile(f"{_GLDV2}/test/images_{i:03d}.tar", optional=True)
                    for i in range(20)
                ),
            ),
            converter="gldv2",
            download_size="lists about 60 MB; images about 110 GB (--with-images)",
            images="761,757 index images",
            queries="1,129 scored test queries (Public + Private), 117,577 test images",
            protocol="gldv2: queries are test images, positives the index images of the same "
            "landmark (retrieval_solution_v2.1.csv); Kaggle reports mAP@100",
            licence="Annotations CC BY 4.0 (Google); images have their own licences.",
            citation="T. Weyand, A. Araujo, B. Cao, J. Sim. Google Landmarks Dataset v2: a "
            "large-scale benchmark for instance-level recognition and retrieval. CVPR 2020.",
        ),
    )
}


def get(name: str) -> DatasetSpec:
    """The spec of a known benchmark; ValueError listing the known names otherwise."""
    try:
        return DATASETS[name]
    except KeyError:
        known = ", ".join(DATASETS)
        raise ValueError(f"unknown dataset {name!r}; known: {known}") from None
