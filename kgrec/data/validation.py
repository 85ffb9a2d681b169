"""Validation and safe cleaning: ``RawTable`` -> kept rows (dataset schema) + quarantined rows with a reason.

Every row read ends in exactly one place: kept (possibly merged with an identical event) or quarantined with the
*first* reason that applies, in the order the checks are listed in ``REASONS``. For every table
``kept + quarantined == read`` and ``written == kept - merged``.

Decisions written down here (and in the README):
  * Events of a user that is not in the users file are quarantined (``unknown_user``) when a users file was
    given; without one, users are created implicitly from the events (and the split).
  * Events, links and split rows that reference a quarantined item or user are quarantined too (``unknown_*``).
  * Exact duplicate events (all six fields equal) are merged into one row and counted (``merged``); so are exact
    duplicate triples and links. Duplicate item/user ids are quarantined after the first occurrence.
  * Cleaning: every text value is trimmed; titles, brands, categories and attribute values get runs of whitespace
    collapsed; brand and category spellings that differ only in case are mapped to the most frequent spelling;
    category segments are trimmed around ``>``; attribute names are lower-case with ``_`` for spaces and ``=``
    (two names that become one quarantine the row); attribute value spellings that differ only in case are mapped
    to the most frequent spelling per name; event types are lower-case with a few synonyms mapped (``add_to_cart`` -> ``cart``).
  * Timestamps: Arrow timestamps (naive = UTC), ISO-8601 text (offsets converted to UTC, naive = UTC), or unix
    seconds (numbers above 1e11 are read as milliseconds); outside [min_timestamp, max_timestamp] is bad.
  * Image references must be relative paths that stay inside the source directory after resolving ``..`` and
    symlinks; the file must exist and (``check_images``) decode as an image.
"""
from __future__ import annotations

import json
import logging
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from kgrec.config import DataConfig
from kgrec.data.readers import FILE_COL, LINE_COL, RawSource, RawTable
from kgrec.data.schema import EVENT_TYPES, SPLITS, conform
from kgrec.errors import DataError

logger = logging.getLogger(__name__)

REASONS: dict[str, str] = {
    "malformed_row": "the line could not be parsed (wrong number of columns, invalid JSON)",
    "invalid_utf8": "a value is not valid UTF-8",
    "missing_required": "a required field is empty, null or NaN",
    "too_long": "an id or text is longer than the configured maximum",
    "bad_type": "a value has the wrong type (number expected, attributes not a flat JSON object or naming one "
                "attribute twice with different values)",
    "invalid_value": "a value is outside its allowed set or range (negative price, split not train/valid/test)",
    "invalid_event_type": "event type is not one of view, click, cart, purchase, rating",
    "bad_timestamp": "timestamp cannot be parsed or is outside the allowed range",
    "duplicate_id": "the id was already defined by an earlier row",
    "unknown_item": "references an item that is not in the catalog (or was quarantined)",
    "unknown_user": "references a user that is not in the users file (or was quarantined)",
    "image_outside_root": "image path is absolute, a URL, or resolves outside the dataset directory",
    "image_missing": "image file does not exist",
    "image_not_an_image": "image file is not a recognised image format",
    "image_unreadable": "image file cannot be read or decoded (permissions, truncated, too large)",
}
_REASON_LIST = list(REASONS)
_REASON_CODE = {r: i for i, r in enumerate(_REASON_LIST)}

QUARANTINE_SCHEMA = pa.schema(
    [("table", pa.string()), ("file", pa.string()), ("line", pa.int64()), ("reason", pa.string()),
     ("message", pa.string()), ("raw", pa.string())]
)
NULL_TOKENS = pa.array(["", "nan", "NaN", "NAN", "null", "NULL", "None", "none"], pa.string())
EVENT_TYPE_SYNONYMS = {
    "add_to_cart": "cart", "addtocart": "cart", "add-to-cart": "cart", "basket": "cart", "add_to_basket": "cart",
    "buy": "purchase", "order": "purchase", "transaction": "purchase", "checkout": "purchase",
    "rate": "rating", "review": "rating", "pageview": "view", "page_view": "view", "detail_view": "view",
}
SPLIT_SYNONYMS = {"validation": "valid", "val": "valid", "dev": "valid", "training": "train", "testing": "test"}


@dataclass
class TableResult:
    """Outcome of validating one table. ``table`` is conformed to the dataset schema."""

    name: str
    table: pa.Table
    quarantine: pa.Table
    read: int
    kept: int
    merged: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    cleaned: dict[str, int] = field(default_factory=dict)
    blank_rows: int = 0
    files: list[str] = field(default_factory=list)

    @property
    def quarantined(self) -> int:
        return self.quarantine.num_rows

    @property
    def written(self) -> int:
        return self.table.num_rows


# ----------------------------------------------------------------------------------------------- row flags


class _Flags:
    """First-reason-wins bookkeeping for the rows of one raw table."""

    def __init__(self, raw: RawTable):
        self.raw = raw
        self.n = raw.table.num_rows
        self.code = np.full(self.n, -1, dtype=np.int16)
        self.messages: dict[int, str] = {}
        self.lines = raw.table.column(LINE_COL).to_numpy() if self.n else np.zeros(0, dtype=np.int64)
        self._files = raw.table.column(FILE_COL)

    @property
    def ok(self) -> np.ndarray:
        return self.code < 0

    def where(self, i: int) -> str:
        return f"{self._files[int(i)].as_py()} line {int(self.lines[i])}"

    def flag(self, mask: np.ndarray, reason: str, message: Callable[[int], str]) -> int:
        new = np.asarray(mask, dtype=bool) & (self.code < 0)
        idx = np.flatnonzero(new)
        if len(idx) == 0:
            return 0
        self.code[idx] = _REASON_CODE[reason]
        for i in idx:
            self.messages[int(i)] = f"{self.where(i)}: {message(int(i))}"
        return len(idx)

    def quarantine(self, table_name: str) -> pa.Table:
        idx = np.flatnonzero(self.code >= 0)
        rows: list[dict[str, Any]] = [
            {"table": table_name, "file": r["file"], "line": r["line"], "reason": r["reason"], "message": r["message"],
             "raw": json.dumps(r["raw"], ensure_ascii=False, default=str, sort_keys=True)}
            for r in self.raw.rejected
        ]
        if len(idx):
            raw_rows = self.raw.table.take(pa.array(idx)).drop_columns([FILE_COL, LINE_COL]).to_pylist()
            files = self._files.take(pa.array(idx)).cast(pa.string()).to_pylist()
            for j, i in enumerate(idx):
                rows.append({"table": table_name, "file": files[j], "line": int(self.lines[i]),
                             "reason": _REASON_LIST[self.code[i]], "message": self.messages[int(i)],
                             "raw": json.dumps(raw_rows[j], ensure_ascii=False, default=_json_default, sort_keys=True)})
        return pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA)

    def reason_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.raw.rejected:
            counts[r["reason"]] = counts.get(r["reason"], 0) + 1
        codes, n = np.unique(self.code[self.code >= 0], return_counts=True)
        for c, k in zip(codes, n):
            counts[_REASON_LIST[c]] = counts.get(_REASON_LIST[c], 0) + int(k)
        return dict(sorted(counts.items()))


def _json_default(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", "backslashreplace")
    return str(v)


def _np(a: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if isinstance(a, pa.ChunkedArray):
        a = a.combine_chunks() if a.num_chunks != 1 else a.chunk(0)
    return a.to_numpy(zero_copy_only=False)


def _bool(a: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return _np(pc.fill_null(a, False)).astype(bool)





# ----------------------------------------------------------------------------------------------- column helpers


class _Text:
    """A text column held as (distinct values, int64 codes with -1 for null).

    String work (trim, case, length, membership) runs once per distinct value and is mapped to rows through the
    codes; equal strings have equal codes, which makes duplicate detection an integer problem.
    """

    def __init__(self, values: pa.Array, codes: np.ndarray):
        self.values = values
        self.codes = codes
        self._counts: np.ndarray | None = None

    @classmethod
    def of(cls, col: pa.ChunkedArray | pa.Array) -> _Text:
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        if not pa.types.is_string(col.type):
            col = col.cast(pa.string())
        enc = pc.dictionary_encode(col)
        codes = _np(pc.fill_null(enc.indices.cast(pa.int64()), -1)).astype(np.int64)
        return cls(enc.dictionary, codes)

    def __len__(self) -> int:
        return len(self.codes)

    @property
    def counts(self) -> np.ndarray:
        if self._counts is None:
            valid = self.codes[self.codes >= 0]
            self._counts = np.bincount(valid, minlength=len(self.values)).astype(np.int64)
        return self._counts

    def rows(self, value_mask: np.ndarray, null: bool = False) -> np.ndarray:
        """Per-row bool from a per-distinct-value bool."""
        out = np.full(len(self.codes), null, dtype=bool)
        sel = self.codes >= 0
        out[sel] = np.asarray(value_mask, dtype=bool)[self.codes[sel]]
        return out

    def remap(self, new_values: pa.Array) -> tuple[_Text, int]:
        """Replace each distinct value (aligned with ``values``; null allowed); returns (new column, rows changed)."""
        changed_vals = _bool(pc.invert(pc.equal(self.values, new_values).fill_null(False)))
        changed = int(self.counts[changed_vals].sum())
        if not changed_vals.any():
            return self, 0
        enc = pc.dictionary_encode(new_values)
        m = _np(pc.fill_null(enc.indices.cast(pa.int64()), -1)).astype(np.int64)
        codes = np.where(self.codes >= 0, m[np.maximum(self.codes, 0)], -1)
        return _Text(enc.dictionary, codes), changed

    def value(self, i: int) -> str | None:
        c = self.codes[i]
        return None if c < 0 else self.values[int(c)].as_py()

    def missing(self) -> np.ndarray:
        return self.rows(_bool(pc.is_in(self.values, value_set=NULL_TOKENS)), null=True)

    def blank_to_null(self) -> _Text:
        nulls = np.flatnonzero(_bool(pc.is_in(self.values, value_set=NULL_TOKENS)))
        if len(nulls) == 0:
            return self
        codes = self.codes.copy()
        codes[np.isin(codes, nulls)] = -1
        return _Text(self.values, codes)

    def longer_than(self, limit: int) -> np.ndarray:
        return self.rows(_bool(pc.greater(pc.utf8_length(self.values), limit)))

    def lengths(self) -> np.ndarray:
        return _np(pc.utf8_length(self.values)).astype(np.int64)

    def not_in(self, known: pa.Array) -> np.ndarray:
        return self.rows(~_bool(pc.is_in(self.values, value_set=known)))

    def to_arrow(self) -> pa.Array:
        idx = pa.array(np.maximum(self.codes, 0), pa.int64(), mask=self.codes < 0)
        return self.values.take(idx)

    @classmethod
    def nulls(cls, n: int) -> _Text:
        return cls(pa.array([], pa.string()), np.full(n, -1, dtype=np.int64))


class _Cleaner:
    """Cleaning operations on ``_Text`` columns that count how many row values each one changed."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def _add(self, key: str, n: int) -> None:
        if n:
            self.counts[key] = self.counts.get(key, 0) + n

    def text(self, table: pa.Table, name: str) -> _Text | None:
        """Column as trimmed text, or None when the column is absent."""
        if name not in table.column_names:
            return None
        t = _Text.of(table.column(name))
        out, n = t.remap(pc.utf8_trim_whitespace(t.values))
        self._add("trimmed", n)
        return out

    def collapse(self, t: _Text | None, pattern: str = r"\s+") -> _Text | None:
        """Collapse runs of whitespace to one space (regex only on values that hold a run or a tab/newline)."""
        if t is None or len(t.values) == 0:
            return t
        probes = ["  ", "\t", "\n", "\r", "\x0b", "\x0c"] if pattern == r"\s+" else ["  ", "\t"]
        hit = np.zeros(len(t.values), dtype=bool)
        for p in probes:
            hit |= _bool(pc.match_substring(t.values, p))
        if not hit.any():
            return t
        idx = np.flatnonzero(hit)
        replaced = pc.replace_substring_regex(t.values.take(pa.array(idx)), pattern, " ")
        new = pc.replace_with_mask(t.values, pa.array(hit), replaced)
        out, n = t.remap(new)
        self._add("whitespace_collapsed", n)
        return out

    def canonical_case(self, t: _Text | None, key: str = "case_normalised") -> _Text | None:
        """Map spellings that differ only in case to the most frequent one (ties: the first distinct value)."""
        if t is None or len(t.values) == 0:
            return t
        folded = pc.utf8_lower(t.values)
        if len(pc.unique(folded)) == len(t.values):
            return t
        counts = t.counts
        best: dict[str, tuple[int, int]] = {}
        for j, f in enumerate(folded.to_pylist()):
            if f not in best or counts[j] > best[f][0]:
                best[f] = (int(counts[j]), j)
        target = np.array([best[f][1] for f in folded.to_pylist()], dtype=np.int64)
        out, n = t.remap(t.values.take(pa.array(target)))
        self._add(key, n)
        return out

    def lower(self, t: _Text, key: str) -> _Text:
        out, n = t.remap(pc.utf8_lower(t.values))
        self._add(key, n)
        return out

    def map(self, t: _Text, fn: Callable[[str], str], key: str) -> _Text:
        """Apply ``fn`` to every distinct value."""
        vals = t.values.to_pylist()
        out, n = t.remap(pa.array([fn(v) for v in vals], pa.string()))
        self._add(key, n)
        return out


def _missing(col: pa.ChunkedArray | pa.Array, n: int) -> np.ndarray:
    return _bool(pc.or_(pc.is_null(col), pc.is_in(col, value_set=NULL_TOKENS)))


def _blank_to_null(col: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    return pc.if_else(pc.is_in(col, value_set=NULL_TOKENS), pa.scalar(None, pa.string()), col)


def first_occurrences(codes: list[np.ndarray]) -> np.ndarray:
    """Bool mask of rows that are the first of their exact duplicates, given int64 codes per column.

    A 64-bit row hash finds candidate duplicates in one sort; candidates are then compared exactly, so hash
    collisions can never merge rows that differ.
    """
    n = len(codes[0]) if codes else 0
    first = np.ones(n, dtype=bool)
    if n < 2:
        return first
    h = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j, c in enumerate(codes):
            h ^= c.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15 + 2 * j)
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(31)
    cand = pd.Series(h, copy=False).duplicated(keep=False).to_numpy()  # hash table, O(n)
    if not cand.any():
        return first
    rows = np.flatnonzero(cand)
    seen: set[tuple[int, ...]] = set()
    cols = [c[rows] for c in codes]
    for k, r in enumerate(rows):
        key = tuple(int(c[k]) for c in cols)
        if key in seen:
            first[r] = False
        else:
            seen.add(key)
    return first


def _float_codes(v: np.ndarray) -> np.ndarray:
    """float64 -> int64 codes equal exactly when the values are equal (all NaNs/nulls equal, -0.0 == 0.0)."""
    v = np.where(v == 0, 0.0, v)
    codes = v.view(np.int64).copy()
    codes[np.isnan(v)] = np.iinfo(np.int64).min
    return codes


def _numbers(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values with NaN for empty, bad mask) for a numeric column given as numbers or text."""
    n = table.num_rows
    if name not in table.column_names:
        return np.full(n, np.nan), np.zeros(n, dtype=bool)
    col = table.column(name)
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_decimal(col.type):
        return _np(pc.fill_null(col.cast(pa.float64()), float("nan"))).astype(np.float64), np.zeros(n, dtype=bool)
    if pa.types.is_boolean(col.type) or not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = col.cast(pa.string())
    col = pc.utf8_trim_whitespace(col)
    empty = _missing(col, n)
    try:
        vals = _np(pc.fill_null(pc.cast(_blank_to_null(col), pa.float64()), float("nan"))).astype(np.float64)
        return vals, np.zeros(n, dtype=bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        s = pd.Series(_np(col), dtype=object)
        vals = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64)
        bad = np.isnan(vals) & ~empty
        return vals, bad


def _timestamps(table: pa.Table, name: str, lo_us: int, hi_us: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int64 microseconds since epoch UTC, bad mask, empty mask)."""
    n = table.num_rows
    col = table.column(name)
    empty = np.zeros(n, dtype=bool)
    if pa.types.is_timestamp(col.type):
        # ns -> us truncates (pandas writes ns; the text path truncates the same way); s / ms -> us is exact
        us = col if col.type.unit == "us" else col.cast(pa.timestamp("us", tz=col.type.tz),
                                                        safe=col.type.unit != "ns")
        null = _bool(pc.is_null(us))
        vals = _np(pc.fill_null(us.cast(pa.int64()), 0)).astype(np.int64)
        empty = null
        bad = np.zeros(n, dtype=bool)
    elif pa.types.is_date(col.type):
        ts = col.cast(pa.timestamp("us"))
        empty = _bool(pc.is_null(ts))
        vals = _np(pc.fill_null(ts.cast(pa.int64()), 0)).astype(np.int64)
        bad = np.zeros(n, dtype=bool)
    elif pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        f = _np(pc.fill_null(col.cast(pa.float64()), float("nan"))).astype(np.float64)
        empty = np.isnan(f)
        vals, bad = _unix_to_us(f)
    else:
        text = pc.utf8_trim_whitespace(col.cast(pa.string()))
        empty = _missing(text, n)
        nums, notnum = _numbers(pa.table({"t": text}), "t")
        vals, bad = _unix_to_us(nums)
        bad |= False
        if notnum.any():
            idx = np.flatnonzero(notnum)
            s = pd.Series(_np(text.take(pa.array(idx))), dtype=object)
            parsed = pd.to_datetime(s, utc=True, errors="coerce", format="ISO8601")
            ok = parsed.notna().to_numpy()
            conv = parsed.to_numpy(dtype="datetime64[us]", na_value=np.datetime64("NaT")).astype(np.int64)
            vals[idx[ok]] = conv[ok]
            bad[idx] = ~ok
    bad = (bad | (vals < lo_us) | (vals > hi_us)) & ~empty
    return vals, bad, empty


def _unix_to_us(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(f)
        ms = finite & (np.abs(f) > 1e11)
        sec = np.where(ms, f / 1000.0, f)
        ok = finite & (np.abs(sec) < 1e13)
        vals = np.zeros(len(f), dtype=np.int64)
        vals[ok] = np.rint(sec[ok] * 1e6).astype(np.int64)
    return vals, ~ok & ~np.isnan(f)


_WS = re.compile(r"\s+")


def _clean_attributes(t: _Text | None, n: int, cleaner: _Cleaner) -> tuple[pa.Array, np.ndarray, dict[int, str]]:
    """Parse and normalise JSON attribute objects. Returns (JSON text column, bad-row mask, messages by row).

    Names: trimmed, lower-case, ``_`` for spaces. Values: trimmed, whitespace collapsed, and spellings of one
    attribute that differ only in case mapped to the most frequent spelling ("Red"/"red" -> "red", "XL" stays).
    Work is done once per distinct JSON text.
    """
    if t is None:
        return pa.nulls(n, pa.string()), np.zeros(n, dtype=bool), {}
    texts = t.values.to_pylist()
    counts = t.counts
    parsed: list[dict[str, str] | None] = []
    errors: dict[int, str] = {}
    freq: dict[tuple[str, str], int] = {}
    for j, v in enumerate(texts):
        if v.strip() in ("", "null", "{}") or v in ("nan", "NaN", "None"):
            parsed.append(None)
            continue
        obj, err = _normalise_attributes(v)
        if err is not None:
            errors[j] = err
            parsed.append(None)
            continue
        parsed.append(obj)
        for kv in (obj or {}).items():
            freq[kv] = freq.get(kv, 0) + int(counts[j])
    best: dict[tuple[str, str], tuple[int, str]] = {}
    for (k, v), c in freq.items():
        key = (k, v.casefold())
        if key not in best or c > best[key][0]:
            best[key] = (c, v)
    new_texts: list[str | None] = []
    for obj in parsed:
        if not obj:
            new_texts.append(None)
            continue
        obj = {k: best[(k, v.casefold())][1] for k, v in obj.items()}
        new_texts.append(json.dumps(obj, ensure_ascii=False, sort_keys=True))
    out, changed = t.remap(pa.array(new_texts, pa.string()))
    # rows whose JSON was only emptied ("{}", "null") are not "normalised" in a way worth counting
    cleaner._add("attributes_normalised", changed - int(sum(counts[j] for j, o in enumerate(parsed)
                                                              if o is None and j not in errors)))
    bad_val = np.zeros(len(texts), dtype=bool)
    bad_val[list(errors)] = True
    bad = t.rows(bad_val)
    msgs = {int(i): errors[int(t.codes[i])] for i in np.flatnonzero(bad)}
    return out.to_arrow(), bad, msgs


def _normalise_attributes(text: str) -> tuple[dict[str, str] | None, str | None]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"attributes is not valid JSON ({exc.msg}): {text[:80]!r}"
    if not isinstance(obj, dict):
        return None, f"attributes must be a JSON object of name -> value, got {type(obj).__name__}"
    clean: dict[str, str] = {}
    first_key: dict[str, str] = {}
    for k, v in obj.items():
        # "=" separates name and value in AttributeValue ids (kg.loading.attribute_value_id): "_" in names
        name = _WS.sub("_", str(k).strip()).lower().replace("=", "_")
        if name and name in first_key and v is not None:
            return None, (f"attributes {first_key[name]!r} and {k!r} are the same name {name!r} after normalisation "
                          "(lower case, '_' for spaces and '='); keep one")
        if name and v is not None:
            first_key[name] = str(k)
        if isinstance(v, (dict, list)):
            return None, f"attribute {k!r} has a nested value ({type(v).__name__}); values must be text or numbers"
        if v is None:
            continue
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, float) and v.is_integer():
            v = str(int(v))
        value = _WS.sub(" ", str(v).strip())
        if not name or not value:
            continue
        clean[name] = value
    return (clean or None), None


# ----------------------------------------------------------------------------------------------- images


def check_image_reference(root: Path, ref: str, *, decode: bool = True, max_pixels: int = 50_000_000) -> tuple[str | None, str]:
    """(reason or None, message) for an image path given relative to ``root``.

    Absolute paths, URLs, drive letters and paths whose resolved location (``..`` and symlinks followed) leaves
    ``root`` are rejected before the file system is touched beyond ``resolve``.
    """
    if "://" in ref or ref.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", ref) or "\x00" in ref:
        return "image_outside_root", f"image {ref!r} must be a path relative to the dataset directory"
    root_resolved = root.resolve()
    try:
        target = (root / ref).resolve()
    except (OSError, RuntimeError) as exc:  # symlink loops
        return "image_unreadable", f"image {ref!r} cannot be resolved ({exc})"
    if not target.is_relative_to(root_resolved):
        return "image_outside_root", f"image {ref!r} resolves outside the dataset directory {root_resolved}"
    if not target.exists():
        return "image_missing", f"image file {ref!r} does not exist under {root}"
    if not target.is_file():
        return "image_unreadable", f"image {ref!r} is not a regular file"
    if not decode:
        return None, ""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(target) as im:
            if im.width * im.height > max_pixels:
                return "image_unreadable", f"image {ref!r} has {im.width}x{im.height} pixels, over the limit {max_pixels}"
            im.load()
    except UnidentifiedImageError:
        return "image_not_an_image", f"file {ref!r} is not an image Pillow recognises"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return "image_unreadable", f"image {ref!r} cannot be decoded ({exc})"
    return None, ""


# ----------------------------------------------------------------------------------------------- tables


def _require_columns(raw: RawTable, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in raw.table.column_names]
    if missing and raw.table.num_rows == 0:  # nothing parsed (e.g. every line rejected): empty columns
        for c in missing:
            raw.table = raw.table.append_column(c, pa.array([], pa.string()))
        return
    if missing and raw.table.num_rows:
        file = raw.table.column(FILE_COL)[0].as_py()
        raise DataError(f"{file}: required column(s) {missing} are absent (found {[c for c in raw.table.column_names if not c.startswith('__')]}); "
                        f"rename the columns to the data model names (see README: Data model)")



def _result(name: str, raw: RawTable, flags: _Flags, kept_table: pa.Table, cleaner: _Cleaner, merged: int = 0) -> TableResult:
    q = flags.quarantine(name)
    files = sorted(set(raw.table.column(FILE_COL).cast(pa.string()).unique().to_pylist()) |
                   {r["file"] for r in raw.rejected}) if raw.num_read else []
    res = TableResult(name, kept_table, q, raw.num_read, int(flags.ok.sum()), merged, flags.reason_counts(),
                      cleaner.counts, raw.blank_rows, files)
    if res.kept + res.quarantined != res.read or res.written != res.kept - res.merged:  # pragma: no cover - a bug
        raise AssertionError(f"{name}: row accounting broken: read {res.read}, kept {res.kept}, quarantined "
                             f"{res.quarantined}, merged {res.merged}, written {res.written}")
    return res


def _check_common(flags: _Flags, required: dict[str, _Text | None],
                  lengths: list[tuple[str, _Text | None, int]]) -> None:
    n = flags.n
    for cname, col in required.items():
        miss = np.ones(n, dtype=bool) if col is None else col.missing()
        flags.flag(miss, "missing_required", lambda i, c=cname: f"required field {c!r} is empty")
    for cname, col, limit in lengths:
        if col is None or len(col.values) == 0:
            continue
        long = col.longer_than(limit)
        if long.any():
            lens = col.lengths()
            flags.flag(long, "too_long",
                       lambda i, c=cname, L=limit, t=col: f"{c} has {int(lens[t.codes[i]])} characters (limit {L})")


def _out(t: _Text | None, n: int) -> pa.Array:
    return pa.nulls(n, pa.string()) if t is None else t.blank_to_null().to_arrow()


def validate_items(raw: RawTable, config: DataConfig, root: Path) -> TableResult:
    _require_columns(raw, ("item_id",) + tuple(c for c in raw.required if c != "item_id"))
    t, n, cl = raw.table, raw.table.num_rows, _Cleaner()
    flags = _Flags(raw)
    item_id = cl.text(t, "item_id")
    title = cl.collapse(cl.text(t, "title"))
    desc = cl.collapse(cl.text(t, "description"), r"[ \t]+")
    brand = cl.canonical_case(cl.collapse(cl.text(t, "brand")))
    category = cl.collapse(cl.text(t, "category"))
    if category is not None:
        category, k = category.remap(pc.replace_substring_regex(category.values, r"\s*>\s*", ">"))
        cl._add("category_path_normalised", k)
        category = cl.canonical_case(category)
    image = cl.text(t, "image")
    required = {c: {"item_id": item_id, "title": title}.get(c) for c in raw.required}
    attr_text = _Text.of(t.column("attributes")) if "attributes" in t.column_names else None
    _check_common(flags, required, [("item_id", item_id, config.max_id_length), ("title", title, config.max_text_length),
                                    ("description", desc, config.max_text_length), ("brand", brand, config.max_id_length),
                                    ("category", category, config.max_id_length),
                                    ("attributes", attr_text, config.max_text_length)])
    price, bad_price = _numbers(t, "price")
    flags.flag(bad_price, "bad_type", lambda i: f"price {t.column('price')[i].as_py()!r} is not a number")
    with np.errstate(invalid="ignore"):
        flags.flag(~np.isnan(price) & ((price < 0) | ~np.isfinite(price)), "invalid_value",
                   lambda i: f"price {price[i]} must be a finite non-negative number")
    attrs, bad_attrs, attr_msgs = _clean_attributes(attr_text, n, cl)
    flags.flag(bad_attrs, "bad_type", lambda i: attr_msgs[i])
    _flag_duplicate_ids(flags, item_id, "item_id")
    image_col = _out(image, n)
    if image is not None:
        refs = image_col.to_pylist()
        bad_images: dict[str, list[int]] = {}
        image_msgs: dict[int, str] = {}
        checked: dict[str, tuple[str | None, str]] = {}
        for i in np.flatnonzero(flags.ok & ~image.missing()):
            ref = refs[i]
            if ref not in checked:
                checked[ref] = check_image_reference(root, ref, decode=config.check_images,
                                                     max_pixels=config.max_image_pixels)
            reason, msg = checked[ref]
            if reason:
                bad_images.setdefault(reason, []).append(int(i))
                image_msgs[int(i)] = msg
            else:
                refs[i] = posixpath.normpath(ref.replace("\\", "/"))
        for reason, idx in bad_images.items():
            mask = np.zeros(n, dtype=bool)
            mask[idx] = True
            flags.flag(mask, reason, lambda i: image_msgs[i])
        image_col = pa.array(refs, pa.string())
    title_col = pa.array([""] * n, pa.string()) if title is None else pc.fill_null(title.to_arrow(), "")
    out = pa.table({
        "item_id": item_id.to_arrow(), "title": title_col, "description": _out(desc, n), "brand": _out(brand, n),
        "category": _out(category, n), "attributes": attrs, "price": pa.array(price, pa.float64(), from_pandas=True),
        "image": image_col,
    }).filter(pa.array(flags.ok))
    return _result("items", raw, flags, conform(out, "items"), cl)


def _flag_duplicate_ids(flags: _Flags, ids: _Text, name: str) -> None:
    ok_idx = np.flatnonzero(flags.ok)
    if len(ok_idx) == 0:
        return
    codes = ids.codes[ok_idx]
    uniq, first_pos = np.unique(codes, return_index=True)
    if len(uniq) == len(codes):
        return
    first_row = np.full(len(ids.values) + 1, -1, dtype=np.int64)
    first_row[uniq] = ok_idx[first_pos]
    dup = np.zeros(flags.n, dtype=bool)
    dup[ok_idx] = True
    dup[ok_idx[first_pos]] = False
    flags.flag(dup, "duplicate_id", lambda i: f"{name} {ids.value(i)!r} was already defined on line "
                                              f"{int(flags.lines[first_row[ids.codes[i]]])}")


def validate_users(raw: RawTable, config: DataConfig) -> TableResult:
    _require_columns(raw, ("user_id",))
    t, n, cl = raw.table, raw.table.num_rows, _Cleaner()
    flags = _Flags(raw)
    user_id = cl.text(t, "user_id")
    attr_text = _Text.of(t.column("attributes")) if "attributes" in t.column_names else None
    _check_common(flags, {"user_id": user_id}, [("user_id", user_id, config.max_id_length),
                                                ("attributes", attr_text, config.max_text_length)])
    attrs, bad, msgs = _clean_attributes(attr_text, n, cl)
    flags.flag(bad, "bad_type", lambda i: msgs[i])
    _flag_duplicate_ids(flags, user_id, "user_id")
    out = pa.table({"user_id": user_id.to_arrow(), "attributes": attrs}).filter(pa.array(flags.ok))
    return _result("users", raw, flags, conform(out, "users"), cl)


def _ts_bounds(config: DataConfig) -> tuple[int, int]:
    lo = pd.Timestamp(config.min_timestamp)
    hi = pd.Timestamp(config.max_timestamp)
    lo = lo.tz_localize("UTC") if lo.tzinfo is None else lo.tz_convert("UTC")
    hi = hi.tz_localize("UTC") if hi.tzinfo is None else hi.tz_convert("UTC")
    return int(lo.value // 1000), int(hi.value // 1000)


def validate_events(raw: RawTable, config: DataConfig, known_items: pa.Array, known_users: pa.Array | None) -> TableResult:
    """``known_users=None``: users are implicit (no users file), so no user check."""
    _require_columns(raw, ("user_id", "item_id", "type"))
    t, n, cl = raw.table, raw.table.num_rows, _Cleaner()
    flags = _Flags(raw)
    user_id, item_id = cl.text(t, "user_id"), cl.text(t, "item_id")
    raw_type = cl.text(t, "type")
    query = cl.collapse(cl.text(t, "query"))
    _check_common(flags, {"user_id": user_id, "item_id": item_id, "type": raw_type},
                  [("user_id", user_id, config.max_id_length), ("item_id", item_id, config.max_id_length),
                   ("query", query, config.max_text_length)])
    etype = cl.map(raw_type, lambda v: EVENT_TYPE_SYNONYMS.get(v.lower(), v.lower()), "event_type_normalised")
    flags.flag(etype.not_in(pa.array(EVENT_TYPES)), "invalid_event_type",
               lambda i: f"event type {raw_type.value(i)!r} is not one of {', '.join(EVENT_TYPES)}")
    value, bad_value = _numbers(t, "value")
    flags.flag(bad_value, "bad_type", lambda i: f"value {t.column('value')[i].as_py()!r} is not a number")
    with np.errstate(invalid="ignore"):
        flags.flag(~np.isnan(value) & ~np.isfinite(value), "invalid_value", lambda i: f"value {value[i]} is not finite")
    ts_codes = np.full(n, np.iinfo(np.int64).min, dtype=np.int64)
    if "timestamp" in t.column_names:
        lo, hi = _ts_bounds(config)
        ts, bad_ts, empty_ts = _timestamps(t, "timestamp", lo, hi)
        flags.flag(empty_ts, "missing_required", lambda i: "required field 'timestamp' is empty")
        flags.flag(bad_ts, "bad_timestamp",
                   lambda i: f"timestamp {t.column('timestamp')[i].as_py()!r} is not a valid date/time in "
                             f"[{config.min_timestamp}, {config.max_timestamp}] (ISO-8601 or unix seconds)")
        ts_arr = pa.array(ts, pa.int64()).cast(pa.timestamp("us", tz="UTC"))
        ts_codes = ts
    else:
        ts_arr = pa.nulls(n, pa.timestamp("us", tz="UTC"))
    flags.flag(item_id.not_in(known_items), "unknown_item", lambda i: f"item_id {item_id.value(i)!r} is not in the catalog")
    if known_users is not None:
        flags.flag(user_id.not_in(known_users), "unknown_user",
                   lambda i: f"user_id {user_id.value(i)!r} is not in the users file")
    query = query.blank_to_null() if query is not None else _Text.nulls(n)
    ok_idx = np.flatnonzero(flags.ok)
    all_ok = len(ok_idx) == n
    first = first_occurrences([c if all_ok else c[ok_idx] for c in (user_id.codes, item_id.codes, etype.codes,
                                                                    ts_codes, _float_codes(value), query.codes)])
    keep = ok_idx[first]
    take = pa.array(keep)
    out = pa.table({
        "user_id": user_id.to_arrow().take(take), "item_id": item_id.to_arrow().take(take),
        "type": etype.to_arrow().take(take), "timestamp": ts_arr.take(take),
        "value": pa.array(value, pa.float64(), from_pandas=True).take(take), "query": query.to_arrow().take(take),
    })
    return _result("events", raw, flags, conform(out, "events"), cl, merged=len(ok_idx) - len(keep))


def merge_exact_duplicates(table: pa.Table) -> tuple[pa.Table, int]:
    """Drop rows equal in every column to an earlier row; returns (first occurrences in order, rows dropped)."""
    if table.num_rows < 2:
        return table, 0
    codes = []
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_floating(col.type):
            codes.append(_float_codes(_np(pc.fill_null(col, float("nan"))).astype(np.float64)))
        elif pa.types.is_integer(col.type) or pa.types.is_timestamp(col.type):
            codes.append(_np(pc.fill_null(col.cast(pa.int64()), np.iinfo(np.int64).min)).astype(np.int64))
        else:
            codes.append(_Text.of(col).codes)
    first = first_occurrences(codes)
    if first.all():
        return table, 0
    return table.filter(pa.array(first)), int((~first).sum())


def validate_pairs(raw: RawTable, config: DataConfig, name: str, known_items: pa.Array | None = None,
                   known_users: pa.Array | None = None) -> TableResult:
    """triples (head, relation, tail), links (item_id, entity_id) and split (user_id, item_id, split)."""
    cols = {"triples": ("head", "relation", "tail"), "links": ("item_id", "entity_id"),
            "split": ("user_id", "item_id", "split")}[name]
    _require_columns(raw, cols)
    t, cl = raw.table, _Cleaner()
    flags = _Flags(raw)
    values = {c: cl.text(t, c) for c in cols}
    _check_common(flags, values, [(c, values[c], config.max_id_length if c != "tail" else config.max_text_length)
                                  for c in cols])
    if name == "split":
        raw_split = values["split"]
        values["split"] = cl.map(raw_split, lambda v: SPLIT_SYNONYMS.get(v.lower(), v.lower()), "split_normalised")
        flags.flag(values["split"].not_in(pa.array(SPLITS)), "invalid_value",
                   lambda i: f"split {raw_split.value(i)!r} is not one of {', '.join(SPLITS)}")
    if known_items is not None and "item_id" in values:
        flags.flag(values["item_id"].not_in(known_items), "unknown_item",
                   lambda i: f"item_id {values['item_id'].value(i)!r} is not in the catalog")
    if known_users is not None and "user_id" in values:
        flags.flag(values["user_id"].not_in(known_users), "unknown_user",
                   lambda i: f"user_id {values['user_id'].value(i)!r} is not a known user")
    ok_idx = np.flatnonzero(flags.ok)
    first = first_occurrences([values[c].codes[ok_idx] for c in cols])
    keep = pa.array(ok_idx[first])
    out = pa.table({c: values[c].to_arrow().take(keep) for c in cols})
    return _result(name, raw, flags, conform(out, name), cl, merged=len(ok_idx) - int(first.sum()))


@dataclass
class ValidatedSource:
    results: dict[str, TableResult]
    implicit_users: int


def validate_source(raw: RawSource, config: DataConfig) -> ValidatedSource:
    """Validate every table in dependency order: items, users, events (implicit users), links, triples, split."""
    results: dict[str, TableResult] = {}
    results["items"] = validate_items(raw.tables["items"], config, raw.root)
    items = results["items"].table.column("item_id").combine_chunks()
    known_users = None
    if "users" in raw.tables:
        results["users"] = validate_users(raw.tables["users"], config)
        known_users = results["users"].table.column("user_id").combine_chunks()
    if "events" in raw.tables:
        results["events"] = validate_events(raw.tables["events"], config, items, known_users)
    implicit = 0
    if known_users is None:
        # no users file: users are whoever appears in the kept events (and the split), in order of appearance
        parts = [results["events"].table.column("user_id")] if "events" in results else []
        if "split" in raw.tables and "user_id" in raw.tables["split"].table.column_names:
            parts.append(pc.utf8_trim_whitespace(raw.tables["split"].table.column("user_id").cast(pa.string())))
        ids = pa.chunked_array([c for p in parts for c in p.chunks], pa.string())
        ids = pc.unique(ids.filter(pa.array(~_missing(ids, len(ids)))))
        users = pa.table({"user_id": ids})
        results["users"] = TableResult("users", conform(users, "users"), QUARANTINE_SCHEMA.empty_table(), 0, 0)
        implicit = users.num_rows
        known_users = ids
    if "links" in raw.tables:
        results["links"] = validate_pairs(raw.tables["links"], config, "links", known_items=items)
    if "triples" in raw.tables:
        results["triples"] = validate_pairs(raw.tables["triples"], config, "triples")
    if "split" in raw.tables:
        results["split"] = validate_pairs(raw.tables["split"], config, "split", known_items=items, known_users=known_users)
    return ValidatedSource(results, implicit)
