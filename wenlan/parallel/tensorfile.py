"""Tensor files read and written one tensor at a time, so converting or resuming a 10B checkpoint holds
at most a few tensors in host memory, never a rank's whole file or the whole model.

- ``TorchFile``: a ``torch.save`` file (DeepSpeed's ``*_optim_states.pt`` / ``*_model_states.pt``) whose
  structure is unpickled with every tensor left on disk as a ``TensorRef``; ``read`` / ``read_flat`` then
  read just that tensor's bytes (or a range of them) with a seek and a read. Not mmap: pages of a
  mapped file that were touched count in the resident set until unmapped, which is the whole file once
  every tensor was read; explicit reads into fresh tensors are freed with the tensor.
- ``SafetensorsWriter``: a safetensors file written from a list of (name, dtype, shape) known in advance
  (the header) and then each tensor's bytes in that order, one tensor in memory at a time.
- ``SafetensorsFile``: the header of a safetensors file, and any tensor or flat range of one (a ZeRO
  partition) read with a seek and a read of exactly those bytes. ``safetensors``' own slicing works per
  dimension, so a flat range that cuts rows would have to read whole rows.
"""

import json
import math
import os
import pickle
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors' dtype names (https://github.com/huggingface/safetensors, format section)
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def _read_into(path: str, offset: int, view: memoryview) -> None:
    """Fill ``view`` with the file's bytes from ``offset`` on."""
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < len(view):  # readinto may return less than asked (large reads, network file systems)
            n = f.readinto(view[done:])
            if not n:
                raise EOFError(f"{path}: wanted {len(view)} bytes at {offset}, the file ends after {done}")
            done += n


def _read_exact(path: str, offset: int, nbytes: int) -> bytearray:
    buffer = bytearray(nbytes)
    _read_into(path, offset, memoryview(buffer))
    return buffer


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """A writable view of a contiguous CPU tensor's bytes."""
    if not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise ValueError("reading into a tensor needs a contiguous CPU tensor")
    return memoryview(tensor.view(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")


def _tensor_from_bytes(buffer: bytearray, dtype: torch.dtype, shape) -> torch.Tensor:
    if not buffer:
        return torch.empty(tuple(shape), dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).view(tuple(shape))  # owns the buffer: freed with the tensor


# ---- torch.save files --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """A tensor of a ``TorchFile`` left on disk: its storage and its view of it."""

    storage: _Storage
    offset: int  # in elements of the storage
    shape: tuple
    stride: tuple

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    def numel(self) -> int:
        return math.prod(self.shape)

    def is_contiguous(self) -> bool:
        expected = 1
        for size, stride in reversed(list(zip(self.shape, self.stride))):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    return TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *_):
    return data


def _rebuild_from_type(func, _new_type, args, _state):
    return func(*args)


class _LazyUnpickler(pickle.Unpickler):
    """torch.load's unpickler, except that tensors come back as ``TensorRef``s and no byte of any tensor
    is read. Everything else is rebuilt as torch.load(weights_only=False) would: use it on trusted files
    only (the run's own checkpoints)."""

    _TENSORS = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
                ("torch._utils", "_rebuild_tensor_v3"): lambda storage, offset, size, stride, *rest:
                    _rebuild_tensor(storage, offset, size, stride),
                ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
                ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
                ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type}

    def find_class(self, module, name):
        if (module, name) in self._TENSORS:
            return self._TENSORS[(module, name)]
        if module.startswith("torch._utils") and name.startswith("_rebuild"):
            raise pickle.UnpicklingError(f"a tensor pickled as {module}.{name}: not readable one tensor at a time")
        return super().find_class(module, name)

    def persistent_load(self, saved_id):
        typename, storage_type, key, _location, numel = saved_id
        if typename != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {typename!r}")
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        return _Storage(str(key), dtype, int(numel))


class TorchFile:
    """A ``torch.save`` (zip) file opened for reading one tensor at a time.

    ``obj`` is the saved object with ``TensorRef`` in place of every tensor. torch stores each storage
    uncompressed as its own zip member ``<archive>/data/<key>``, so a tensor is a byte range of the file.
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        with zipfile.ZipFile(self.path) as archive:
            infos = {info.filename: info for info in archive.infolist()}
            pickles = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise ValueError(f"{self.path}: not a torch.save zip file (no single <archive>/data.pkl)")
            self._prefix = pickles[0][: -len("data.pkl")]
            order = infos.get(self._prefix + "byteorder")
            if order is not None and archive.read(order).decode() != "little":
                raise ValueError(f"{self.path}: saved on a big-endian machine; load it with torch.load instead")
            structure = archive.read(pickles[0])
        self._infos = infos
        self._offsets: dict[str, int] = {}
        with warnings.catch_warnings():  # torch.FloatStorage.dtype warns that typed storages are deprecated
            warnings.simplefilter("ignore", UserWarning)
            self.obj = _LazyUnpickler(_BytesReader(structure)).load()

    def _data_offset(self, key: str) -> int:
        """Where storage ``key``'s bytes start in the file: after the member's local header."""
        if key not in self._offsets:
            info = self._infos.get(f"{self._prefix}data/{key}")
            if info is None:
                raise KeyError(f"{self.path}: no storage {key}")
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{self.path}: storage {key} is compressed; load the file with torch.load instead")
            header = _read_exact(self.path, info.header_offset, 30)
            if header[:4] != b"PK\x03\x04":
                raise ValueError(f"{self.path}: bad zip local header for storage {key}")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            self._offsets[key] = info.header_offset + 30 + name_len + extra_len
        return self._offsets[key]

    def read_flat(self, ref: TensorRef, start: int = 0, end: int | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements [start, end) of the flattened tensor (a contiguous one), reading only those bytes;
        into ``out`` (end - start elements of the tensor's dtype) if given, which saves a copy when the
        pieces of one tensor are gathered from several files."""
        if not ref.is_contiguous():
            raise ValueError(f"{self.path}: a non-contiguous tensor {ref.shape} / {ref.stride} cannot be read by range")
        end = ref.numel() if end is None else end
        if not 0 <= start <= end <= ref.numel():
            raise IndexError(f"{self.path}: range [{start}, {end}) of a tensor of {ref.numel()} elements")
        size = torch._utils._element_size(ref.dtype)
        offset = self._data_offset(ref.storage.key) + (ref.offset + start) * size
        if out is None:
            return _tensor_from_bytes(_read_exact(self.path, offset, (end - start) * size), ref.dtype, (end - start,))
        if out.dtype != ref.dtype or out.numel() != end - start:
            raise ValueError(f"{self.path}: reading {end - start} {ref.dtype} into {out.numel()} {out.dtype}")
        _read_into(self.path, offset, _bytes_of(out))
        return out

    def read(self, ref: TensorRef) -> torch.Tensor:
        """The whole tensor (a non-contiguous view reads its storage's span and is made contiguous)."""
        if ref.is_contiguous():
            return self.read_flat(ref).view(ref.shape)
        span = 1 + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride) if n > 0)
        whole = self.read_flat(TensorRef(ref.storage, ref.offset, (span,), (1,)))
        return whole.as_strided(ref.shape, ref.stride).contiguous()

    def materialize(self, obj):
        """``obj`` (a part of ``self.obj``) with every ``TensorRef`` read: for small structures only."""
        if isinstance(obj, TensorRef):
            return self.read(obj)
        if isinstance(obj, dict):
            return type(obj)((k, self.materialize(v)) for k, v in obj.items()) if type(obj) is not dict \
                else {k: self.materialize(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
            return type(obj)(self.materialize(v) for v in obj)
        return obj


class _BytesReader:
    """The minimal file object pickle.Unpickler needs, over bytes."""

    def __init__(self, data: bytes):
        self._data, self._pos = memoryview(data), 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._pos + n
        chunk = bytes(self._data[self._pos:end])
        self._pos += len(chunk)
        return chunk

    def readinto(self, buffer) -> int:
        chunk = self.read(len(buffer))
        buffer[:len(chunk)] = chunk
        return len(chunk)

    def readline(self) -> bytes:
        rest = self._data[self._pos:]
        i = bytes(rest).find(b"\n")
        return self.read(len(rest) if i < 0 else i + 1)

    def peek(self, n: int = 1) -> bytes:
        return bytes(self._data[self._pos:self._pos + n])


# ---- safetensors ----------------------------------------------------------------------------------------------

class SafetensorsWriter:
    """Write a safetensors file tensor by tensor.

    The header (every name, dtype, shape and byte range) is written first from ``entries``; then
    ``write(name, tensor)`` appends each tensor's bytes, in the order of ``entries``. The file is
    written to ``path + '.tmp'`` and renamed by ``close()`` once every tensor is in, so a converter
    that dies leaves no file that looks whole. Format: 8-byte little-endian header length, the JSON
    header padded with spaces to a multiple of 8, then the data.
    """

    def __init__(self, path: str | Path, entries: list[tuple[str, torch.dtype, tuple]],
                 metadata: dict[str, str] | None = None):
        self.path, self.tmp = Path(path), Path(str(path) + ".tmp")
        header, offset = {}, 0
        self._expected = []
        for name, dtype, shape in entries:
            if name in header or name == "__metadata__":
                raise ValueError(f"{path}: tensor name {name!r} repeated or reserved")
            nbytes = math.prod(shape) * torch._utils._element_size(dtype)
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._expected.append((name, dtype, tuple(shape)))
            offset += nbytes
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._file = open(self.tmp, "wb")
        self._file.write(struct.pack("<Q", len(text)) + text)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self._expected[self._next] if self._next < len(self._expected) else None
        if expected is None or expected[0] != name:
            raise ValueError(f"{self.path}: wrote {name!r}, the header's next tensor is "
                             f"{expected[0] if expected else 'none (all written)'!r}")
        if tensor.dtype != expected[1] or tuple(tensor.shape) != expected[2]:
            raise ValueError(f"{self.path}: {name} is {tensor.dtype} {tuple(tensor.shape)}, the header says "
                             f"{expected[1]} {expected[2]}")
        data = tensor.detach().cpu().contiguous()
        if data.numel():
            self._file.write(memoryview(data.view(torch.uint8).reshape(-1).numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._expected):
            self._file.close()
            raise ValueError(f"{self.path}: {len(self._expected) - self._next} tensors not written, starting with "
                             f"{self._expected[self._next][0]}")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)


class SafetensorsFile:
    """A safetensors file's header, and its tensors (or flat ranges of them) read on demand."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        with open(self.path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        self._data_start = 8 + length
        self.metadata = header.pop("__metadata__", {}) or {}
        self._entries = {name: (DTYPES[e["dtype"]], tuple(e["shape"]), e["data_offsets"][0])
                         for name, e in header.items()}

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple:
        return self._entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][0]

    def read_flat(self, name: str, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Elements [start, end) of the flattened tensor ``name``, reading only those bytes."""
        dtype, shape, begin = self._entries[name]
        numel = math.prod(shape)
        end = numel if end is None else end
        if not 0 <= start <= end <= numel:
            raise IndexError(f"{self.path}: range [{start}, {end}) of {name}, which has {numel} elements")
        size = torch._utils._element_size(dtype)
        buffer = _read_exact(self.path, self._data_start + begin + start * size, (end - start) * size)
        return _tensor_from_bytes(buffer, dtype, (end - start,))

    def read(self, name: str) -> torch.Tensor:
        return self.read_flat(name).view(self.shape(name))
