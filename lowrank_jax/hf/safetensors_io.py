"""Reading and writing the safetensors format, with one-line errors for damaged files.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON mapping each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end of
the header; an optional ``"__metadata__"`` entry of strings), then the raw little-endian tensor
bytes. The format is specified by Hugging Face (github.com/huggingface/safetensors). Reading checks
every tensor's byte range against its dtype and shape and against the file size, so a truncated or
inconsistent file is reported by name instead of yielding garbage.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "U8": np.dtype("u1"),
}
_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100_000_000


class SafetensorsError(ValueError):
    """A file that is not valid safetensors (the message names the file and the problem)."""


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], int]:
    """``(tensor entries, offset of the data section)`` of a safetensors file, checked against its size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: truncated safetensors file (no header length)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise SafetensorsError(f"{path}: truncated or corrupt safetensors header ({n} header bytes, file {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SafetensorsError(f"{path}: safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, entry in header.items():
        _check_entry(path, name, entry, data_size)
    return header, 8 + n


def _check_entry(path: Path, name: str, entry: dict, data_size: int) -> None:
    try:
        dtype, shape, (begin, end) = DTYPES.get(entry["dtype"]), entry["shape"], entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise SafetensorsError(f"{path}: tensor {name!r} has a malformed header entry") from None
    if dtype is None:
        raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']!r}")
    if end > data_size:
        raise SafetensorsError(
            f"{path}: truncated safetensors file (tensor {name!r} ends at byte {end}, data has {data_size})"
        )
    if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
        raise SafetensorsError(f"{path}: tensor {name!r} byte range {begin}..{end} does not match shape {shape}")


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a NumPy array (bfloat16 as ``ml_dtypes.bfloat16``)."""
    header, start = read_header(path)
    out = {}
    with open(path, "rb") as f:
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            f.seek(start + begin)
            buf = f.read(end - begin)
            out[name] = np.frombuffer(buf, DTYPES[entry["dtype"]]).reshape(entry["shape"]).copy()
    return out


def save_file(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
    """Write ``tensors`` (C-contiguous little-endian copies) as one safetensors file."""
    header: dict[str, dict] = {}
    blobs, offset = [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in _NAMES:
            raise ValueError(f"tensors: {name!r} has unsupported dtype {a.dtype}")
        data = a.astype(a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype).tobytes()
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)
