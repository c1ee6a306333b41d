"""Choosing a local-feature extractor by name (``LocalFeatureConfig.method``).

The types every extractor shares are in ``features.py``; this module imports the extractors,
which import only those types.
"""

from __future__ import annotations

from typing import Any

from retrieval.local_features.features import (
    LocalFeatureConfig,
    LocalFeatureExtractor,
    local_model_info,
)


def build_local_extractor(
    config: LocalFeatureConfig, threads: int | None = None
) -> LocalFeatureExtractor:
    """The extractor named by ``config.method`` (one per worker: DELF holds a model).

    ``threads``: the worker's share of the cores, which OpenCV's thread pool (SIFT's pyramid)
    is pinned to for the process. Left at OpenCV's default (every core) in each of a machine's
    worker processes, SIFT's second thread bought 0-20% of wall time for ~40% more CPU
    (448 px, oxford-dev, measured one process alone): CPU the other workers needed."""
    if threads:
        import cv2

        cv2.setNumThreads(threads)
    if config.method == "rootsift":
        from retrieval.local_features.rootsift import RootSIFTExtractor

        return RootSIFTExtractor(config)
    if config.method.startswith("delf:"):
        from retrieval.local_features.delf_hub import DelfExtractor

        return DelfExtractor(config)
    raise ValueError("local features are turned off (method 'none')")


def local_info_for(config: LocalFeatureConfig) -> dict[str, Any]:
    """Manifest model info without building the extractor where that is cheap (RootSIFT)."""
    if config.method == "rootsift" and not config.projection_dim:
        from retrieval.local_features.rootsift import ROOTSIFT_DIM, rootsift_identity

        return local_model_info(config, ROOTSIFT_DIM, rootsift_identity())
    return build_local_extractor(config).info()  # a projection: its basis is in the identity
