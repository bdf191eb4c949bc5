"""Parse a large OIP JSON body in bounded steps, so the thread doing it lets other threads run.

orjson holds the GIL for a whole ``loads``: 60 MB of JSON is seconds in which the event loop
cannot answer even a health check, wherever the parse runs. So big bodies are parsed in pieces:

1. a structural scan with numpy, 4 MB at a time (strings and escapes respected), finds every
   bracket at the top levels and counts the objects: a body with more objects than the model's
   inputs could need is refused here, before anything is parsed;
2. each input's ``data`` array longer than ``STEP`` is cut out of the body at element boundaries
   the scan found, and the rest (the header) is parsed in one call: it is small;
3. the cut-out arrays are parsed piece by piece (about ``STEP`` bytes each) and joined.

A piece that does not parse on its own means the body is not valid JSON (every cut is at a comma
between two elements of the same array, outside any string), so nothing is ever guessed.

A small body (``loads_small``, on the event loop) is one parse, with the same NaN/Infinity
leniency and its nesting checked against the same depth cap.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import orjson

from modelpod.errors import InvalidRequestError

STEP = 1 << 20  # bytes parsed per orjson call
SCAN = 4 << 20  # bytes scanned per numpy step
MAX_HEADER = 8 << 20  # JSON outside the big data arrays
_DATA_DEPTH = 3  # body {, "inputs" [, input {, then the "data" array opens at this depth
_KIND = np.zeros(256, dtype=np.int8)
_KIND[ord("[")] = _KIND[ord("{")] = 1
_KIND[ord("]")] = _KIND[ord("}")] = -1
_KIND[ord(",")] = 2
_KEY = re.compile(rb'"(\w+)"\s*:\s*\Z')


def loads(data: bytes, max_objects: int, max_depth: int) -> Any:
    """``data`` parsed as JSON. Refused before any parsing: more than ``max_objects`` JSON objects,
    containers nested deeper than ``max_depth``."""
    st = _scan(data, max_depth, max_objects)
    spans = _data_spans(data, st)
    commas = st._join(st.commas)
    header = bytearray()
    last = 0
    for start, end, _ in spans:
        header += data[last:start + 1]
        last = end
    header += data[last:]
    if len(header) > MAX_HEADER:
        raise InvalidRequestError(f"the request's JSON outside its tensor data exceeds {MAX_HEADER} bytes")
    obj = _parse(bytes(header))
    for start, end, index in spans:
        try:
            target = obj["inputs"][index]
            placeholder = target["data"] if index >= 0 else None
        except (KeyError, IndexError, TypeError):
            placeholder = None
        if placeholder != []:
            raise InvalidRequestError("cannot find the tensor data in the request body (unusual keys?)")
        target["data"] = _parse_array(data, start, end, commas)
    return obj


def loads_small(data: bytes, max_depth: int) -> Any:
    """A body small enough for one parse: NaN/Infinity taken as Triton takes them; nesting deeper
    than ``max_depth`` refused (walked only when the body has enough brackets to be that deep)."""
    if not data:
        raise InvalidRequestError("the request body is empty")
    obj = _parse(data)
    if more_brackets(data, max_depth):
        check_depth(obj, max_depth)
    return obj


def check_depth(obj: Any, limit: int) -> None:
    """Raise InvalidRequestError when JSON containers nest deeper than ``limit``."""
    if not isinstance(obj, (list, dict)):
        return
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            raise InvalidRequestError(f"JSON nests deeper than {limit} levels")
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, (list, dict)):
                stack.append((child, depth + 1))


def more_brackets(data: bytes, limit: int) -> bool:
    """Whether ``data`` holds more than ``limit`` opening brackets (``[`` and ``{`` together).

    find() jumps between brackets with memchr, and tensor bodies have few brackets in kilobytes
    of numbers, so this reads far less than count() would; it stops at ``limit + 1``.
    """
    if len(data) <= 2048:  # short: one pass deleting the brackets costs less than the calls below
        return len(data) - len(data.translate(None, b"[{")) > limit
    n = 0
    for bracket in (b"[", b"{"):
        i = data.find(bracket)
        while i != -1:
            n += 1
            if n > limit:
                return True
            i = data.find(bracket, i + 1)
    return False


def _parse(piece: bytes) -> Any:
    try:
        return orjson.loads(piece)
    except orjson.JSONDecodeError as exc:
        if b"NaN" not in piece and b"Infinity" not in piece:
            raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from None
        try:
            return json.loads(piece)  # NaN/Infinity, as Triton takes them
        except (ValueError, RecursionError):
            raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from None


def _parse_array(data: bytes, start: int, end: int, commas: np.ndarray[Any, Any]) -> list[Any]:
    """The array ``data[start:end + 1]`` parsed between the cut commas inside it."""
    cuts = commas[(commas > start) & (commas < end)].tolist()
    out: list[Any] = []
    begin = start + 1
    for cut in [*cuts, end]:
        part = _parse(b"[" + data[begin:cut] + b"]")
        out.extend(part)
        begin = cut + 1
    return out


class _Structure:
    """What the scan found: data arrays (opening and closing positions), cut commas, the top
    containers (openers at depths 1 and 2, to number the input objects), and the object count."""

    def __init__(self) -> None:
        self.opens: list[np.ndarray[Any, Any]] = []
        self.closes: list[np.ndarray[Any, Any]] = []
        self.commas: list[np.ndarray[Any, Any]] = []
        self.tops: list[np.ndarray[Any, Any]] = []  # positions of openers at depth 1 or 2
        self.top_depths: list[np.ndarray[Any, Any]] = []
        self.top_objects: list[np.ndarray[Any, Any]] = []  # whether that opener is "{"
        self.objects = 0

    @staticmethod
    def _join(parts: list[np.ndarray[Any, Any]], dtype: Any = np.int64) -> np.ndarray[Any, Any]:
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _scan(data: bytes, max_depth: int, max_objects: int) -> _Structure:
    """One pass over ``data``, ``SCAN`` bytes per step, brackets outside strings only."""
    st = _Structure()
    n = len(data)
    parity = 0  # 1 when a chunk starts inside a string
    carry_bs = 0  # backslashes ending the previous chunk
    depth = 0
    for base in range(0, n, SCAN):
        a = np.frombuffer(data, np.uint8, min(SCAN, n - base), base)
        quotes = np.flatnonzero(a == 34)
        bs = a == 92
        if quotes.size and (carry_bs or bs[quotes - 1].any()):
            plain = np.flatnonzero(~bs)  # a quote is escaped by an odd run of backslashes before it
            k = np.searchsorted(plain, quotes) - 1
            prev = np.where(k >= 0, plain[np.maximum(k, 0)], -1 - carry_bs)
            quotes = quotes[((quotes - 1 - prev) & 1) == 0]
        if bs[-1]:
            plain = np.flatnonzero(~bs)
            carry_bs = a.size - 1 - (int(plain[-1]) if plain.size else -1 - carry_bs)
        else:
            carry_bs = 0
        kind = _KIND[a]
        pos = np.flatnonzero(kind)
        if pos.size:
            pos = pos[((np.searchsorted(quotes, pos) + parity) & 1) == 0]
            kind = kind[pos]
            char = a[pos]
            delta = np.where(kind == 2, 0, kind).astype(np.int64)
            after = depth + np.cumsum(delta)
            before = after - delta
            curly = char == ord("{")
            st.objects += int(np.count_nonzero(curly))
            if st.objects > max_objects:
                raise InvalidRequestError(
                    f"the request holds more than {max_objects} JSON objects, more than the model's inputs need")
            st.opens.append(pos[(before == _DATA_DEPTH) & (char == ord("["))] + base)
            st.closes.append(pos[(after == _DATA_DEPTH) & (char == ord("]"))] + base)
            top = (kind == 1) & ((before == 1) | (before == 2))
            st.tops.append(pos[top] + base)
            st.top_depths.append(before[top])
            st.top_objects.append(curly[top])
            split = pos[(kind == 2) & (before == _DATA_DEPTH + 1)] + base
            if split.size:
                bucket = split // STEP
                keep = np.ones(split.size, dtype=bool)
                keep[1:] = bucket[1:] != bucket[:-1]
                st.commas.append(split[keep])
            if after.size:
                if after.min() < 0:
                    raise InvalidRequestError("the request body is not valid JSON: unbalanced brackets")
                if after.max() > max_depth:
                    raise InvalidRequestError(f"JSON nests deeper than {max_depth} levels")
                depth = int(after[-1])
        parity = (parity + quotes.size) & 1
    if depth != 0 or parity:
        raise InvalidRequestError("the request body is not valid JSON: unbalanced brackets or strings")
    return st


def _data_spans(data: bytes, st: _Structure) -> list[tuple[int, int, int]]:
    """(start, end, input index) of each ``inputs[i].data`` array longer than ``STEP`` bytes."""
    opens, closes = st._join(st.opens), st._join(st.closes)
    if opens.size != closes.size:
        raise InvalidRequestError("the request body is not valid JSON: unbalanced brackets")
    big = np.flatnonzero(closes - opens > STEP)
    if not big.size:
        return []
    tops, depths, curly = st._join(st.tops), st._join(st.top_depths), st._join(st.top_objects, bool)
    # The input object holding a big array: objects at depth 2 opened since the last container at
    # depth 1 (the "inputs" list, verified against the parsed header afterwards).
    spans: list[tuple[int, int, int]] = []
    for i in big.tolist():
        start, end = int(opens[i]), int(closes[i])
        key = _KEY.search(data, max(0, start - 64), start)
        if key is None or key.group(1) != b"data":
            continue  # a big array under another key stays in the header (and counts to its cap)
        upto = int(np.searchsorted(tops, start))
        ones = np.flatnonzero(depths[:upto] == 1)
        first = int(ones[-1]) + 1 if ones.size else 0
        index = int(np.count_nonzero(curly[first:upto] & (depths[first:upto] == 2))) - 1
        spans.append((start, end, index))
    return spans
