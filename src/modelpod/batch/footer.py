"""Joining Parquet files at the file level: their row groups' bytes copied, one footer for them all.

A Parquet file is ``PAR1``, the row groups' pages (and any page indexes or bloom filters), the
footer (a Thrift compact-protocol ``FileMetaData``), its length and ``PAR1``. Files of one schema
are joined without decoding a value: each file's bytes between its magic and its footer are copied,
and the footer's row groups, their offsets moved by where those bytes land, are listed in one new
footer. Only the few fields that hold file offsets are rewritten; every other field is carried as
read. Files whose schemas differ are not joined here (``join`` returns False; the caller re-encodes).
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

MAGIC = b"PAR1"

# Compact protocol type codes.
_TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(1, 13)

# Field ids (parquet.thrift) of the values that are offsets into the file.
_FILE_ROW_GROUPS, _FILE_NUM_ROWS, _FILE_SCHEMA = 4, 3, 2
_RG_COLUMNS, _RG_FILE_OFFSET, _RG_ORDINAL = 1, 5, 7
_CC_FILE_OFFSET, _CC_META, _CC_OFFSET_INDEX, _CC_COLUMN_INDEX = 2, 3, 4, 6
_META_OFFSETS = frozenset((9, 10, 11, 14))  # data page, index page, dictionary page, bloom filter

Field = tuple[int, int, Any]  # (id, type, value); a struct is a list of fields, in file order


class FooterError(ValueError):
    """Bytes that are not a Parquet footer this module can read."""


# -- reading ----------------------------------------------------------------------------------------
class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise FooterError("the footer ends early")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        shift = result = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def value(self, kind: int) -> Any:
        if kind in (_TRUE, _FALSE):  # inside lists a bool is a byte of its own
            return self.byte() == _TRUE
        if kind == _BYTE:
            return self.byte()
        if kind in (_I16, _I32, _I64):
            return self.zigzag()
        if kind == _DOUBLE:
            self.pos += 8
            return self.data[self.pos - 8:self.pos]
        if kind == _BINARY:
            n = self.varint()
            self.pos += n
            return self.data[self.pos - n:self.pos]
        if kind in (_LIST, _SET):
            head = self.byte()
            size, elem = head >> 4, head & 0x0F
            if size == 15:
                size = self.varint()
            return elem, [self.value(elem) for _ in range(size)]
        if kind == _MAP:
            size = self.varint()
            types = self.byte() if size else 0
            return types, [(self.value(types >> 4), self.value(types & 0x0F)) for _ in range(size)]
        if kind == _STRUCT:
            return self.struct()
        raise FooterError(f"unknown Thrift type {kind}")

    def struct(self) -> list[Field]:
        fields: list[Field] = []
        last = 0
        while True:
            head = self.byte()
            if head == 0:
                return fields
            delta, kind = head >> 4, head & 0x0F
            fid = last + delta if delta else self.zigzag()
            if kind in (_TRUE, _FALSE):
                fields.append((fid, kind, kind == _TRUE))
            else:
                fields.append((fid, kind, self.value(kind)))
            last = fid


# -- writing ----------------------------------------------------------------------------------------
def _varint(n: int, out: bytearray) -> None:
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _zigzag(n: int, out: bytearray) -> None:
    _varint((n << 1) ^ (n >> 63), out)


def _write_value(kind: int, value: Any, out: bytearray) -> None:
    if kind in (_TRUE, _FALSE):
        out.append(_TRUE if value else _FALSE)
    elif kind == _BYTE:
        out.append(value)
    elif kind in (_I16, _I32, _I64):
        _zigzag(value, out)
    elif kind == _DOUBLE:
        out += value
    elif kind == _BINARY:
        _varint(len(value), out)
        out += value
    elif kind in (_LIST, _SET):
        elem, items = value
        if len(items) < 15:
            out.append(len(items) << 4 | elem)
        else:
            out.append(0xF0 | elem)
            _varint(len(items), out)
        for item in items:
            _write_value(elem, item, out)
    elif kind == _MAP:
        types, pairs = value
        _varint(len(pairs), out)
        if pairs:
            out.append(types)
        for k, v in pairs:
            _write_value(types >> 4, k, out)
            _write_value(types & 0x0F, v, out)
    else:
        _write_struct(value, out)


def _write_struct(fields: Sequence[Field], out: bytearray) -> None:
    last = 0
    for fid, kind, value in fields:
        wire = (_TRUE if value else _FALSE) if kind in (_TRUE, _FALSE) else kind
        if 0 < fid - last <= 15:
            out.append((fid - last) << 4 | wire)
        else:
            out.append(wire)
            _zigzag(fid, out)
        if kind not in (_TRUE, _FALSE):
            _write_value(kind, value, out)
        last = fid
    out.append(0)


def encode(fields: Sequence[Field]) -> bytes:
    out = bytearray()
    _write_struct(fields, out)
    return bytes(out)


def decode(data: bytes) -> list[Field]:
    return _Reader(data).struct()


# -- moving row groups ------------------------------------------------------------------------------
def _get(fields: Sequence[Field], fid: int) -> Any:
    return next((v for f, _, v in fields if f == fid), None)


def _moved(fields: Sequence[Field], shift: int, offsets: frozenset[int]) -> list[Field]:
    # 0 is no offset (writers leave ColumnChunk.file_offset 0): it stays 0.
    return [(f, k, v + shift if f in offsets and k == _I64 and v else v) for f, k, v in fields]


def _move_column(chunk: Sequence[Field], shift: int) -> list[Field]:
    out = _moved(chunk, shift, frozenset((_CC_FILE_OFFSET, _CC_OFFSET_INDEX, _CC_COLUMN_INDEX)))
    return [(f, k, _moved(v, shift, _META_OFFSETS) if f == _CC_META and k == _STRUCT else v) for f, k, v in out]


def _move_row_group(group: Sequence[Field], shift: int, ordinal: int) -> list[Field]:
    out: list[Field] = []
    for f, k, v in group:
        if f == _RG_COLUMNS and k == _LIST:
            v = (v[0], [_move_column(c, shift) for c in v[1]])
        elif f == _RG_FILE_OFFSET and k == _I64 and v:
            v = v + shift
        elif f == _RG_ORDINAL and k == _I16:
            v = ordinal
        out.append((f, k, v))
    return out


# -- files ------------------------------------------------------------------------------------------
def read_footer(path: Path) -> tuple[list[Field], int]:
    """A Parquet file's footer and where it starts (the end of the bytes to copy)."""
    with path.open("rb") as fh:
        fh.seek(0, 2)
        size = fh.tell()
        if size < 12:
            raise FooterError(f"{path} is too short for a Parquet file")
        fh.seek(0)
        head = fh.read(4)
        fh.seek(size - 8)
        tail = fh.read(8)
        (length,) = struct.unpack("<I", tail[:4])
        if head != MAGIC or tail[4:] != MAGIC or length > size - 12:
            raise FooterError(f"{path} is not a plain Parquet file (encrypted, or damaged)")
        start = size - 8 - length
        fh.seek(start)
        return decode(fh.read(length)), start


def _copy(path: Path, end: int, out: BinaryIO, expect: str | None) -> None:
    if expect is None and hasattr(os, "copy_file_range"):
        try:
            _copy_in_kernel(path, end, out)
            return
        except OSError:  # a file system or kernel without it: copy through memory
            pass
    h = hashlib.sha256() if expect is not None else None
    with path.open("rb") as src:
        head = src.read(4)
        if h is not None:
            h.update(head)
        left = end - 4
        while left > 0:
            block = src.read(min(left, 1 << 20))
            if not block:
                raise FooterError(f"{path} ends early")
            out.write(block)
            if h is not None:
                h.update(block)
            left -= len(block)
        if h is not None:
            while block := src.read(1 << 20):
                h.update(block)
    if h is not None and h.hexdigest() != expect:
        raise FooterError(f"{path} changed since it was committed (its checksum differs)")


def _copy_in_kernel(path: Path, end: int, out: BinaryIO) -> None:
    """Bytes [4, end) of ``path`` appended to ``out`` by the kernel (no copy through this process;
    a file system with reflinks shares the blocks)."""
    out.flush()
    at = out.tell()
    with path.open("rb") as src:
        offset = 4
        while offset < end:
            n = os.copy_file_range(src.fileno(), out.fileno(), end - offset, offset, at + offset - 4)
            if n <= 0:
                raise FooterError(f"{path} ends early")
            offset += n
    out.seek(at + end - 4)


def join(files: Sequence[Path], out: BinaryIO, checksums: Sequence[str | None] | None = None) -> bool:
    """Write ``files`` (Parquet, in order) as one Parquet file to ``out``; False (nothing written) when
    their schemas differ. ``checksums``: each file's sha256, checked on the bytes as they are copied."""
    footers = [read_footer(f) for f in files]
    first = footers[0][0]
    same = [(fid, kind, v) for fid, kind, v in first if fid not in (_FILE_NUM_ROWS, _FILE_ROW_GROUPS)]
    for meta, _ in footers[1:]:
        if [(fid, kind, v) for fid, kind, v in meta if fid not in (_FILE_NUM_ROWS, _FILE_ROW_GROUPS)] != same:
            return False
    out.write(MAGIC)
    at = 4
    groups: list[list[Field]] = []
    rows = 0
    for i, (path, (meta, end)) in enumerate(zip(files, footers, strict=True)):
        _copy(path, end, out, checksums[i] if checksums else None)
        rows += _get(meta, _FILE_NUM_ROWS) or 0
        for group in (_get(meta, _FILE_ROW_GROUPS) or (_STRUCT, []))[1]:
            groups.append(_move_row_group(group, at - 4, len(groups)))
        at += end - 4
    fields: list[Field] = []
    for fid, kind, v in first:
        if fid == _FILE_NUM_ROWS:
            v = rows
        elif fid == _FILE_ROW_GROUPS:
            v = (_STRUCT, groups)
        fields.append((fid, kind, v))
    footer = encode(fields)
    out.write(footer)
    out.write(struct.pack("<I", len(footer)))
    out.write(MAGIC)
    return True
