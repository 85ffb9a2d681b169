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
    category segments are trimmed around ``>``; attribute names are lower-case with ``_`` for spaces; attribute
    values are lower-case; event types are lower-case with a few synonyms mapped (``add_to_cart`` -> ``cart``).
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
    "bad_type": "a value has the wrong type (number expected, attributes not a flat JSON object)",
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


class _Cleaner:
    """Vectorised text cleaning that counts how many values each operation changed."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def _count(self, key: str, before: pa.ChunkedArray, after: pa.ChunkedArray) -> None:
        changed = int(pc.sum(pc.fill_null(pc.not_equal(before, after), False)).as_py() or 0)
        if changed:
            self.counts[key] = self.counts.get(key, 0) + changed

    def text(self, table: pa.Table, name: str) -> pa.ChunkedArray | None:
        """Column as trimmed strings (numbers/timestamps cast to text), or None when the column is absent."""
        if name not in table.column_names:
            return None
        col = table.column(name)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            col = col.cast(pa.string())
        trimmed = pc.utf8_trim_whitespace(col)
        self._count("trimmed", col, trimmed)
        return trimmed

    def collapse(self, col: pa.ChunkedArray | None, pattern: str = r"\s+") -> pa.ChunkedArray | None:
        if col is None:
            return None
        out = pc.replace_substring_regex(col, pattern, " ")
        self._count("whitespace_collapsed", col, out)
        return out

    def canonical_case(self, col: pa.ChunkedArray | None, key: str) -> pa.ChunkedArray | None:
        """Map spellings that differ only in case to the most frequent one (ties: first seen)."""
        if col is None or len(col) == 0:
            return col
        vc = pc.value_counts(col)
        values, counts = vc.field("values").to_pylist(), vc.field("counts").to_pylist()
        best: dict[str, tuple[int, str]] = {}
        for v, c in zip(values, counts):
            if v is None:
                continue
            k = v.casefold()
            if k not in best or c > best[k][0]:
                best[k] = (c, v)
        mapping = {v: best[v.casefold()][1] for v in values if v is not None and best[v.casefold()][1] != v}
        if not mapping:
            return col
        out = _map_values(col, mapping)
        self._count(key, col, out)
        return out


def _map_values(col: pa.ChunkedArray, mapping: dict[str, str | None]) -> pa.ChunkedArray:
    """Replace values through a small mapping (via dictionary encoding: cost independent of the mapping size)."""
    enc = pc.dictionary_encode(col).combine_chunks() if isinstance(col, pa.ChunkedArray) else pc.dictionary_encode(col)
    dic = enc.dictionary.to_pylist()
    new_dic = pa.array([mapping.get(v, v) for v in dic], pa.string())
    return pa.chunked_array([new_dic.take(enc.indices)])


def _missing(col: pa.ChunkedArray | None, n: int) -> np.ndarray:
    if col is None:
        return np.ones(n, dtype=bool)
    return _bool(pc.or_(pc.is_null(col), pc.is_in(col, value_set=NULL_TOKENS)))


def _blank_to_null(col: pa.ChunkedArray | None) -> pa.ChunkedArray | None:
    if col is None:
        return None
    return pc.if_else(pc.is_in(col, value_set=NULL_TOKENS), pa.scalar(None, pa.string()), col)


def _too_long(col: pa.ChunkedArray | None, limit: int) -> np.ndarray:
    if col is None:
        return np.zeros(0, dtype=bool)
    return _bool(pc.greater(pc.utf8_length(col), limit))


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
        us = col.cast(pa.timestamp("us", tz=col.type.tz)) if col.type.unit != "us" else col
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


def _clean_attributes(col: pa.ChunkedArray | None, n: int, cleaner: _Cleaner) -> tuple[pa.Array, np.ndarray, dict[int, str]]:
    """Parse and normalise JSON attribute objects. Returns (JSON text column, bad mask, messages).

    Names: trimmed, lower-case, ``_`` for spaces. Values: trimmed, whitespace collapsed, and spellings of one
    attribute that differ only in case mapped to the most frequent spelling ("Red"/"red" -> "red", "XL" stays).
    """
    if col is None:
        return pa.nulls(n, pa.string()), np.zeros(n, dtype=bool), {}
    values = col.to_pylist()
    cache: dict[str, tuple[dict[str, str] | None, str | None]] = {}
    parsed: list[dict[str, str] | None] = []
    bad = np.zeros(n, dtype=bool)
    msgs: dict[int, str] = {}
    freq: dict[tuple[str, str], int] = {}
    for i, v in enumerate(values):
        if v is None or v.strip() in ("", "null", "{}"):
            parsed.append(None)
            continue
        hit = cache.get(v)
        if hit is None:
            hit = _normalise_attributes(v)
            cache[v] = hit
        obj, err = hit
        if err is not None:
            bad[i] = True
            msgs[i] = err
            parsed.append(None)
            continue
        parsed.append(obj)
        for kv in (obj or {}).items():
            freq[kv] = freq.get(kv, 0) + 1
    best: dict[tuple[str, str], tuple[int, str]] = {}
    for (k, v), c in freq.items():
        key = (k, v.casefold())
        if key not in best or c > best[key][0]:
            best[key] = (c, v)
    canon = {(k, v): best[(k, v.casefold())][1] for (k, v) in freq if best[(k, v.casefold())][1] != v}
    out: list[str | None] = []
    changed = 0
    text_cache: dict[int, str | None] = {}
    for i, obj in enumerate(parsed):
        if not obj:
            out.append(None)
            continue
        if canon:
            obj = {k: canon.get((k, v), v) for k, v in obj.items()}
            text = json.dumps(obj, ensure_ascii=False, sort_keys=True)
        else:
            key = id(obj)
            text = text_cache.get(key)
            if text is None:
                text = text_cache[key] = json.dumps(obj, ensure_ascii=False, sort_keys=True)
        out.append(text)
        if text != values[i]:
            changed += 1
    if changed:
        cleaner.counts["attributes_normalised"] = cleaner.counts.get("attributes_normalised", 0) + changed
    return pa.array(out, pa.string()), bad, msgs


def _normalise_attributes(text: str) -> tuple[dict[str, str] | None, str | None]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"attributes is not valid JSON ({exc.msg}): {text[:80]!r}"
    if not isinstance(obj, dict):
        return None, f"attributes must be a JSON object of name -> value, got {type(obj).__name__}"
    clean: dict[str, str] = {}
    for k, v in obj.items():
        name = _WS.sub("_", str(k).strip()).lower()
        if isinstance(v, (dict, list)):
            return None, f"attribute {k!r} has a nested value ({type(v).__name__}); values must be text or numbers"
        if v is None:
            continue
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, float) and v.is_integer():
            v = str(int(v))
        value = _WS.sub(" ", str(v).strip())
        if not name or not value or name in clean:
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
    assert res.kept + res.quarantined == res.read, (name, res.kept, res.quarantined, res.read)
    assert res.written == res.kept - res.merged, (name, res.written, res.kept, res.merged)
    return res


def _check_common(flags: _Flags, required: dict[str, pa.ChunkedArray | None], lengths: list[tuple[str, pa.ChunkedArray | None, int]]) -> None:
    n = flags.n
    for cname, col in required.items():
        miss = _missing(col, n)
        flags.flag(miss, "missing_required", lambda i, c=cname: f"required field {c!r} is empty")
    for cname, col, limit in lengths:
        if col is None:
            continue
        long = _too_long(col, limit)
        if long.any():
            lens = _np(pc.utf8_length(col))
            flags.flag(long, "too_long", lambda i, c=cname, L=limit: f"{c} has {int(lens[i])} characters (limit {L})")


def validate_items(raw: RawTable, config: DataConfig, root: Path) -> TableResult:
    _require_columns(raw, ("item_id",) + tuple(c for c in raw.required if c != "item_id"))
    t, n, cl = raw.table, raw.table.num_rows, _Cleaner()
    flags = _Flags(raw)
    item_id = cl.text(t, "item_id")
    title = cl.collapse(cl.text(t, "title"))
    desc = cl.collapse(cl.text(t, "description"), r"[ \t]+")
    brand = cl.canonical_case(cl.collapse(cl.text(t, "brand")), "case_normalised")
    category = cl.text(t, "category")
    if category is not None:
        seg = pc.replace_substring_regex(cl.collapse(category), r"\s*>\s*", ">")
        cl._count("category_path_normalised", category, seg)
        category = cl.canonical_case(seg, "case_normalised")
    image = cl.text(t, "image")
    required = {c: {"item_id": item_id, "title": title}.get(c) for c in raw.required}
    _check_common(flags, required, [("item_id", item_id, config.max_id_length), ("title", title, config.max_text_length),
                                    ("description", desc, config.max_text_length), ("brand", brand, config.max_id_length),
                                    ("category", category, config.max_id_length)])
    price, bad_price = _numbers(t, "price")
    flags.flag(bad_price, "bad_type", lambda i: f"price {t.column('price')[i].as_py()!r} is not a number")
    with np.errstate(invalid="ignore"):
        flags.flag(~np.isnan(price) & ((price < 0) | ~np.isfinite(price)), "invalid_value",
                   lambda i: f"price {price[i]} must be a finite non-negative number")
    attrs, bad_attrs, attr_msgs = _clean_attributes(t.column("attributes") if "attributes" in t.column_names else None, n, cl)
    flags.flag(bad_attrs, "bad_type", lambda i: attr_msgs[i])
    _flag_duplicate_ids(flags, item_id, "item_id")
    if image is not None:
        refs = _np(image)
        has = flags.ok & ~_missing(image, n)
        bad_images: dict[str, list[int]] = {}
        image_msgs: dict[int, str] = {}
        normalised = list(refs)
        for i in np.flatnonzero(has):
            reason, msg = check_image_reference(root, refs[i], decode=config.check_images,
                                                max_pixels=config.max_image_pixels)
            if reason:
                bad_images.setdefault(reason, []).append(int(i))
                image_msgs[int(i)] = msg
            else:
                normalised[i] = posixpath.normpath(refs[i].replace("\\", "/"))
        for reason, idx in bad_images.items():
            mask = np.zeros(n, dtype=bool)
            mask[idx] = True
            flags.flag(mask, reason, lambda i: image_msgs[i])
        image = pa.chunked_array([pa.array(normalised, pa.string())])
    keep = pa.array(flags.ok)
    out = pa.table({
        "item_id": item_id, "title": title if title is not None else pa.array([""] * n, pa.string()),
        "description": desc if desc is not None else pa.nulls(n, pa.string()),
        "brand": _blank_to_null(brand) if brand is not None else pa.nulls(n, pa.string()),
        "category": _blank_to_null(category) if category is not None else pa.nulls(n, pa.string()),
        "attributes": attrs, "price": pa.array(price, pa.float64(), from_pandas=True),
        "image": _blank_to_null(image) if image is not None else pa.nulls(n, pa.string()),
    }).filter(keep)
    out = out.set_column(1, "title", pc.fill_null(out.column("title"), ""))
    return _result("items", raw, flags, conform(out, "items"), cl)


def _flag_duplicate_ids(flags: _Flags, ids: pa.ChunkedArray, name: str) -> None:
    ok_idx = np.flatnonzero(flags.ok)
    if len(ok_idx) == 0:
        return
    sub = pa.table({"id": ids.take(pa.array(ok_idx)), "i": pa.array(ok_idx)})
    first = sub.group_by("id", use_threads=False).aggregate([("i", "min")])
    is_first = np.zeros(flags.n, dtype=bool)
    is_first[_np(first.column("i_min"))] = True
    dup = np.zeros(flags.n, dtype=bool)
    dup[ok_idx] = ~is_first[ok_idx]
    if dup.any():
        first_of = dict(zip(first.column("id").to_pylist(), _np(first.column("i_min")).tolist()))
        id_vals = ids.take(pa.array(np.flatnonzero(dup))).to_pylist()
        lookup = dict(zip(np.flatnonzero(dup).tolist(), id_vals))
        flags.flag(dup, "duplicate_id",
                   lambda i: f"{name} {lookup[i]!r} was already defined on line {int(flags.lines[first_of[lookup[i]]])}")


def validate_users(raw: RawTable, config: DataConfig) -> TableResult:
    _require_columns(raw, ("user_id",))
    t, n, cl = raw.table, raw.table.num_rows, _Cleaner()
    flags = _Flags(raw)
    user_id = cl.text(t, "user_id")
    _check_common(flags, {"user_id": user_id}, [("user_id", user_id, config.max_id_length)])
    attrs, bad, msgs = _clean_attributes(t.column("attributes") if "attributes" in t.column_names else None, n, cl)
    flags.flag(bad, "bad_type", lambda i: msgs[i])
    _flag_duplicate_ids(flags, user_id, "user_id")
    out = pa.table({"user_id": user_id, "attributes": attrs}).filter(pa.array(flags.ok))
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
    etype = cl.text(t, "type")
    query = cl.collapse(cl.text(t, "query"))
    required = {"user_id": user_id, "item_id": item_id, "type": etype}
    has_ts = "timestamp" in t.column_names
    _check_common(flags, required, [("user_id", user_id, config.max_id_length), ("item_id", item_id, config.max_id_length),
                                    ("query", query, config.max_text_length)])
    # event type: lower-case, synonyms
    lowered = pc.utf8_lower(etype)
    mapping = {v: EVENT_TYPE_SYNONYMS.get(v, v) for v in pc.unique(lowered).to_pylist() if v is not None}
    norm = _map_values(lowered, mapping) if any(k != v for k, v in mapping.items()) else lowered
    cl._count("event_type_normalised", etype, norm)
    etype = norm
    bad_type = ~_bool(pc.is_in(etype, value_set=pa.array(EVENT_TYPES)))
    flags.flag(bad_type, "invalid_event_type",
               lambda i: f"event type {t.column('type')[i].as_py()!r} is not one of {', '.join(EVENT_TYPES)}")
    value, bad_value = _numbers(t, "value")
    flags.flag(bad_value, "bad_type", lambda i: f"value {t.column('value')[i].as_py()!r} is not a number")
    with np.errstate(invalid="ignore"):
        flags.flag(~np.isnan(value) & ~np.isfinite(value), "invalid_value", lambda i: f"value {value[i]} is not finite")
    if has_ts:
        lo, hi = _ts_bounds(config)
        ts, bad_ts, empty_ts = _timestamps(t, "timestamp", lo, hi)
        flags.flag(empty_ts, "missing_required", lambda i: "required field 'timestamp' is empty")
        flags.flag(bad_ts, "bad_timestamp",
                   lambda i: f"timestamp {t.column('timestamp')[i].as_py()!r} is not a valid date/time in "
                             f"[{config.min_timestamp}, {config.max_timestamp}] (ISO-8601 or unix seconds)")
        ts_arr = pa.array(ts, pa.int64()).cast(pa.timestamp("us", tz="UTC"))
    else:
        ts_arr = pa.nulls(n, pa.timestamp("us", tz="UTC"))
    unknown_item = ~_bool(pc.is_in(item_id, value_set=known_items))
    flags.flag(unknown_item, "unknown_item", lambda i: f"item_id {item_id[i].as_py()!r} is not in the catalog")
    if known_users is not None:
        unknown_user = ~_bool(pc.is_in(user_id, value_set=known_users))
        flags.flag(unknown_user, "unknown_user", lambda i: f"user_id {user_id[i].as_py()!r} is not in the users file")
    out = pa.table({
        "user_id": user_id, "item_id": item_id, "type": etype, "timestamp": ts_arr,
        "value": pa.array(value, pa.float64(), from_pandas=True),
        "query": _blank_to_null(query) if query is not None else pa.nulls(n, pa.string()),
    }).filter(pa.array(flags.ok))
    out, merged = merge_exact_duplicates(conform(out, "events"))
    return _result("events", raw, flags, out, cl, merged)


def merge_exact_duplicates(table: pa.Table) -> tuple[pa.Table, int]:
    """Drop rows equal in every column to an earlier row; returns (first occurrences in order, rows dropped)."""
    if table.num_rows == 0:
        return table, 0
    keys = []
    work = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_string(col.type):  # integer codes group much faster than strings
            enc = pc.dictionary_encode(col).combine_chunks()
            work[name] = enc.indices
        else:
            work[name] = col
        keys.append(name)
    work["__i"] = pa.array(np.arange(table.num_rows, dtype=np.int64))
    g = pa.table(work).group_by(keys, use_threads=False).aggregate([("__i", "min")])
    if g.num_rows == table.num_rows:
        return table, 0
    first = np.sort(_np(g.column("__i_min")))
    return table.take(pa.array(first)), table.num_rows - len(first)


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
        low = pc.utf8_lower(values["split"])
        mapping = {v: SPLIT_SYNONYMS.get(v, v) for v in pc.unique(low).to_pylist() if v is not None}
        values["split"] = _map_values(low, mapping)
        bad = ~_bool(pc.is_in(values["split"], value_set=pa.array(SPLITS)))
        flags.flag(bad, "invalid_value", lambda i: f"split {t.column('split')[i].as_py()!r} is not one of {', '.join(SPLITS)}")
    if known_items is not None and "item_id" in values:
        unknown = ~_bool(pc.is_in(values["item_id"], value_set=known_items))
        flags.flag(unknown, "unknown_item", lambda i: f"item_id {values['item_id'][i].as_py()!r} is not in the catalog")
    if known_users is not None and "user_id" in values:
        unknown = ~_bool(pc.is_in(values["user_id"], value_set=known_users))
        flags.flag(unknown, "unknown_user", lambda i: f"user_id {values['user_id'][i].as_py()!r} is not a known user")
    out = pa.table(values).filter(pa.array(flags.ok))
    out, merged = merge_exact_duplicates(conform(out, name))
    return _result(name, raw, flags, out, cl, merged)


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
        ids = pa.chunked_array([c for p in parts for c in p.chunks], pa.string()) if parts else pa.chunked_array([], pa.string())
        ids = pc.unique(ids.filter(pc.invert(_as_bool_array(_missing(ids, len(ids))))))
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


def _as_bool_array(mask: np.ndarray) -> pa.Array:
    return pa.array(mask, pa.bool_())
