"""Read a PyTorch state dict (``torch.save`` output) into NumPy arrays without importing torch.

Why: the project's default backbone weights ship as a ``.pth`` file, but torch is not (and should
not be) a dependency. A ``.pth`` file is a pickle, and unpickling runs arbitrary code, so the
project rule is "never unpickle untrusted files". This reader uses a *restricted* unpickler: the
only globals it resolves are the handful a plain state dict needs, each mapped to a local, inert
stand-in (``OrderedDict``, ``torch._utils._rebuild_tensor_v2``/``_rebuild_parameter`` and the typed
``torch.*Storage`` markers). Any other global, e.g. ``os.system``, raises ``UnsafeCheckpointError``
before anything is called.

Both on-disk layouts written by ``torch.save`` are supported:

* the zip format (torch >= 1.6): ``<archive>/data.pkl`` plus one raw file per storage,
  ``<archive>/data/<key>``, and optionally ``<archive>/byteorder``;
* the legacy format (what ``efficientnet-lite0-57934424.pth`` actually is): consecutive pickles
  (magic number, protocol version, system info, the object, the storage keys) followed, for each
  storage key in order, by an int64 element count and the storage's raw bytes.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

__all__ = ["UnsafeCheckpointError", "read_torch_state_dict"]

_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint's pickle asks for something a plain state dict never needs."""


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for a ``torch.<Name>Storage`` class: only records the element dtype."""

    name: str
    dtype: str  # NumPy dtype without byte order, e.g. "f4"; "bf16" is special-cased


# torch storage class name -> element dtype. bfloat16 has no NumPy dtype: read as uint16, widen.
_STORAGE_TYPES = {
    name: _StorageType(name, dtype)
    for name, dtype in {
        "FloatStorage": "f4",
        "DoubleStorage": "f8",
        "HalfStorage": "f2",
        "BFloat16Storage": "bf16",
        "LongStorage": "i8",
        "IntStorage": "i4",
        "ShortStorage": "i2",
        "CharStorage": "i1",
        "ByteStorage": "u1",
        "BoolStorage": "?",
    }.items()
}


@dataclass(frozen=True)
class _StorageRef:
    """A storage named in the pickle; its bytes are read after unpickling."""

    key: str
    storage_type: _StorageType
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    """What ``_rebuild_tensor_v2`` returns here: a view description, materialised later."""

    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # in elements, as torch stores them


def _rebuild_tensor_v2(
    storage: _StorageRef,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> _TensorRef:
    if not isinstance(storage, _StorageRef):
        raise UnsafeCheckpointError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    if len(size) != len(stride):
        raise UnsafeCheckpointError(f"tensor shape {size} and strides {stride} disagree")
    return _TensorRef(storage, int(storage_offset), tuple(map(int, size)), tuple(map(int, stride)))


def _rebuild_parameter(data: _TensorRef, requires_grad: bool = False, backward_hooks: Any = None):
    """``nn.Parameter`` pickled directly: keep the tensor, drop the Parameter wrapper."""
    if not isinstance(data, _TensorRef):
        raise UnsafeCheckpointError("parameter rebuilt from something that is not a tensor")
    return data


# (module, name) -> the local object returned in its place. Nothing else resolves.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): storage_type for name, storage_type in _STORAGE_TYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only ``_ALLOWED_GLOBALS`` and torch's storage persistent ids."""

    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file)
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing to load global {module}.{name}: a plain state dict only needs "
                "OrderedDict, torch._utils._rebuild_tensor_v2 and torch.*Storage"
            ) from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        # torch writes ('storage', StorageType, key, location, numel[, view_metadata]).
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel, *view = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int):
            raise UnsafeCheckpointError(f"unexpected storage description {pid!r}")
        if view and view[0] is not None:
            raise UnsafeCheckpointError("legacy storage views are not supported")
        key = str(key)
        ref = self.storages.setdefault(key, _StorageRef(key, storage_type, numel))
        if ref.storage_type != storage_type:
            raise UnsafeCheckpointError(f"storage {key} used with two element types")
        return ref


def _itemsize(storage: _StorageRef) -> int:
    code = storage.storage_type.dtype
    return 2 if code == "bf16" else np.dtype(code).itemsize


def _array_from_bytes(data: bytes, storage: _StorageRef, byteorder: str) -> np.ndarray:
    """Decode one storage's raw bytes into a flat native-endian array of ``storage.numel``."""
    code = storage.storage_type.dtype
    dtype = np.dtype("u2" if code == "bf16" else code).newbyteorder(byteorder)
    if len(data) < storage.numel * dtype.itemsize:
        raise ValueError(f"storage {storage.key} is truncated")
    flat = np.frombuffer(data, dtype=dtype, count=storage.numel)
    flat = flat.astype(dtype.newbyteorder("="))  # a native-endian copy that owns its memory
    if code == "bf16":  # bfloat16 is the top half of a float32
        flat = (flat.astype(np.uint32) << 16).view(np.float32)
    return flat


def _materialise(tensor: _TensorRef, flat: np.ndarray) -> np.ndarray:
    """Apply torch's (offset, shape, strides in elements) view and copy into a fresh array."""
    shape, strides = tensor.shape, tensor.strides
    if tensor.offset < 0 or any(n < 0 for n in shape) or any(s < 0 for s in strides):
        raise ValueError(f"invalid view of storage {tensor.storage.key}")
    if 0 in shape:
        return np.zeros(shape, dtype=flat.dtype)
    # Highest element index the view touches: it must lie inside the storage.
    last = tensor.offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
    if last >= flat.size:
        raise ValueError(f"tensor view runs past the end of storage {tensor.storage.key}")
    # A weight never has more elements than its storage; more means overlapping (e.g. stride-0)
    # views, which a crafted file could use to make us allocate unbounded memory.
    if int(np.prod(shape, dtype=np.int64)) > flat.size:
        raise ValueError(f"tensor view repeats elements of storage {tensor.storage.key}")
    view = np.lib.stride_tricks.as_strided(
        flat[tensor.offset :],
        shape=shape,
        strides=[s * flat.itemsize for s in strides],
        writeable=False,
    )
    return np.array(view, order="C")  # copy: never alias the storage buffer


def _to_state_dict(obj: Any, storages: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    out: dict[str, np.ndarray] = {}
    for name, tensor in obj.items():
        if not isinstance(name, str) or not isinstance(tensor, _TensorRef):
            raise ValueError(f"state dict entry {name!r} is not a named tensor")
        out[name] = _materialise(tensor, storages[tensor.storage.key])
    return out


def _read_zip(path: str | os.PathLike) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"{path}: expected one <archive>/data.pkl, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "<"
        if prefix + "byteorder" in archive.namelist():
            byteorder = {"little": "<", "big": ">"}[archive.read(prefix + "byteorder").decode()]
        unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])))
        obj = unpickler.load()
        storages = {
            key: _array_from_bytes(archive.read(f"{prefix}data/{key}"), ref, byteorder)
            for key, ref in unpickler.storages.items()
        }
    return _to_state_dict(obj, storages)


def _read_legacy(path: str | os.PathLike) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        if _RestrictedUnpickler(f).load() != _LEGACY_MAGIC_NUMBER:
            raise ValueError(f"{path}: not a PyTorch checkpoint (bad magic number)")
        if _RestrictedUnpickler(f).load() != _LEGACY_PROTOCOL_VERSION:
            raise ValueError(f"{path}: unsupported legacy PyTorch protocol version")
        sys_info = _RestrictedUnpickler(f).load()
        if not isinstance(sys_info, dict):
            raise ValueError(f"{path}: malformed legacy PyTorch header")
        byteorder = "<" if sys_info.get("little_endian", True) else ">"
        unpickler = _RestrictedUnpickler(f)
        obj = unpickler.load()
        storage_keys = _RestrictedUnpickler(f).load()
        if not isinstance(storage_keys, list) or set(storage_keys) != set(unpickler.storages):
            raise ValueError(f"{path}: storage key list does not match the pickled tensors")
        storages: dict[str, np.ndarray] = {}
        for key in storage_keys:
            ref = unpickler.storages[key]
            numel = int(np.frombuffer(f.read(8), dtype=byteorder + "i8")[0])
            if numel != ref.numel:
                raise ValueError(
                    f"{path}: storage {key} has {numel} elements, expected {ref.numel}"
                )
            storages[key] = _array_from_bytes(f.read(numel * _itemsize(ref)), ref, byteorder)
    return _to_state_dict(obj, storages)


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a ``torch.save``-d state dict as ``{name: np.ndarray}`` without importing torch.

    Arrays are C-contiguous copies in native byte order with torch's shapes (e.g. conv weights
    stay OIHW); bfloat16 is widened to float32. Raises ``UnsafeCheckpointError`` if the pickle
    references any global outside the small allow-list, and ``ValueError`` for files that are not
    plain state dicts.
    """
    if zipfile.is_zipfile(path):
        return _read_zip(path)
    return _read_legacy(path)
