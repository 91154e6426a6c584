"""Minimal, dependency-free safetensors reading (memory-mapped, bf16-aware) and writing.

The format is an 8-byte little-endian header length, a JSON header mapping tensor names to
``{"dtype", "shape", "data_offsets"}``, then the raw bytes. Reading through ``np.memmap`` means a
weight's bytes are only touched when it is converted, one weight at a time.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping

import ml_dtypes
import numpy as np

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_header(file: str) -> tuple[dict, int]:
    """Returns (header dict, byte offset where tensor data starts).

    Every tensor's dtype, shape and byte range is checked against the file's size, so a
    truncated or corrupt file fails here with a ValueError naming the file and the tensor
    (not later as a reshape error that names neither).
    """
    with open(file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{file}: not a safetensors file ({size} bytes; truncated?)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"{file}: implausible safetensors header size {n}")
        if 8 + n > size:
            raise ValueError(
                f"{file}: truncated safetensors file: its header needs {8 + n} bytes, the file "
                f"has {size}"
            )
        try:
            header = json.loads(f.read(n))
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"{file}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file}: safetensors header is not a JSON object")
    for key, meta in header.items():
        if key != "__metadata__":
            _check_entry(file, key, meta, size - 8 - n)
    return header, 8 + n


def _is_index(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_entry(file: str, key: str, meta, data_bytes: int) -> None:
    """Raises ValueError naming ``file`` and tensor ``key`` when its header entry is malformed,
    its byte count is not shape x dtype size, or its bytes lie past the end of the file."""
    where = f"{file}: tensor {key}"
    if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= meta.keys():
        raise ValueError(f"{where}: header entry lacks dtype, shape or data_offsets")
    shape, offsets = meta["shape"], meta["data_offsets"]
    if not isinstance(shape, list) or not all(map(_is_index, shape)):
        raise ValueError(f"{where}: bad shape {shape!r}")
    ok = isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_index, offsets))
    if not ok or offsets[0] > offsets[1]:
        raise ValueError(f"{where}: bad data_offsets {offsets!r}")
    begin, end = offsets
    dtype = _DTYPES.get(meta["dtype"])  # an unsupported dtype fails only if the tensor is read
    if dtype is not None and end - begin != math.prod(shape) * dtype.itemsize:
        raise ValueError(
            f"{where}: {end - begin} bytes for shape {shape} of {meta['dtype']} "
            f"({math.prod(shape) * dtype.itemsize} expected)"
        )
    if end > data_bytes:
        raise ValueError(
            f"{where}: its data ends at byte {end} of the data section, which has only "
            f"{data_bytes} bytes (truncated file?)"
        )


def _read_weight_map(index: str) -> dict[str, str]:
    """The ``weight_map`` of a sharded index; a ValueError naming the file if unreadable."""
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: unreadable safetensors index ({e!r})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: weight_map is not a map of tensor names to shard files")
    return weight_map


class SafetensorsFolder:
    """Lazy reader over a model folder: ``model.safetensors`` or a sharded index."""

    def __init__(self, path: str):
        index = os.path.join(path, INDEX_FILE)
        single = os.path.join(path, SINGLE_FILE)
        if os.path.exists(index):
            weight_map = _read_weight_map(index)
            files = sorted(set(weight_map.values()))
        elif os.path.exists(single):
            files = [SINGLE_FILE]
            weight_map = None
        else:
            raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in model folder {path}")
        self._entries: dict[str, tuple[str, dict, int]] = {}
        for name in files:
            file = os.path.join(path, name)
            if not os.path.exists(file):
                raise FileNotFoundError(f"weight file listed in {INDEX_FILE} is missing: {file}")
            header, start = read_header(file)
            for key, meta in header.items():
                if key != "__metadata__":
                    self._entries[key] = (file, meta, start)
        if weight_map is not None:
            missing = set(weight_map) - set(self._entries)
            if missing:
                raise ValueError(
                    f"{INDEX_FILE} names tensors absent from the shards: {sorted(missing)[:5]}"
                )
        self._maps: dict[str, np.memmap] = {}

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key][1]["shape"])

    def get(self, key: str) -> np.ndarray:
        """The tensor as a (read-only, memory-mapped) numpy array."""
        file, meta, start = self._entries[key]
        dtype = _DTYPES.get(meta["dtype"])
        if dtype is None:
            raise ValueError(f"{file}: tensor {key} has unsupported dtype {meta['dtype']}")
        if file not in self._maps:
            self._maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
        a, b = meta["data_offsets"]
        return self._maps[file][start + a : start + b].view(dtype).reshape(meta["shape"])


def write_file(file: str, tensors: Mapping[str, np.ndarray], metadata: dict | None = None) -> None:
    """Writes one safetensors file (tensors are written in sorted name order, 8-byte aligned)."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    names = sorted(tensors)
    for name in names:
        arr = tensors[name]
        if arr.dtype not in _NAMES:
            raise ValueError(f"cannot write tensor {name} of dtype {arr.dtype}")
        header[name] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = file + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            f.write(np.ascontiguousarray(tensors[name]).tobytes())
    os.replace(tmp, file)


def write_folder(
    path: str, tensors: Iterable[tuple[str, np.ndarray]], *, max_shard_bytes: int = 4 << 30
) -> list[str]:
    """Writes tensors as ``model.safetensors`` or as shards plus an index when large."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in tensors:
        if size and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    if len(shards) == 1:
        write_file(os.path.join(path, SINGLE_FILE), shards[0])
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    total = 0
    for name, shard in zip(names, shards, strict=True):
        write_file(os.path.join(path, name), shard)
        weight_map.update({k: name for k in shard})
        total += sum(a.nbytes for a in shard.values())
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return names
