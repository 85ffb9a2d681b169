"""Initial bulk load of a knowledge graph into a local Neo4j with the offline importer (``neo4j-admin database import
full``), orders of magnitude faster than batched ``UNWIND ... MERGE`` for millions of relationships.

The importer writes the store files directly, so it runs BEFORE the server starts, on a home whose ``neo4j``
database does not exist yet (or with ``overwrite=True``). The graph it writes is the one every ``GraphStore`` builds
(``kg.loading.build_graph_rows``): node key property ``id`` (string) per label, relationship properties as in
``kg.schema``; the server is then started and the ``id`` uniqueness constraints added (by ``Neo4jStore``'s constructor,
as for a MERGE-loaded graph), so ``Neo4jStore`` reads it like a MERGE-loaded graph.

CSV layout (one header file + one data file per label / type, RFC-4180 quoting)::

    nodes/Item.header.csv      id:ID(Item),title,price:double,...
    rels/VIEWED.header.csv     :START_ID(User),:END_ID(Item),count:long,first_ts,last_ts,value:double

ID spaces are per label, so ``Item "X"`` and ``Entity "X"`` are different nodes, as in the stores.
"""
from __future__ import annotations

import csv
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import pandas as pd

from kg.loading import build_graph_rows, edge_key
from kg.schema import EDGE_TYPES, check_label, check_rel_type
from kgrec.errors import GraphStoreError

if TYPE_CHECKING:  # pragma: no cover
    from kg.loading import GraphRows
    from kg.neo4j_server import Neo4jServer
    from kgrec.data.schema import Dataset

logger = logging.getLogger(__name__)

# Properties that are whole numbers even when a missing value made their column float (interaction counts, weights).
LONG_PROPERTIES = frozenset({"count", "weight"})

Frame = pd.DataFrame | list[dict[str, Any]] | str | Path


def _as_frame(data: Frame) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, (str, Path)):
        return pd.read_parquet(data)
    return pd.DataFrame.from_records(list(data))


def _typed(df: pd.DataFrame, col: str) -> tuple[pd.Series, str]:
    """The column converted for the CSV and its header suffix (``:long`` / ``:double`` / ``:boolean`` / "" = string),
    inferred from the values as Neo4j would type the Python values the MERGE path sends."""
    s = df[col]
    if pd.api.types.is_bool_dtype(s):
        return s.map(lambda v: None if pd.isna(v) else ("true" if v else "false")), ":boolean"
    if pd.api.types.is_integer_dtype(s) or (pd.api.types.is_float_dtype(s) and col in LONG_PROPERTIES):
        return s.astype("Int64"), ":long"
    if pd.api.types.is_float_dtype(s):
        return s, ":double"
    present = s.dropna()
    if len(present) and present.map(lambda v: isinstance(v, bool)).all():
        return s.map(lambda v: None if v is None or v != v else ("true" if v else "false")), ":boolean"
    if len(present) and present.map(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)).all():
        return pd.to_numeric(s), ":double"
    return s.map(lambda v: None if v is None or (isinstance(v, float) and v != v) else str(v)), ""


def _has_newline(columns: list[pd.Series]) -> bool:
    return any(c.dtype == object and c.str.contains("[\r\n]", regex=True, na=False).any() for c in columns)


def _write_csv(header: list[str], columns: list[pd.Series], header_path: Path, data_path: Path) -> tuple[int, bool]:
    """Header in its own file (one line), rows in the data file; missing values are empty unquoted fields (no
    property). Returns the row count and whether a value spans lines."""
    with open(header_path, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh, quoting=csv.QUOTE_MINIMAL, lineterminator="\n").writerow(header)
    out = pd.concat(columns, axis=1, keys=range(len(columns))) if columns else pd.DataFrame()
    # float_format keeps doubles exact (repr round-trip); QUOTE_MINIMAL doubles embedded quotes ("" escape).
    out.to_csv(data_path, header=False, index=False, quoting=csv.QUOTE_MINIMAL, lineterminator="\n",
               float_format="%.17g", na_rep="")
    return len(out), _has_newline(columns)


def write_import_csv(nodes: Mapping[str, Frame], relationships: Mapping[str, Frame], out_dir: str | Path,
                     ) -> tuple[list[str], dict[str, int]]:
    """Write the importer's header + data CSV files under ``out_dir``.

    Args:
        nodes: label -> rows with an ``id`` column plus properties (DataFrame, list of dicts or a Parquet path).
        relationships: type -> rows with ``src`` / ``dst`` columns plus properties; duplicates of a relationship
            identity (``kg.loading.edge_key``) keep the last row, as repeated MERGEs would.
    Returns:
        (importer arguments ``--nodes=...`` / ``--relationships=...``, rows written per label / type).
    """
    out = Path(out_dir)
    (out / "nodes").mkdir(parents=True, exist_ok=True)
    (out / "rels").mkdir(parents=True, exist_ok=True)
    args: list[str] = []
    written: dict[str, int] = {}
    multiline = False
    for label, data in nodes.items():
        check_label(label)
        df = _as_frame(data)
        if len(df) == 0:
            continue
        if "id" not in df.columns:
            raise GraphStoreError(f"node rows for {label} have no 'id' column (columns: {list(df.columns)})")
        df = df.assign(id=df["id"].astype(str)).drop_duplicates("id", keep="last")
        h, d = out / "nodes" / f"{label}.header.csv", out / "nodes" / f"{label}.csv"
        written[label], nl = _write_typed_csv(df, [f"id:ID({label})"], ["id"], h, d)
        multiline = multiline or nl
        args.append(f"--nodes={label}={h},{d}")
    for rel, data in relationships.items():
        et = EDGE_TYPES[check_rel_type(rel)]
        df = _as_frame(data)
        if len(df) == 0:
            continue
        missing = {"src", "dst"} - set(df.columns)
        if missing:
            raise GraphStoreError(f"relationship rows for {rel} lack column(s) {sorted(missing)}")
        if rel == "ENTITY_RELATION" and ("relation" not in df.columns or df["relation"].isna().any()):
            raise GraphStoreError("ENTITY_RELATION rows need a 'relation' value")
        df = df.assign(src=df["src"].astype(str), dst=df["dst"].astype(str))
        key = ["src", "dst", "relation"] if rel == "ENTITY_RELATION" else ["src", "dst"]
        df = df.drop_duplicates(key, keep="last")
        h, d = out / "rels" / f"{rel}.header.csv", out / "rels" / f"{rel}.csv"
        written[rel], nl = _write_typed_csv(df, [f":START_ID({et.src})", f":END_ID({et.dst})"], ["src", "dst"], h, d)
        multiline = multiline or nl
        args.append(f"--relationships={rel}={h},{d}")
    if multiline:  # quoted values with line breaks: the importer must not split input at newlines
        args.append("--multiline-fields=true")
    return args, written


def _write_typed_csv(df: pd.DataFrame, id_header: list[str], id_cols: list[str], header_path: Path,
                     data_path: Path) -> tuple[int, bool]:
    """Write ``df`` as an importer header + data file: the id columns first (``id_header`` names them, e.g.
    ``id:ID(Item)`` or ``:START_ID(User)``/``:END_ID(Item)``), then every other column as a typed property.
    Returns (rows written, whether a value contains a line break)."""
    header, cols = list(id_header), [df[c] for c in id_cols]
    for col in df.columns:
        if col in id_cols:
            continue
        s, suffix = _typed(df, col)
        header.append(f"{col}{suffix}")
        cols.append(s)
    return _write_csv(header, cols, header_path, data_path)


def graph_rows_frames(rows: GraphRows) -> tuple[dict[str, pd.DataFrame], dict[str, pd.DataFrame]]:
    """``GraphRows`` (lists of dicts) -> per-label / per-type DataFrames for ``bulk_import``."""
    nodes = {label: pd.DataFrame.from_records(r) for label, r in rows.iter_nodes()}
    rels = {}
    for rel, r in rows.iter_edges():
        # The stores identify relationships by edge_key; keep the last row of each identity.
        last = {edge_key(rel, row): row for row in r}
        rels[rel] = pd.DataFrame.from_records(list(last.values()))
    return nodes, rels


def bulk_import(
    server: Neo4jServer,
    nodes: Mapping[str, Frame],
    relationships: Mapping[str, Frame],
    *,
    work_dir: str | Path | None = None,
    overwrite: bool = False,
    heap: str = "1g",
    max_off_heap: str = "2g",
    threads: int | None = None,
    start: bool = True,
    timeout_s: float = 6 * 3600,
) -> dict[str, Any]:
    """Write CSVs, run ``neo4j-admin database import full`` on ``server``'s home, then start the server.

    Args:
        server: a ``kg.neo4j_server.Neo4jServer`` that is not running (its home may be fresh).
        nodes / relationships: see ``write_import_csv``.
        work_dir: where the CSVs go (default ``<home>/import/bulk``); removed after a successful import.
        overwrite: replace an existing ``neo4j`` database (``--overwrite-destination``); else it is an error.
        heap: importer JVM ``-Xmx``. max_off_heap: importer ``--max-off-heap-memory`` (its caches; default "2g").
            threads: importer ``--threads`` (default: all cores).
        start: start the server after the import (``server.start()``, which sets the password on a fresh home).
    Returns:
        ``{"written": {label/type: rows}, "csv_s", "import_s", "start_s", "store_bytes"}`` (seconds, bytes).
    Raises:
        GraphStoreError: the server is running, the database exists, or the importer failed (its output tail).
    """
    from kg.neo4j_server import fetch, free_port

    if server.is_running():
        raise GraphStoreError(
            f"Neo4j at {server.home} is running; the offline importer needs it stopped (server.stop() first)"
        )
    db_dir = server.home / "data" / "databases" / "neo4j"
    if db_dir.exists() and not overwrite:
        raise GraphStoreError(
            f"a 'neo4j' database already exists in {server.home / 'data'}; bulk import only creates new databases "
            "(replace it with overwrite=True — `kgrec neo4j import --overwrite` — or load incrementally with "
            "Neo4jStore.load — `kgrec kg load --backend neo4j`)"
        )
    fetch(server.version)
    if server.port is None:
        server.port = free_port()
    server._write_conf()  # the importer reads the data/log directories from the server's neo4j.conf
    work = Path(work_dir) if work_dir is not None else server.home / "import" / "bulk"
    t0 = time.perf_counter()
    args, written = write_import_csv(nodes, relationships, work)
    csv_s = time.perf_counter() - t0
    report = server.home / "logs" / "import.report"
    cmd = [
        *server._java_base(), f"-Xmx{heap}", "org.neo4j.cli.AdminTool",
        "database", "import", "full",
        *args,
        "--id-type=string", "--skip-bad-relationships=false", "--skip-duplicate-nodes=false",
        f"--report-file={report}", f"--max-off-heap-memory={max_off_heap}", "--verbose",
        *([f"--threads={threads}"] if threads else []),
        *(["--overwrite-destination=true"] if overwrite else []),
        "neo4j",
    ]
    env = {**os.environ, "NEO4J_HOME": str(server.home), "NEO4J_CONF": str(server.home / "conf")}
    logger.info("bulk importing %s into %s", written, server.home)
    t1 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s, cwd=server.home)
    except subprocess.TimeoutExpired as exc:
        raise GraphStoreError(f"neo4j-admin import into {server.home} took over {timeout_s:.0f}s") from exc
    import_s = time.perf_counter() - t1
    if proc.returncode != 0:
        # A failed import leaves unusable store files: remove them so the next attempt starts clean.
        for d in (db_dir, server.home / "data" / "transactions" / "neo4j"):
            shutil.rmtree(d, ignore_errors=True)
        lines = (proc.stdout + proc.stderr).splitlines()
        tail = "\n".join(ln for ln in lines if not ln.lstrip().startswith(("at ", "... ")))[-3000:]
        bad = report.read_text(errors="replace")[-1500:] if report.is_file() else ""
        raise GraphStoreError(
            f"neo4j-admin database import into {server.home} failed (exit {proc.returncode}); CSVs kept in {work}"
            f":\n{tail}" + (f"\n--- {report}\n{bad}" if bad else "")
        )
    logger.info("import done in %.1fs", import_s)
    if work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    store_bytes = sum(f.stat().st_size for f in db_dir.rglob("*") if f.is_file()) if db_dir.exists() else 0
    start_s = 0.0
    if start:
        t2 = time.perf_counter()
        server.start()
        from kg.neo4j_store import Neo4jStore

        # the importer writes no schema: the id uniqueness constraints the MERGE-loaded graph has are added now,
        # not at the first connection; if that fails, the server is stopped (no JVM left that nothing tracks)
        try:
            Neo4jStore(server.uri, server.user, server.password, progress=False).close()
        except BaseException:
            server.stop()
            raise
        start_s = time.perf_counter() - t2
    return {"written": written, "csv_s": csv_s, "import_s": import_s, "start_s": start_s,
            "store_bytes": store_bytes, "importer_output": proc.stdout[-2000:]}


def bulk_import_dataset(server: Neo4jServer, dataset: Dataset, *, events: pd.DataFrame | None = None,
                        also_bought_min_count: int = 2, **kwargs: Any) -> dict[str, Any]:
    """Bulk-import the graph of ``dataset`` (the same rows ``Neo4jStore.load`` would MERGE)."""
    rows = build_graph_rows(dataset, events=events, also_bought_min_count=also_bought_min_count)
    nodes, rels = graph_rows_frames(rows)
    return bulk_import(server, nodes, rels, **kwargs)


def dataset_frames(dataset: Dataset, *, events: pd.DataFrame | None = None, also_bought_min_count: int = 2,
                   ) -> tuple[dict[str, pd.DataFrame], dict[str, pd.DataFrame]]:
    """The rows of ``kg.loading.build_graph_rows`` built with column operations (no per-row dicts), for graphs of
    millions of relationships: same nodes, relationships and properties (checked equal in the tests)."""
    import numpy as np
    import scipy.sparse as sp

    from kg.loading import (CATEGORY_SEP, DATA_SOURCE, attribute_value_id, category_prefixes, format_ts)
    from kg.schema import INTERACTION_RELS

    items = dataset.table("items").select(["item_id", "title", "price", "image", "brand", "category"]).to_pandas()
    users = dataset.table("users").select(["user_id"]).to_pandas()
    ev = dataset.events if events is None else events
    triples, links = dataset.triples, dataset.links
    nodes: dict[str, pd.DataFrame] = {}
    rels: dict[str, pd.DataFrame] = {}

    def uniq(*cols: pd.Series) -> pd.Series:
        s = pd.concat([c.dropna().astype(str) for c in cols], ignore_index=True)
        return pd.Series(np.sort(s.unique().astype(object)), dtype=object)

    nodes["User"] = pd.DataFrame({"id": uniq(users["user_id"], ev["user_id"])})
    iid = items["item_id"].astype(str)
    brand = items["brand"].where(items["brand"].map(lambda b: isinstance(b, str) and bool(b.strip())))
    paths = {p: category_prefixes(p) for p in pd.unique(items["category"].dropna()) if isinstance(p, str)}
    leaf = items["category"].map(lambda p: paths[p][-1] if isinstance(p, str) and paths[p] else None)
    item_df = pd.DataFrame({"id": iid, "title": items["title"], "price": items["price"], "image": items["image"],
                            "brand": brand, "category": leaf})
    extra = uniq(ev["item_id"], links["item_id"])
    extra = extra[~extra.isin(set(iid))]
    nodes["Item"] = pd.concat([item_df, pd.DataFrame({"id": extra})], ignore_index=True).sort_values(
        "id", kind="stable", ignore_index=True)
    nodes["Brand"] = pd.DataFrame({"id": uniq(brand)}).assign(name=lambda d: d["id"])
    cats = sorted({c for pre in paths.values() for c in pre})
    nodes["Category"] = pd.DataFrame({"id": cats, "name": [c.rsplit(CATEGORY_SEP, 1)[-1] for c in cats]})
    ok = brand.notna()
    rels["MADE_BY"] = pd.DataFrame({"src": iid[ok], "dst": brand[ok]})
    ok = leaf.notna()
    rels["IN_CATEGORY"] = pd.DataFrame({"src": iid[ok], "dst": leaf[ok]})
    sub = [c for c in cats if CATEGORY_SEP in c]
    rels["SUBCATEGORY_OF"] = pd.DataFrame({"src": sub, "dst": [c.rsplit(CATEGORY_SEP, 1)[0] for c in sub]})

    attrs = dataset.item_attributes()
    names, values = attrs["name"].astype(str), attrs["value"].astype(str)
    av = pd.Series([attribute_value_id(n, v) for n, v in zip(names, values)], dtype=object)
    nodes["AttributeValue"] = (pd.DataFrame({"id": av, "name": names, "value": values})
                               .drop_duplicates("id", keep="last").sort_values("id", ignore_index=True))
    rels["HAS_ATTRIBUTE"] = pd.DataFrame({"src": attrs["item_id"].astype(str), "dst": av, "source": DATA_SOURCE})

    nodes["Entity"] = pd.DataFrame({"id": uniq(triples["head"], triples["tail"], links["entity_id"])})
    rels["ENTITY_RELATION"] = pd.DataFrame({"src": triples["head"].astype(str), "dst": triples["tail"].astype(str),
                                            "relation": triples["relation"].astype(str)})
    rels["LINKED_TO"] = pd.DataFrame({"src": links["item_id"].astype(str), "dst": links["entity_id"].astype(str)})

    if len(ev):
        e = ev[["user_id", "item_id", "type", "timestamp", "value"]]
        e = e[e["type"].isin(list(INTERACTION_RELS))].assign(
            user_id=lambda d: d["user_id"].astype(str), item_id=lambda d: d["item_id"].astype(str),
            timestamp=lambda d: pd.to_datetime(d["timestamp"], utc=True))
        keys = ["user_id", "item_id", "type"]
        e = e.sort_values([*keys, "timestamp"], kind="stable")
        g = e.groupby(keys, sort=True, observed=True)
        agg = g["timestamp"].agg(["size", "min", "max"]).rename(columns={"size": "count"}).reset_index()
        last = e.dropna(subset=["value"]).groupby(keys, sort=True, observed=True)["value"].last()
        agg = agg.merge(last.rename("value").reset_index(), on=keys, how="left")
        for etype, part in agg.groupby("type", sort=True, observed=True):
            rels[INTERACTION_RELS[str(etype)]] = pd.DataFrame({
                "src": part["user_id"].to_numpy(), "dst": part["item_id"].to_numpy(),
                "count": part["count"].to_numpy(np.int64), "first_ts": format_ts(part["min"]).to_numpy(),
                "last_ts": format_ts(part["max"]).to_numpy(), "value": part["value"].to_numpy(float)})
        buys = e.loc[e["type"] == "purchase", ["user_id", "item_id"]].drop_duplicates()
        if len(buys):
            bu, bi = np.sort(buys["user_id"].unique()), np.sort(buys["item_id"].unique())
            x = sp.csr_matrix((np.ones(len(buys), np.int32), (np.searchsorted(bu, buys["user_id"].to_numpy()),
                                                              np.searchsorted(bi, buys["item_id"].to_numpy()))),
                              shape=(len(bu), len(bi)))
            co = sp.triu(x.T @ x, k=1).tocoo()
            keep = co.data >= max(1, also_bought_min_count)
            r, c, w = co.row[keep], co.col[keep], co.data[keep]
            order = np.lexsort((c, r))
            rels["ALSO_BOUGHT"] = pd.DataFrame({"src": bi[r[order]], "dst": bi[c[order]],
                                                "weight": w[order].astype(np.int64)})
    return ({k: v for k, v in nodes.items() if len(v)}, {k: v for k, v in rels.items() if len(v)})
