"""A minimal GGUF reader: metadata as Python values, tensors as byte views of a memory map.

The `gguf` package's reader makes a numpy view per array element, which costs
seconds on a 49k-token vocabulary; this one walks the header once with `struct`
and leaves dequantization to `gguf.quants`. Every length is checked against the
file size first, so a corrupt or truncated file fails fast with a ModelError.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmos.models.config import ModelError

if TYPE_CHECKING:
    from gguf.constants import GGMLQuantizationType

_MAGIC = b"GGUF"
# GGUF value types: id -> struct format of a scalar (8 = string, 9 = array).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


@dataclass
class GGUFTensor:
    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order: the row (GGUF's first dimension) is last
    data: np.ndarray  # uint8 [*shape[:-1], bytes per row], a read-only view of the file
    offset: int = 0  # of the data in the file


@dataclass
class GGUFFile:
    fields: dict[str, Any]
    tensors: list[GGUFTensor]
    mapping: mmap.mmap | None = None

    def release(self, tensor: GGUFTensor) -> None:
        """Drop the tensor's pages from this process (they stay in the OS page cache).

        A loader that has copied a tensor out calls this, so the file's pages and
        the copies are not resident together. Reading the tensor again faults them back.
        """
        if self.mapping is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start = tensor.offset // page * page
        end = min(-(-(tensor.offset + tensor.data.nbytes) // page) * page, len(self.mapping))
        self.mapping.madvise(mmap.MADV_DONTNEED, start, end - start)


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def take(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise ModelError("file ends inside the GGUF header")
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return value

    def count(self, min_item_bytes: int) -> int:
        """A length prefix, refused if that many items cannot fit in the rest of the file."""
        n = self.take("Q")
        if n * min_item_bytes > self.size - self.pos:
            raise ModelError(f"GGUF header claims {n} items, more than the file holds")
        return n

    def string(self) -> str:
        n = self.count(1)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def strings(self, n: int) -> list[str]:
        """n strings in one tight loop: vocabularies hold ~10^5 of them."""
        buf, pos, unpack, out = self.buf, self.pos, _U64.unpack_from, []
        for _ in range(n):
            (length,) = unpack(buf, pos)
            out.append(buf[pos + 8 : pos + 8 + length].decode("utf-8", errors="replace"))
            pos += 8 + length
        if pos > self.size:
            raise ModelError("file ends inside a GGUF string array")
        self.pos = pos
        return out

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype = self.take("I")
            n = self.count(struct.calcsize(_SCALARS[itype]) if itype in _SCALARS else 8)
            if itype in _SCALARS:  # one unpack for the whole array
                fmt = _SCALARS[itype]
                items = struct.unpack_from(f"<{n}{fmt}", self.buf, self.pos)
                self.pos += n * struct.calcsize(fmt)
                return list(items)
            if itype == _STRING:
                return self.strings(n)
            return [self.value(itype) for _ in range(n)]
        raise ModelError(f"unknown GGUF value type {vtype}")


def read_gguf_file(path: Path) -> GGUFFile:
    """Parse a little-endian GGUF v2/v3 file; tensor data stays in the memory map."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
        raise ModelError(f"{path} is not a readable GGUF file: {e}") from None
    try:
        cur = _Cursor(buf)
        if buf[:4] != _MAGIC:
            raise ModelError("it does not start with the GGUF magic bytes")
        cur.pos = 4
        version = cur.take("I")
        if version & 0xFFFF == 0:
            raise ModelError("it is a big-endian GGUF, which llmos does not read")
        if version not in (2, 3):
            raise ModelError(f"GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_fields = cur.take("Q"), cur.take("Q")
        fields: dict[str, Any] = {}
        for _ in range(n_fields):
            key = cur.string()
            fields[key] = cur.value(cur.take("I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.take("Q") for _ in range(cur.take("I"))]
            infos.append((name, dims, cur.take("I"), cur.take("Q")))
        align = int(fields.get("general.alignment", 32))
        start = -(-cur.pos // align) * align
        tensors = []
        for name, dims, ttype, offset in infos:
            qtype = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[qtype]
            if not dims or dims[0] % block:
                raise ModelError(f"tensor {name} has shape {dims}, not whole {qtype.name} blocks")
            shape = tuple(reversed(dims))
            row_bytes = dims[0] // block * type_size
            nbytes = row_bytes * math.prod(shape[:-1])
            if start + offset + nbytes > len(buf):
                raise ModelError(f"tensor {name} runs past the end of the file (truncated?)")
            data = np.frombuffer(buf, np.uint8, nbytes, start + offset)
            tensors.append(GGUFTensor(name, qtype, shape, data.reshape(*shape[:-1], row_bytes),
                                      start + offset))
    except ModelError as e:
        raise ModelError(f"{path} is not a readable GGUF file: {e}") from None
    except (struct.error, ValueError, KeyError, OverflowError) as e:
        raise ModelError(f"{path} is not a readable GGUF file: {type(e).__name__}: {e}") from None
    return GGUFFile(fields, tensors, buf)
