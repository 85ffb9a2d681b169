"""Core records and the on-disk ``Dataset`` (a directory of Parquet files plus ``manifest.json``).

Ids are strings at the edges. Item attributes are stored in Parquet as a JSON object text column
(``attributes``), decoded by :meth:`Dataset.item_attributes` into a long (item_id, name, value) table.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kgrec.errors import DataError, DatasetNotFoundError

SCHEMA_VERSION = 1

# Ordered by strength of intent; the ranking stage maps these to graded labels.
EVENT_TYPES: tuple[str, ...] = ("view", "click", "cart", "purchase", "rating")
SPLITS: tuple[str, ...] = ("train", "valid", "test")


@dataclass(frozen=True)
class Item:
    item_id: str
    title: str
    description: str = ""
    brand: str | None = None
    category: str | None = None  # path, ">"-separated: "Shoes>Running"
    attributes: dict[str, str] = field(default_factory=dict)
    price: float | None = None
    image: str | None = None  # relative to the dataset root

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class User:
    user_id: str
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Event:
    user_id: str
    item_id: str
    type: str  # one of EVENT_TYPES
    timestamp: datetime  # UTC
    value: float | None = None
    query: str | None = None


@dataclass(frozen=True)
class Triple:
    head: str
    relation: str
    tail: str


@dataclass(frozen=True)
class ItemLink:
    item_id: str
    entity_id: str


# Arrow schemas of the dataset files. Readers and validation produce exactly these columns.
ITEMS_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("title", pa.string()),
        ("description", pa.string()),
        ("brand", pa.string()),
        ("category", pa.string()),
        ("attributes", pa.string()),  # JSON object text {name: value}
        ("price", pa.float64()),
        ("image", pa.string()),
    ]
)
USERS_SCHEMA = pa.schema([("user_id", pa.string()), ("attributes", pa.string())])
EVENTS_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("type", pa.string()),
        ("timestamp", pa.timestamp("us", tz="UTC")),
        ("value", pa.float64()),
        ("query", pa.string()),
    ]
)
TRIPLES_SCHEMA = pa.schema([("head", pa.string()), ("relation", pa.string()), ("tail", pa.string())])
LINKS_SCHEMA = pa.schema([("item_id", pa.string()), ("entity_id", pa.string())])
SPLIT_SCHEMA = pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("split", pa.string())])

TABLE_SCHEMAS: dict[str, pa.Schema] = {
    "items": ITEMS_SCHEMA,
    "users": USERS_SCHEMA,
    "events": EVENTS_SCHEMA,
    "triples": TRIPLES_SCHEMA,
    "links": LINKS_SCHEMA,
    "split": SPLIT_SCHEMA,
}
REQUIRED_TABLES = ("items", "users", "events", "triples", "links")


def empty_table(name: str) -> pa.Table:
    return TABLE_SCHEMAS[name].empty_table()


def table_fingerprint(table: pa.Table) -> str:
    """sha256 over the table's Arrow IPC serialisation in fixed slices of 65,536 rows: equal content and schema
    give equal fingerprints, however the table happens to be chunked."""
    h = hashlib.sha256()
    sink = pa.BufferOutputStream()
    step = 1 << 16
    with pa.ipc.new_stream(sink, table.schema) as writer:
        for start in range(0, table.num_rows, step):
            part = table.slice(start, step)
            # take() copies into fresh buffers at offset 0: the bytes no longer depend on the chunk layout
            for batch in part.take(pa.array(range(part.num_rows), pa.int64())).combine_chunks().to_batches():
                writer.write_batch(batch)
    h.update(sink.getvalue().to_pybytes())
    return h.hexdigest()


def file_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    """The process umask, read without changing it where the OS says it (Linux), else by setting it back."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file via a temporary sibling and ``os.replace``: readers see the old or the new file, never half.
    The file gets the mode ``open()`` would give it (mkstemp's is owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def replace_directory(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written ``tmp_dir`` into ``final_dir``; an existing ``final_dir`` stays usable until the swap.
    ``tmp_dir`` (from mkdtemp: owner-only) gets the mode ``mkdir`` would give it, so other accounts (a service, a
    web server) read the result as they would any directory."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    os.chmod(tmp_dir, 0o777 & ~_umask())
    if final_dir.exists():
        # a fresh empty name each time (rename replaces an empty directory): a leftover from an interrupted swap
        # can never block later saves
        old = Path(tempfile.mkdtemp(dir=final_dir.parent, prefix=f".{final_dir.name}.old-"))
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_dir, final_dir)


@contextlib.contextmanager
def atomic_directory(final_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``final_dir`` to write into; on success it replaces ``final_dir``
    (``replace_directory``), on any error it is removed and ``final_dir`` is untouched."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", dir=final_dir.parent))
    try:
        yield tmp
        replace_directory(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _link_copy(src: Path, dst: Path) -> None:
    """``src`` (a file or a directory tree) at ``dst`` as hard links, copying where linking is not possible."""

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    elif src.is_symlink():
        os.symlink(os.readlink(src), dst)
    else:
        link(str(src), str(dst))


class Dataset:
    """A validated dataset directory: ``items/users/events/triples/links[/split].parquet``, ``images/``,
    ``manifest.json`` and ``quarantine/``.

    Tables are read lazily and cached. ``Dataset.write`` creates one atomically from Arrow tables.
    """

    def __init__(self, root: str | Path, manifest: dict[str, Any]):
        self.root = Path(root)
        self.manifest = manifest
        self._cache: dict[str, pa.Table] = {}

    # ---------------------------------------------------------------- opening / writing
    @classmethod
    def open(cls, root: str | Path) -> Dataset:
        root = Path(root)
        mf = root / "manifest.json"
        if not mf.is_file():
            raise DatasetNotFoundError(
                f"{root} is not a kgrec dataset (no manifest.json); create one with `kgrec ingest SRC --out DIR` "
                "or `kgrec demo-data OUT --ingest-to DIR`"
            )
        try:
            manifest = json.loads(mf.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{mf} is not valid JSON ({exc}); the dataset is damaged, re-run `kgrec ingest`") from exc
        if not isinstance(manifest, dict):
            raise DataError(f"{mf} holds a JSON {type(manifest).__name__}, not an object; the dataset is damaged, "
                            "re-run `kgrec ingest`")
        if "schema_version" not in manifest and "format_version" in manifest and "components" in manifest:
            # the manifest of a bundle (kgrec.bundle.write_bundle): a common mix-up, e.g. `kgrec evaluate demo/bundle`
            raise DataError(f"{root} is a model bundle, not a dataset: give a dataset directory (from `kgrec ingest`) "
                            "here; commands that read a bundle take it as --bundle/-b (`kgrec update` as its first "
                            "argument, Python: Recommender.load)")
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise DataError(f"{root}: dataset schema version {version} is not supported (expected {SCHEMA_VERSION})")
        return cls(root, manifest)

    @classmethod
    def write(
        cls,
        root: str | Path,
        tables: dict[str, pa.Table],
        *,
        source: dict[str, Any] | None = None,
        images_from: str | Path | None = None,
        extra_manifest: dict[str, Any] | None = None,
    ) -> Dataset:
        """Write tables (cast to the dataset schemas; missing optional tables become empty) atomically.

        ``images_from`` is a directory whose ``images/`` (or itself) is linked/copied into the dataset root.
        Files already under ``root`` that are not tables (quarantine/, truth/) are preserved.
        """
        root = Path(root)
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.tmp-"))
        try:
            counts: dict[str, int] = {}
            fingerprints: dict[str, str] = {}
            for name, schema in TABLE_SCHEMAS.items():
                if name not in tables:
                    if name == "split":
                        continue
                    table = schema.empty_table()
                else:
                    table = conform(tables[name], name)
                pq.write_table(table, tmp / f"{name}.parquet", compression="zstd")
                counts[name] = table.num_rows
                fingerprints[name] = table_fingerprint(table)
            if root.exists():
                # hard links (a copy across file systems): the live dataset keeps every file until the swap, and a
                # failed write leaves it as it was
                for child in root.iterdir():
                    if child.name.endswith(".parquet") or child.name == "manifest.json":
                        continue
                    _link_copy(child, tmp / child.name)
            if images_from is not None:
                src = Path(images_from)
                src_images = src / "images" if (src / "images").is_dir() else src
                if src_images.is_dir() and not (tmp / "images").exists():
                    shutil.copytree(src_images, tmp / "images")
            manifest = {
                "schema_version": SCHEMA_VERSION,
                "created": datetime.now(timezone.utc).isoformat(),
                "counts": counts,
                "fingerprints": fingerprints,
                "source": source or {},
            }
            manifest.update(extra_manifest or {})
            atomic_write_json(tmp / "manifest.json", manifest)
            replace_directory(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(root, manifest)

    # ---------------------------------------------------------------- tables
    def table(self, name: str) -> pa.Table:
        if name not in TABLE_SCHEMAS:
            raise KeyError(f"unknown dataset table {name!r}; one of {sorted(TABLE_SCHEMAS)}")
        if name not in self._cache:
            path = self.root / f"{name}.parquet"
            self._cache[name] = pq.read_table(path) if path.is_file() else empty_table(name)
        return self._cache[name]

    @property
    def items(self) -> pd.DataFrame:
        return self.table("items").to_pandas()

    @property
    def users(self) -> pd.DataFrame:
        return self.table("users").to_pandas()

    @property
    def events(self) -> pd.DataFrame:
        return self.table("events").to_pandas()

    @property
    def triples(self) -> pd.DataFrame:
        return self.table("triples").to_pandas()

    @property
    def links(self) -> pd.DataFrame:
        return self.table("links").to_pandas()

    @property
    def split(self) -> pd.DataFrame | None:
        path = self.root / "split.parquet"
        return pq.read_table(path).to_pandas() if path.is_file() else None

    @property
    def has_split(self) -> bool:
        return (self.root / "split.parquet").is_file()

    @property
    def fingerprint(self) -> str:
        """One hash of all table fingerprints: identifies the data a model was trained on."""
        fps = self.manifest.get("fingerprints", {})
        return hashlib.sha256(json.dumps(fps, sort_keys=True).encode()).hexdigest()

    def item_attributes(self) -> pd.DataFrame:
        """Long table (item_id, name, value) decoded from the items' ``attributes`` JSON column."""
        items = self.table("items").select(["item_id", "attributes"]).to_pylist()
        rows = [
            (r["item_id"], k, v)
            for r in items
            if r["attributes"]
            for k, v in json.loads(r["attributes"]).items()
        ]
        return pd.DataFrame(rows, columns=["item_id", "name", "value"])

    def image_path(self, image: str | None) -> Path | None:
        return None if not image else self.root / image

    def iter_items(self) -> Iterable[Item]:
        for r in self.table("items").to_pylist():
            yield Item(
                item_id=r["item_id"],
                title=r["title"] or "",
                description=r["description"] or "",
                brand=r["brand"],
                category=r["category"],
                attributes=json.loads(r["attributes"]) if r["attributes"] else {},
                price=r["price"],
                image=r["image"],
            )

    def __repr__(self) -> str:
        c = self.manifest.get("counts", {})
        return f"Dataset({str(self.root)!r}, items={c.get('items')}, users={c.get('users')}, events={c.get('events')})"


def conform(table: pa.Table | pd.DataFrame, name: str) -> pa.Table:
    """Select and cast columns to the named dataset schema; missing nullable columns are filled with nulls."""
    schema = TABLE_SCHEMAS[name]
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    cols = []
    for f in schema:
        if f.name in table.column_names:
            col = table.column(f.name)
            if f.name == "attributes" and not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
                col = pa.array(
                    [None if v is None else json.dumps(dict(v), sort_keys=True, ensure_ascii=False) for v in col.to_pylist()],
                    type=pa.string(),
                )
            cols.append(col.cast(f.type))
        else:
            cols.append(pa.nulls(table.num_rows, type=f.type))
    return pa.Table.from_arrays(cols, schema=schema)
