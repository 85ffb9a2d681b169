"""Readers: raw files in the formats users have -> ``RawTable``s named after the dataset tables.

A reader only *maps* columns to the data model (``item_id``, ``title`` ...) and keeps where every row came from
(``__file``, ``__line``: 1-based physical line of a text file, 1-based row of a Parquet file). It never drops a row
silently: rows that cannot be parsed at all (wrong number of columns, invalid JSON, invalid UTF-8) are returned in
``RawTable.rejected`` with a reason, and validation (``kgrec.data.validation``) decides about the rest.

Formats (``detect_format`` picks one from the files present, ``fmt=`` overrides):

* ``native``: ``items|users|events|triples|links|split`` ``.csv|.tsv|.jsonl|.ndjson|.parquet``. Item attributes come
  as a JSON object column ``attributes`` and/or ``attr_<name>`` columns; extra user columns become user attributes.
* ``recbole``: RecBole atomic files ``<name>.inter .item .user .kg .link`` with typed headers (``item_id:token``).
  Ratings become ``rating`` events with ``value``; without a rating column, interactions are ``purchase`` events;
  ``timestamp`` is unix seconds. A user's split is kept from ``<name>.{train,valid,test}.inter`` or
  ``{train,valid,test}.{tsv,csv}`` beside it.
* ``kgat``: KGAT/KGIN ``train.txt test.txt kg_final.txt`` (lines ``user item item ...`` and ``head relation tail``),
  optional ``item_list.txt``/``relation_list.txt``. Interactions are ``purchase`` events without timestamps; the
  split is kept; item ``i`` is linked to entity ``i`` (KGAT's convention: items are the first entities).
* ``hm``: H&M Kaggle layout ``articles.csv customers.csv transactions_train.csv images/0xx/<article_id>.jpg``.
  Article ids are zero-padded to 10 digits (as in the image names); price = mean transaction price.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from kgrec.errors import DataError

logger = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("native", "recbole", "kgat", "hm")
TABLE_NAMES: tuple[str, ...] = ("items", "users", "events", "triples", "links", "split")
NATIVE_EXTENSIONS: tuple[str, ...] = (".parquet", ".jsonl", ".ndjson", ".csv", ".tsv")
FILE_COL, LINE_COL = "__file", "__line"
SPLIT_NAMES: tuple[str, ...] = ("train", "valid", "test")


@dataclass
class RawTable:
    """Rows of one dataset table as read, before validation.

    ``table`` holds data-model columns (string or already typed, e.g. a Parquet timestamp) plus any extra columns,
    and ``__file`` / ``__line``. ``rejected`` are quarantine records (dicts with file, line, reason, message, raw) for
    rows that could not be parsed. ``required`` names the columns that must be non-empty in this format.
    """

    name: str
    table: pa.Table
    rejected: list[dict[str, Any]] = field(default_factory=list)
    required: tuple[str, ...] = ()
    blank_rows: int = 0

    @property
    def num_read(self) -> int:
        return self.table.num_rows + len(self.rejected)


@dataclass
class RawSource:
    """Everything a reader found in a source directory."""

    root: Path  # image paths resolve against it
    fmt: str
    tables: dict[str, RawTable]
    has_users_file: bool
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- detection


def detect_format(source: str | Path) -> str:
    """Guess the format of a source directory from the files it holds."""
    root = Path(source)
    if not root.is_dir():
        raise DataError(f"ingest source {root} is not a directory; point it at the folder that holds the data files")
    names = {p.name for p in root.iterdir()}
    if any(n.endswith(".inter") for n in names):
        return "recbole"
    if "kg_final.txt" in names or {"train.txt", "test.txt"} <= names:
        return "kgat"
    if {"articles.csv", "transactions_train.csv"} <= names:
        return "hm"
    if _native_file(root, "items") is not None:
        return "native"
    raise DataError(
        f"cannot tell the format of {root}: expected items.(csv|jsonl|parquet) (native), *.inter (RecBole), "
        f"train.txt/test.txt/kg_final.txt (KGAT) or articles.csv + transactions_train.csv (H&M); found "
        f"{sorted(names)[:10]}. Name the format: --format on the command line, fmt= in Python."
    )


def read_source(source: str | Path, fmt: str = "auto") -> RawSource:
    """Read every table of a source directory in the given (or detected) format."""
    root = Path(source)
    if fmt == "auto":
        fmt = detect_format(root)
    if not root.is_dir():
        raise DataError(f"ingest source {root} is not a directory")
    readers = {"native": read_native, "recbole": read_recbole, "kgat": read_kgat, "hm": read_hm}
    if fmt not in readers:
        raise DataError(f"unknown format {fmt!r}; one of auto, {', '.join(FORMATS)}")
    return readers[fmt](root)


# ----------------------------------------------------------------------------------------------- file readers


def _reject(file: str, line: int | None, reason: str, message: str, raw: Any) -> dict[str, Any]:
    return {"file": file, "line": line, "reason": reason, "message": message, "raw": raw}


def _with_origin(table: pa.Table, file: str, lines: np.ndarray) -> pa.Table:
    n = table.num_rows
    files = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array([file], pa.string()))
    return table.append_column(FILE_COL, files).append_column(LINE_COL, pa.array(np.asarray(lines, dtype=np.int64)))


def _decode_columns(table: pa.Table, file: str, lines: np.ndarray) -> tuple[pa.Table, np.ndarray, list[dict[str, Any]]]:
    """Binary/string columns -> valid UTF-8 strings; rows with invalid UTF-8 are returned as rejections."""
    bad = np.zeros(table.num_rows, dtype=bool)
    decoded: dict[str, pa.ChunkedArray] = {}
    for name in table.column_names:
        col = table.column(name)
        if not (pa.types.is_binary(col.type) or pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            continue
        try:
            if pa.types.is_binary(col.type):
                decoded[name] = col.cast(pa.string())
            else:
                col.validate(full=True)
        except pa.ArrowInvalid:
            values = col.cast(pa.binary()).to_pylist()
            for i, v in enumerate(values):
                if v is None:
                    continue
                try:
                    v.decode("utf-8")
                except UnicodeDecodeError:
                    bad[i] = True
            decoded[name] = pa.chunked_array([pa.array(
                [None if (v is None or bad[i]) else v.decode("utf-8") for i, v in enumerate(values)], pa.string())])
    rejected: list[dict[str, Any]] = []
    if bad.any():
        idx = np.flatnonzero(bad)
        raw_rows = table.take(pa.array(idx)).to_pylist()
        for i, row in zip(idx, raw_rows):
            raw = {k: (v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else v) for k, v in row.items()}
            cols = [k for k, v in row.items() if isinstance(v, bytes) and _not_utf8(v)]
            rejected.append(_reject(file, int(lines[i]), "invalid_utf8",
                                    f"{file} line {int(lines[i])}: column(s) {', '.join(cols)} are not valid UTF-8 "
                                    f"(re-save the file as UTF-8)", raw))
    for name, col in decoded.items():
        table = table.set_column(table.column_names.index(name), name, col)
    if bad.any():
        keep = pa.array(~bad)
        table = table.filter(keep)
        lines = lines[~bad]
    return table, lines, rejected


def _not_utf8(v: bytes) -> bool:
    try:
        v.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def _column_names(path: Path, raw: list[str]) -> list[str]:
    """Stripped, lower-cased column names; a clear error when two of them become one."""
    names = [n.strip().lower() for n in raw]
    if len(set(names)) != len(names):
        dups = sorted({c for c, n in zip(raw, names) if names.count(n) > 1})
        raise DataError(f"{path}: columns {dups} are the same name in lower case (duplicate column names); "
                        "rename one")
    return names


def read_delimited(path: Path, *, delimiter: str = ",", quoting: bool = True, column_names: list[str] | None = None,
                   header_suffix_sep: str | None = None) -> RawTable:
    """CSV/TSV -> string columns with exact physical line numbers (quoted newlines counted).

    Rows with the wrong number of columns and rows with invalid UTF-8 are rejected; fully blank rows are skipped
    and counted in ``blank_rows``. Column names are stripped and lower-cased; with ``header_suffix_sep=":"`` a
    RecBole type suffix (``item_id:token``) is removed.
    """
    path = Path(path)
    file = path.name
    invalid: list[tuple[int | None, str, int, int]] = []

    def on_invalid(row: Any) -> str:
        invalid.append((row.number, row.text, row.expected_columns, row.actual_columns))
        return "skip"

    try:
        with open(path, "rb") as fh:
            header_line = fh.readline().decode("utf-8-sig", "replace").rstrip("\r\n")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if column_names is None:
        import csv

        names = next(csv.reader([header_line], delimiter=delimiter,
                                quoting=csv.QUOTE_MINIMAL if quoting else csv.QUOTE_NONE), [])
    else:
        names = list(column_names)
    if header_suffix_sep:
        names = [n.split(header_suffix_sep, 1)[0] for n in names]
    names = _column_names(path, names)
    if not _is_utf8(path):  # Arrow's invalid-row handler cannot report rows that are not UTF-8
        return _read_delimited_python(path, names, delimiter=delimiter, quoting=quoting,
                                      has_header=column_names is None)
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(use_threads=False, column_names=names,
                                           skip_rows=0 if column_names is not None else 1, block_size=1 << 24),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if quoting else False,
                                             newlines_in_values=quoting, ignore_empty_lines=False,
                                             invalid_row_handler=on_invalid),
            # the file was checked to be valid UTF-8 above, so Arrow can build strings directly
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                 strings_can_be_null=False, quoted_strings_can_be_null=False),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        # Arrow stops on rows it cannot hand to the invalid-row handler (e.g. a malformed row that is also
        # invalid UTF-8); the slower pure-Python reader handles every row individually.
        logger.info("%s: Arrow CSV reader failed (%s); using the row-by-row reader", path, exc)
        return _read_delimited_python(path, names, delimiter=delimiter, quoting=quoting,
                                      has_header=column_names is None)
    header_records = 0 if column_names is not None else 1
    n_records = table.num_rows + len(invalid) + header_records
    # record number (1-based, header included) of each parsed row
    bad_numbers = np.array([r[0] for r in invalid if r[0] is not None], dtype=np.int64)
    all_records = np.arange(header_records + 1, n_records + 1, dtype=np.int64)
    good_records = all_records[~np.isin(all_records, bad_numbers)] if len(bad_numbers) else all_records
    if len(good_records) != table.num_rows:  # record numbers unknown: fall back to row order
        good_records = np.arange(header_records + 1, header_records + 1 + table.num_rows, dtype=np.int64)
    # physical line = record number + newlines inside quoted values of the records before it
    newlines = np.zeros(n_records + 1, dtype=np.int64)
    if quoting and table.num_rows:
        per_row = np.zeros(table.num_rows, dtype=np.int64)
        for name in names:
            per_row += pc.count_substring(table.column(name), "\n").to_numpy(zero_copy_only=False).astype(np.int64)
        newlines[good_records] = per_row
        for number, text, _, _ in invalid:
            if number is not None:
                newlines[number] = text.count("\n")
    before = np.concatenate([[0], np.cumsum(newlines)[:-1]])
    lines = good_records + before[good_records]
    rejected = []
    for number, text, expected, actual in invalid:
        line = int(number + before[number]) if number is not None else None
        rejected.append(_reject(file, line, "malformed_row",
                                f"{file} line {line}: expected {expected} columns, found {actual}", {"text": text}))
    # fully blank rows are not records
    blank = np.ones(table.num_rows, dtype=bool)
    for name in names:
        blank &= (pc.binary_length(table.column(name)).to_numpy(zero_copy_only=False) == 0)
    n_blank = int(blank.sum())
    if n_blank:
        table = table.filter(pa.array(~blank))
        lines = lines[~blank]
    table, lines, bad_utf8 = _decode_columns(table, file, lines)
    return RawTable("", _with_origin(table, file, lines), rejected + bad_utf8, blank_rows=n_blank)


def _is_utf8(path: Path) -> bool:
    import codecs

    dec = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                dec.decode(chunk)
        dec.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _read_delimited_python(path: Path, names: list[str], *, delimiter: str, quoting: bool,
                           has_header: bool) -> RawTable:
    """Row-by-row CSV reader (``csv`` module): exact line numbers, every bad row rejected individually."""
    import csv

    file = path.name
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]
    import io

    # only \n, \r and \r\n end a line (str.splitlines would also split on \x0b, \x85, ...)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter,
                        quoting=csv.QUOTE_MINIMAL if quoting else csv.QUOTE_NONE, strict=False)
    cols: list[list[str]] = [[] for _ in names]
    lines: list[int] = []
    rejected: list[dict[str, Any]] = []
    blank = 0
    start = 1
    for k, row in enumerate(reader):
        line = start
        start = reader.line_num + 1
        if k == 0 and has_header:
            continue
        if not row or all(v == "" for v in row):
            blank += 1
            continue
        joined = delimiter.join(row)
        shown = joined.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        if any("\udc80" <= ch <= "\udcff" for ch in joined):
            rejected.append(_reject(file, line, "invalid_utf8",
                                    f"{file} line {line}: not valid UTF-8 (re-save the file as UTF-8)", {"text": shown}))
            continue
        if len(row) != len(names):
            rejected.append(_reject(file, line, "malformed_row",
                                    f"{file} line {line}: expected {len(names)} columns, found {len(row)}",
                                    {"text": shown}))
            continue
        for c, v in zip(cols, row):
            c.append(v)
        lines.append(line)
    table = pa.table({n: pa.array(c, pa.string()) for n, c in zip(names, cols)})
    return RawTable("", _with_origin(table, file, np.array(lines, dtype=np.int64)), rejected, blank_rows=blank)


def _json_cell(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if isinstance(v, float) and not v.is_integer() else (str(int(v)) if isinstance(v, float) else str(v))
    return json.dumps(v, ensure_ascii=False, sort_keys=True)


def read_jsonl(path: Path) -> RawTable:
    """JSON Lines -> string columns (nested objects kept as JSON text); one row per non-blank line."""
    path = Path(path)
    file = path.name
    objs: list[dict[str, Any]] = []
    lines: list[int] = []
    rejected: list[dict[str, Any]] = []
    blank = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                blank += 1
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                rejected.append(_reject(file, lineno, "invalid_utf8",
                                        f"{file} line {lineno}: not valid UTF-8 (re-save the file as UTF-8)",
                                        {"text": raw.decode("utf-8", "backslashreplace")}))
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                rejected.append(_reject(file, lineno, "malformed_row", f"{file} line {lineno}: invalid JSON ({exc.msg})",
                                        {"text": text}))
                continue
            if not isinstance(obj, dict):
                rejected.append(_reject(file, lineno, "malformed_row",
                                        f"{file} line {lineno}: expected a JSON object, got {type(obj).__name__}",
                                        {"text": text}))
                continue
            objs.append(obj)
            lines.append(lineno)
    # columns: the union of keys in order of first appearance; keys equal after strip/lower-case share a column
    # ("Title" in one row, "title" in another); a row holding values under two such keys is rejected
    raw_keys = list(dict.fromkeys(k for o in objs for k in o))
    by_name: dict[str, list[str]] = {}
    for k in raw_keys:
        by_name.setdefault(str(k).strip().lower(), []).append(k)
    shared = [keys for keys in by_name.values() if len(keys) > 1]
    if shared:
        keep = []
        for j, o in enumerate(objs):
            clash = next((ks for ks in ([k for k in keys if o.get(k) is not None] for keys in shared) if len(ks) > 1),
                         None)
            if clash is None:
                keep.append(j)
            else:
                rejected.append(_reject(file, lines[j], "malformed_row",
                                        f"{file} line {lines[j]}: keys {clash} are the same column in lower case",
                                        {"text": json.dumps(o, ensure_ascii=False)}))
        objs, lines = [objs[j] for j in keep], [lines[j] for j in keep]
    columns: dict[str, list[str | None]] = {}
    for name, keys in by_name.items():
        if len(keys) == 1:
            k = keys[0]
            values = [o.get(k) for o in objs]
        else:
            values = [next((o[k] for k in keys if o.get(k) is not None), None) for o in objs]
        columns[name] = [v if v.__class__ is str else _json_cell(v) for v in values]
    table = pa.table({k: pa.array(v, pa.string()) for k, v in columns.items()} if columns
                     else {"__empty": pa.array([], pa.string())})
    if not columns:  # every line was rejected: an empty table without data columns
        table = table.drop_columns(["__empty"])
    return RawTable("", _with_origin(table, file, np.array(lines, dtype=np.int64)), rejected, blank_rows=blank)


def normalise_parquet_columns(table: pa.Table) -> pa.Table:
    """Lower-case, stripped column names; dictionary columns decoded, large strings as strings, map/struct columns
    as sorted-key JSON strings (the form the CSV/JSONL readers give), so every reader hands validation one shape."""
    table = table.rename_columns([c.strip().lower() for c in table.column_names])
    for i, f in enumerate(table.schema):
        if pa.types.is_dictionary(f.type):
            table = table.set_column(i, f.name, table.column(i).cast(f.type.value_type))
        elif pa.types.is_large_string(f.type):
            table = table.set_column(i, f.name, table.column(i).cast(pa.string()))
        elif pa.types.is_map(f.type) or pa.types.is_struct(f.type):
            table = table.set_column(i, f.name, pa.array(
                [None if v is None else json.dumps(dict(v), ensure_ascii=False, sort_keys=True, default=str)
                 for v in table.column(i).to_pylist()], pa.string()))
    return table


def read_parquet(path: Path) -> RawTable:
    """Parquet -> columns as stored (typed), line = 1-based row number; invalid UTF-8 strings rejected."""
    path = Path(path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"cannot read {path} as Parquet: {exc}") from exc
    _column_names(path, table.column_names)
    table = normalise_parquet_columns(table)
    lines = np.arange(1, table.num_rows + 1, dtype=np.int64)
    table, lines, bad = _decode_columns(table, path.name, lines)
    return RawTable("", _with_origin(table, path.name, lines), bad)


def read_table_file(path: str | Path) -> RawTable:
    """Read one native table file by its extension."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext == ".parquet":
        return read_parquet(path)
    if ext in (".jsonl", ".ndjson"):
        return read_jsonl(path)
    if ext == ".csv":
        return read_delimited(path, delimiter=",")
    if ext == ".tsv":
        return read_delimited(path, delimiter="\t")
    raise DataError(f"{path}: unsupported file type {ext!r}; use one of {', '.join(NATIVE_EXTENSIONS)}")


def _native_file(root: Path, name: str) -> Path | None:
    found = [root / f"{name}{ext}" for ext in NATIVE_EXTENSIONS if (root / f"{name}{ext}").is_file()]
    if len(found) > 1:
        raise DataError(f"{root} holds {len(found)} files for table {name!r} ({', '.join(p.name for p in found)}); "
                        f"keep one")
    return found[0] if found else None


# ----------------------------------------------------------------------------------------------- table helpers


def _rename(raw: RawTable, mapping: dict[str, str]) -> RawTable:
    t = raw.table
    names = [mapping.get(c, c) for c in t.column_names]
    raw.table = t.rename_columns(names)
    return raw


def _set(table: pa.Table, name: str, values: pa.Array | pa.ChunkedArray) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


def _reject_rows(raw: RawTable, table: pa.Table, messages: dict[int, str]) -> pa.Table:
    """``table`` without the rows in ``messages`` (row -> message), which join ``raw.rejected`` as ``bad_type``:
    their attributes name one attribute twice with different values (the JSON column against an ``attr_``
    column, or two spellings of one name) — the reason the validator gives such a clash inside the JSON."""
    if not messages:
        return table
    files, lines = table.column(FILE_COL).to_pylist(), table.column(LINE_COL).to_pylist()
    for r, msg in sorted(messages.items()):
        raw.rejected.append(_reject(files[r], lines[r], "bad_type", f"{files[r]} line {lines[r]}: {msg}",
                                    {k: v for k, v in table.slice(r, 1).to_pylist()[0].items()
                                     if k not in (FILE_COL, LINE_COL)}))
    keep = np.ones(table.num_rows, dtype=bool)
    keep[list(messages)] = False
    return table.filter(pa.array(keep))


def _merge_attrs(row: tuple[Any, ...], names: list[str]) -> tuple[str | None, str | None]:
    """(JSON text, conflict message or None) of one row: its ``attributes`` JSON (``row[0]``) plus the columns."""
    merged: dict[str, Any] = {}
    b = row[0]
    if b not in (None, ""):
        try:
            obj = json.loads(b)
        except json.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):  # malformed: passed through for validation to quarantine
            return b, None
        merged.update(obj)
    lower = {str(k).strip().lower(): k for k in merged}
    conflict = None
    for name, v in zip(names, row[1:]):
        if v is None or v.strip() == "":
            continue
        other = lower.get(name.strip().lower())
        if other is not None:
            if conflict is None and str(merged[other]).strip() != v.strip():
                conflict = (f"attribute {name!r} is {v!r} in its column but {merged[other]!r} in the attributes "
                            "JSON; keep one")
            merged.pop(other)
        merged[name] = v
    return (json.dumps(merged, ensure_ascii=False, sort_keys=True) if merged else None), conflict


def _attrs_from_columns(table: pa.Table, columns: list[str], prefix: str = "",
                        conflicts: dict[int, str] | None = None) -> pa.Array:
    """JSON object text per row from the given columns (names without ``prefix``); merges an ``attributes`` column.

    Empty cells are left out. A malformed ``attributes`` JSON is passed through unchanged (validation quarantines it).
    A row whose ``attributes`` JSON names the same attribute as a column (same name in lower case) with another
    value is recorded in ``conflicts`` (row -> message) for the caller to reject.
    """
    base = table.column("attributes").to_pylist() if "attributes" in table.column_names else [None] * table.num_rows
    if not columns:
        return pa.array(base, pa.string())
    vals = [table.column(c).cast(pa.string()).to_pylist() for c in columns]
    names = [c[len(prefix):] for c in columns]
    out: list[str | None] = []
    # attribute columns are usually low-cardinality combinations: row values -> (JSON text, conflict or None)
    cache: dict[tuple[Any, ...], tuple[str | None, str | None]] = {}
    for row in zip(base, *vals):
        hit = cache.get(row)
        if hit is None:
            hit = _merge_attrs(row, names)
            if len(cache) < 1_000_000:
                cache[row] = hit
        if hit[1] is not None and conflicts is not None:
            conflicts[len(out)] = hit[1]
        out.append(hit[0])
    return pa.array(out, pa.string())


ITEM_COLUMNS = ("item_id", "title", "description", "brand", "category", "attributes", "price", "image")
EVENT_COLUMNS = ("user_id", "item_id", "type", "timestamp", "value", "query")


def read_native(root: Path) -> RawSource:
    """The native layout: one file per table, columns named as in the data model."""
    tables: dict[str, RawTable] = {}
    notes: list[str] = []
    for name in TABLE_NAMES:
        path = _native_file(root, name)
        if path is None:
            continue
        raw = read_table_file(path)
        raw.name = name
        t = raw.table
        if name == "items":
            attr_cols = [c for c in t.column_names if c.startswith("attr_")]
            if attr_cols:
                conflicts: dict[int, str] = {}
                t = _set(t, "attributes", _attrs_from_columns(t, attr_cols, prefix="attr_", conflicts=conflicts))
                t = _reject_rows(raw, t, conflicts).drop_columns(attr_cols)
            extra = [c for c in t.column_names if c not in ITEM_COLUMNS and c not in (FILE_COL, LINE_COL)]
            if extra:
                notes.append(f"{path.name}: ignored columns {extra} (name item attributes attr_<name>)")
                t = t.drop_columns(extra)
            raw.required = ("item_id", "title")
        elif name == "users":
            extra = [c for c in t.column_names if c not in ("user_id", "attributes", FILE_COL, LINE_COL)]
            conflicts = {}
            t = _set(t, "attributes", _attrs_from_columns(t, extra, conflicts=conflicts))
            t = _reject_rows(raw, t, conflicts).drop_columns(extra)
            raw.required = ("user_id",)
        elif name == "events":
            raw.required = ("user_id", "item_id", "type") + (("timestamp",) if "timestamp" in t.column_names else ())
            if "timestamp" not in t.column_names:
                notes.append(f"{path.name}: no timestamp column: every event's timestamp is empty (a per-user "
                             "time split and the time features have nothing to go by)")
        elif name == "triples":
            raw.required = ("head", "relation", "tail")
        elif name == "links":
            raw.required = ("item_id", "entity_id")
        elif name == "split":
            raw.required = ("user_id", "item_id", "split")
        raw.table = t
        tables[name] = raw
    if "items" not in tables:
        raise DataError(f"{root}: no items file (items.csv, items.jsonl or items.parquet); the catalog is required")
    return RawSource(root, "native", tables, has_users_file="users" in tables, notes=notes)


# ----------------------------------------------------------------------------------------------- RecBole


def _first(names: Iterable[str], candidates: tuple[str, ...]) -> str | None:
    names = list(names)
    return next((c for c in candidates if c in names), None)


def _recbole_file(path: Path) -> RawTable:
    return read_delimited(path, delimiter="\t", quoting=False, header_suffix_sep=":")


def read_recbole(root: Path) -> RawSource:
    """RecBole atomic files. The dataset name is the stem shared by the ``.inter`` file(s)."""
    inters = sorted(p for p in root.glob("*.inter"))
    split_inters = {s: p for p in inters for s in SPLIT_NAMES if p.name.endswith(f".{s}.inter")}
    main = [p for p in inters if p not in split_inters.values()]
    if len(main) > 1:
        raise DataError(f"{root} holds several .inter files {[p.name for p in main]}; keep one dataset per folder")
    stem = main[0].name[: -len(".inter")] if main else next(iter(split_inters.values())).name.rsplit(".", 2)[0]
    notes: list[str] = []
    tables: dict[str, RawTable] = {}

    def events_from(raw: RawTable) -> RawTable:
        t = raw.table
        mapping = {"rating": "value"}
        t = t.rename_columns([mapping.get(c, c) for c in t.column_names])
        has_rating = "value" in t.column_names
        t = _set(t, "type", pa.array(["rating" if has_rating else "purchase"] * t.num_rows, pa.string()))
        extra = [c for c in t.column_names if c not in EVENT_COLUMNS and c not in (FILE_COL, LINE_COL)]
        if extra:
            notes.append(f"{raw.table.column(FILE_COL)[0] if raw.table.num_rows else stem}: ignored columns {extra}")
            t = t.drop_columns(extra)
        raw.table = t
        raw.name = "events"
        raw.required = ("user_id", "item_id", "type") + (("timestamp",) if "timestamp" in t.column_names else ())
        return raw

    # the user's split: <stem>.{train,valid,test}.inter or {train,valid,test}.{tsv,csv}
    split_files: dict[str, Path] = {}
    for s in SPLIT_NAMES:  # train, valid, test order
        if s in split_inters:
            split_files[s] = split_inters[s]
        for ext in (".tsv", ".csv"):
            if s not in split_files and (root / f"{s}{ext}").is_file():
                split_files[s] = root / f"{s}{ext}"
    split_raws: list[RawTable] = []
    for s, p in split_files.items():
        if p.suffix == ".inter":
            raw = _recbole_file(p)
        else:
            raw = read_delimited(p, delimiter="\t" if p.suffix == ".tsv" else ",", header_suffix_sep=":")
        raw.table = _set(raw.table, "split", pa.array([s] * raw.table.num_rows, pa.string()))
        split_raws.append(raw)
    if main:
        tables["events"] = events_from(_recbole_file(main[0]))
    elif split_raws:  # no full interaction file: the split files are the events
        tables["events"] = events_from(_concat_raw([RawTable("events", r.table.drop_columns(["split"]), list(r.rejected))
                                                    for r in split_raws]))
    if split_raws:
        sp = _concat_raw(split_raws)
        keep = ["user_id", "item_id", "split", FILE_COL, LINE_COL]
        missing = [c for c in ("user_id", "item_id") if c not in sp.table.column_names]
        if missing:
            raise DataError(f"{root}: split files lack column(s) {missing}")
        sp.table = sp.table.select(keep)
        sp.name, sp.required = "split", ("user_id", "item_id", "split")
        if not main:  # the split files are also the events: their unparseable lines are counted once, as events
            sp.rejected = []
        tables["split"] = sp

    item_path = root / f"{stem}.item"
    if item_path.is_file():
        raw = _recbole_file(item_path)
        t = raw.table
        cols = t.column_names
        title = _first(cols, ("title", "movie_title", "name", "item_name", "product_name", "prod_name"))
        desc = _first(cols, ("description", "desc", "overview", "plot"))
        brand = _first(cols, ("brand", "brand_name", "manufacturer"))
        cat = _first(cols, ("category", "categories", "class", "genre", "genres"))
        price = _first(cols, ("price",))
        image = _first(cols, ("image", "image_path"))
        mapped = {c for c in (title, desc, brand, price, image) if c}
        if "item_id" not in cols:
            raise DataError(f"{item_path}: no item_id column (header {cols})")
        out = pa.table({"item_id": t.column("item_id")})
        out = out.append_column("title", t.column(title) if title else pa.array([""] * t.num_rows, pa.string()))
        for dst, srcname in (("description", desc), ("brand", brand), ("price", price), ("image", image)):
            if srcname:
                out = out.append_column(dst, t.column(srcname))
        if cat:  # token_seq categories: the first token is the category, the whole value stays an attribute
            out = out.append_column("category", pc.utf8_trim_whitespace(pc.list_element(
                pc.split_pattern(pc.utf8_trim_whitespace(t.column(cat)), " ", max_splits=1), 0)))
        attr_cols = [c for c in cols if c not in mapped and c not in ("item_id", FILE_COL, LINE_COL)]
        out = out.append_column("attributes", _attrs_from_columns(t, attr_cols))
        out = out.append_column(FILE_COL, t.column(FILE_COL)).append_column(LINE_COL, t.column(LINE_COL))
        raw.table, raw.name, raw.required = out, "items", ("item_id",)
        tables["items"] = raw
    user_path = root / f"{stem}.user"
    if user_path.is_file():
        raw = _recbole_file(user_path)
        t = raw.table
        extra = [c for c in t.column_names if c not in ("user_id", FILE_COL, LINE_COL)]
        raw.table = _set(t, "attributes", _attrs_from_columns(t, extra)).drop_columns(extra)
        raw.name, raw.required = "users", ("user_id",)
        tables["users"] = raw
    kg_path = root / f"{stem}.kg"
    if kg_path.is_file():
        raw = _rename(_recbole_file(kg_path), {"head_id": "head", "relation_id": "relation", "tail_id": "tail"})
        raw.name, raw.required = "triples", ("head", "relation", "tail")
        tables["triples"] = raw
    link_path = root / f"{stem}.link"
    if link_path.is_file():
        raw = _recbole_file(link_path)
        raw.name, raw.required = "links", ("item_id", "entity_id")
        tables["links"] = raw
    if "items" not in tables:  # no .item file: the catalog is the set of items interacted with
        tables["items"] = _implicit_items([tables[n] for n in ("events",) if n in tables])
        notes.append(f"{root}: no {stem}.item file; items created from the interaction file (no titles)")
    return RawSource(root, "recbole", tables, has_users_file="users" in tables, notes=notes)


def _concat_raw(raws: list[RawTable]) -> RawTable:
    tables = [r.table for r in raws]
    t = pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
    return RawTable(raws[0].name if raws else "", t, [x for r in raws for x in r.rejected],
                    raws[0].required if raws else (), sum(r.blank_rows for r in raws))


def _implicit_items(raws: list[RawTable]) -> RawTable:
    """Items known only by id (formats without a catalog file): one row per distinct id, first occurrence kept."""
    parts = [r.table.select(["item_id", FILE_COL, LINE_COL]) for r in raws if "item_id" in r.table.column_names]
    if not parts:
        return RawTable("items", pa.table({"item_id": pa.array([], pa.string()), "title": pa.array([], pa.string()),
                                           FILE_COL: pa.array([], pa.string()), LINE_COL: pa.array([], pa.int64())}),
                        required=("item_id",))
    t = pa.concat_tables([p.cast(pa.schema([("item_id", pa.string()), (FILE_COL, pa.string()), (LINE_COL, pa.int64())]))
                          for p in parts])
    t = t.filter(pc.invert(pc.is_null(t.column("item_id"))))
    idx = t.append_column("__i", pa.array(np.arange(t.num_rows))).group_by("item_id", use_threads=False).aggregate(
        [("__i", "min")]).column("__i_min").to_numpy()
    t = t.take(pa.array(np.sort(idx)))
    t = t.append_column("title", pa.array([""] * t.num_rows, pa.string()))
    return RawTable("items", t.select(["item_id", "title", FILE_COL, LINE_COL]), required=("item_id",))


# ----------------------------------------------------------------------------------------------- KGAT / KGIN


def _read_adjacency(path: Path, split: str | None) -> RawTable:
    """``user item item ...`` lines -> one (user_id, item_id) row per item, line numbers kept. Blank lines and lines
    naming a user with no items (no interaction to keep) are counted in ``blank_rows``."""
    users, items, lines = [], [], []
    rejected: list[dict[str, Any]] = []
    blank = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                rejected.append(_reject(path.name, lineno, "invalid_utf8", f"{path.name} line {lineno}: not valid UTF-8",
                                        {"text": raw.decode("utf-8", "backslashreplace")}))
                continue
            parts = text.split()
            if len(parts) < 2:
                blank += 1
                continue
            for it in parts[1:]:
                users.append(parts[0])
                items.append(it)
                lines.append(lineno)
    t = pa.table({"user_id": pa.array(users, pa.string()), "item_id": pa.array(items, pa.string())})
    if split:
        t = t.append_column("split", pa.array([split] * t.num_rows, pa.string()))
    return RawTable("", _with_origin(t, path.name, np.array(lines, dtype=np.int64)), rejected, blank_rows=blank)


def _read_id_list(path: Path) -> dict[str, str]:
    """KGAT ``*_list.txt``: ``org_id remap_id`` -> {remap_id: org_id}."""
    out: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        next(fh, None)
        for line in fh:
            parts = line.split()
            if len(parts) >= 2:
                out[parts[-1]] = " ".join(parts[:-1])
    return out


def read_kgat(root: Path) -> RawSource:
    tables: dict[str, RawTable] = {}
    notes = ["KGAT interactions have no timestamps: events are 'purchase' with an empty timestamp"]
    parts = []
    for s, fname in (("train", "train.txt"), ("valid", "valid.txt"), ("test", "test.txt")):
        if (root / fname).is_file():
            parts.append(_read_adjacency(root / fname, s))
    if not parts:
        raise DataError(f"{root}: KGAT layout needs train.txt (and test.txt)")
    split = _concat_raw(parts)
    split.name, split.required = "split", ("user_id", "item_id", "split")
    ev = RawTable("events", split.table.drop_columns(["split"]).append_column(
        "type", pa.array(["purchase"] * split.table.num_rows, pa.string())), [], ("user_id", "item_id", "type"))
    # parse failures and blank lines are counted once, on the events table
    ev.rejected, split.rejected = split.rejected, []
    ev.blank_rows, split.blank_rows = split.blank_rows, 0
    tables["events"], tables["split"] = ev, split
    if (root / "item_list.txt").is_file():
        remap = _read_id_list(root / "item_list.txt")
        ids = list(remap)
        tables["items"] = RawTable("items", _with_origin(
            pa.table({"item_id": pa.array(ids, pa.string()), "title": pa.array([""] * len(ids), pa.string()),
                      "attributes": pa.array([json.dumps({"org_id": remap[i]}) for i in ids], pa.string())}),
            "item_list.txt", np.arange(2, len(ids) + 2, dtype=np.int64)), required=("item_id",))
    else:
        tables["items"] = _implicit_items([ev])
    if (root / "kg_final.txt").is_file():
        kg = read_delimited(root / "kg_final.txt", delimiter=" ", quoting=False, column_names=["head", "relation", "tail"])
        if (root / "relation_list.txt").is_file():
            rel = _read_id_list(root / "relation_list.txt")
            names = kg.table.column("relation").to_pylist()
            kg.table = _set(kg.table, "relation", pa.array([rel.get(r, r) if r is not None else None for r in names],
                                                            pa.string()))
        kg.name, kg.required = "triples", ("head", "relation", "tail")
        tables["triples"] = kg
        it = tables["items"].table
        tables["links"] = RawTable("links", pa.table({"item_id": it.column("item_id"), "entity_id": it.column("item_id"),
                                                      FILE_COL: it.column(FILE_COL), LINE_COL: it.column(LINE_COL)}),
                                   required=("item_id", "entity_id"))
        notes.append("KGAT: item i is linked to entity i (items are the first entities of kg_final.txt)")
    return RawSource(root, "kgat", tables, has_users_file=False, notes=notes)


# ----------------------------------------------------------------------------------------------- H&M


HM_ATTRIBUTES = {
    "colour_group_name": "colour",
    "graphical_appearance_name": "pattern",
    "perceived_colour_value_name": "colour_value",
    "perceived_colour_master_name": "colour_family",
    "department_name": "department",
    "section_name": "section",
    "garment_group_name": "garment_group",
    "index_name": "index",
}


def _hm_article_id(col: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    return pc.utf8_lpad(pc.utf8_trim_whitespace(col.cast(pa.string())), width=10, padding="0")


def read_hm(root: Path) -> RawSource:
    notes: list[str] = []
    tables: dict[str, RawTable] = {}
    art = read_delimited(root / "articles.csv")
    t = art.table
    if "article_id" not in t.column_names:
        raise DataError(f"{root / 'articles.csv'}: no article_id column")
    ids = _hm_article_id(t.column("article_id"))
    out = pa.table({"item_id": ids})
    out = out.append_column("title", t.column("prod_name") if "prod_name" in t.column_names
                            else pa.array([""] * t.num_rows, pa.string()))
    if "detail_desc" in t.column_names:
        out = out.append_column("description", t.column("detail_desc"))
    if {"product_group_name", "product_type_name"} <= set(t.column_names):
        out = out.append_column("category", pc.binary_join_element_wise(
            pc.utf8_trim_whitespace(t.column("product_group_name")),
            pc.utf8_trim_whitespace(t.column("product_type_name")), ">"))
    attr_cols = [c for c in HM_ATTRIBUTES if c in t.column_names]
    renamed = t.select(attr_cols).rename_columns([HM_ATTRIBUTES[c] for c in attr_cols])
    out = out.append_column("attributes", _attrs_from_columns(renamed, list(renamed.column_names)))
    # images/0xx/<article_id>.jpg where 0xx = first three digits; absent images are normal in this dataset
    id_list = ids.to_pylist()
    imgs = [f"images/{i[:3]}/{i}.jpg" if i and (root / "images" / i[:3] / f"{i}.jpg").is_file() else None for i in id_list]
    out = out.append_column("image", pa.array(imgs, pa.string()))
    tx = read_delimited(root / "transactions_train.csv")
    tt = tx.table
    need = {"t_dat", "customer_id", "article_id"}
    if not need <= set(tt.column_names):
        raise DataError(f"{root / 'transactions_train.csv'}: needs columns {sorted(need)}, found {tt.column_names}")
    tx_ids = _hm_article_id(tt.column("article_id"))
    if "price" in tt.column_names:
        price = pc.cast(pc.if_else(pc.equal(tt.column("price"), ""), None, tt.column("price")), pa.float64(), safe=False) \
            if _all_numeric(tt.column("price")) else None
        if price is not None:
            means = pa.table({"item_id": tx_ids, "p": price}).group_by("item_id").aggregate([("p", "mean")])
            lookup = dict(zip(means.column("item_id").to_pylist(), means.column("p_mean").to_pylist()))
            out = out.append_column("price", pa.array([lookup.get(i) for i in id_list], pa.float64()))
    out = out.append_column(FILE_COL, t.column(FILE_COL)).append_column(LINE_COL, t.column(LINE_COL))
    art.table, art.name, art.required = out, "items", ("item_id",)
    tables["items"] = art
    ev = pa.table({"user_id": tt.column("customer_id"), "item_id": tx_ids,
                   "type": pa.array(["purchase"] * tt.num_rows, pa.string()), "timestamp": tt.column("t_dat"),
                   FILE_COL: tt.column(FILE_COL), LINE_COL: tt.column(LINE_COL)})
    tx.table, tx.name, tx.required = ev, "events", ("user_id", "item_id", "type", "timestamp")
    tables["events"] = tx
    if (root / "customers.csv").is_file():
        cu = read_delimited(root / "customers.csv")
        c = cu.table
        if "customer_id" not in c.column_names:
            raise DataError(f"{root / 'customers.csv'}: no customer_id column")
        extra = [x for x in c.column_names if x not in ("customer_id", FILE_COL, LINE_COL)]
        cu.table = pa.table({"user_id": c.column("customer_id"), "attributes": _attrs_from_columns(c, extra),
                             FILE_COL: c.column(FILE_COL), LINE_COL: c.column(LINE_COL)})
        cu.name, cu.required = "users", ("user_id",)
        tables["users"] = cu
    return RawSource(root, "hm", tables, has_users_file="users" in tables, notes=notes)


def _all_numeric(col: pa.ChunkedArray) -> bool:
    try:
        pc.cast(pc.if_else(pc.equal(col, ""), None, col), pa.float64())
        return True
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False
