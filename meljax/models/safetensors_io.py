"""Minimal, dependency-free safetensors reading (memory-mapped, bf16-aware) and writing.

The format is an 8-byte little-endian header length, a JSON header mapping tensor names to
``{"dtype", "shape", "data_offsets"}``, then the raw bytes. Reading through ``np.memmap`` means a
weight's bytes are only touched when it is converted, one weight at a time.
"""

from __future__ import annotations

import json
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
    """Returns (header dict, byte offset where tensor data starts)."""
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{file}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"{file}: implausible safetensors header size {n}")
        header = json.loads(f.read(n))
    return header, 8 + n


class SafetensorsFolder:
    """Lazy reader over a model folder: ``model.safetensors`` or a sharded index."""

    def __init__(self, path: str):
        index = os.path.join(path, INDEX_FILE)
        single = os.path.join(path, SINGLE_FILE)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
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
