"""``kgrec neo4j fetch|start|import|stop|status`` and ``kgrec kg load``."""
from __future__ import annotations

from pathlib import Path

import typer

from kgrec.commands._common import CONFIG_OPTION, clean_errors, load_config
from kgrec.errors import DataError

neo4j_app = typer.Typer(help="A local Neo4j 5 Community server (no Docker): fetch the jars, start, stop, status.",
                        no_args_is_help=True)
kg_app = typer.Typer(help="The knowledge graph: load a dataset into the configured store.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(neo4j_app, name="neo4j")
    app.add_typer(kg_app, name="kg")


@neo4j_app.command("fetch")
@clean_errors
def neo4j_fetch(
    force: bool = typer.Option(False, "--force", help="Download again even if the jars are cached."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Download the Neo4j jars with Maven into ${KGREC_CACHE_DIR:-~/.cache/kgrec}/neo4j (once)."""
    from kg.neo4j_server import NEO4J_VERSION, fetch

    load_config(config)
    lib = fetch(NEO4J_VERSION, force=force)
    typer.echo(f"Neo4j {NEO4J_VERSION}: {len(list(lib.glob('*.jar')))} jars in {lib}")


@neo4j_app.command("start")
@clean_errors
def neo4j_start(
    home: Path | None = typer.Option(None, "--home", help="Server home (data, logs). Default: <cache>/neo4j/home; "
                                                          "it is kept across stop/start."),
    port: int | None = typer.Option(None, "--port", help="Bolt port (default: a free one)."),
    heap: str = typer.Option("1g", "--heap", help="JVM maximum heap (-Xmx)."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Start a local server on 127.0.0.1 and print the NEO4J_* variables to export (password in a 0600 file)."""
    from kg.neo4j_server import (
        Neo4jServer, cache_dir, password_file, read_state, server_from_state, state_file, write_state,
    )

    load_config(config)
    state = read_state()
    if state is not None:
        running = server_from_state(state)
        if running.is_running():
            typer.echo(f"Neo4j is already running (pid {state['pid']}) at {state['uri']}")
            _print_exports(state["uri"], state["user"], state["password_file"])
            return
        state_file().unlink(missing_ok=True)  # stale (the server died); keep the password its home needs
    home = home or cache_dir() / "neo4j" / "home"
    password = None
    pw = password_file()
    if (home / "data" / "dbms").exists() and pw.is_file():  # reuse the password the home was initialised with
        password = pw.read_text().strip()
    server = Neo4jServer(home, port=port, password=password, heap=heap, remove_home=False)
    server.start()
    write_state(server)
    typer.echo(f"Neo4j started (pid {server.pid}) at {server.uri}; home {server.home}")
    _print_exports(server.uri, server.user, str(pw))


@neo4j_app.command("import")
@clean_errors
def neo4j_import(
    dataset: Path = typer.Argument(..., help="An ingested dataset directory (kgrec ingest)."),
    home: Path | None = typer.Option(None, "--home", help="Server home (default: <cache>/neo4j/home, as `start`)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing `neo4j` database in that home."),
    heap: str = typer.Option("1g", "--heap", help="Server JVM maximum heap (-Xmx)."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Bulk-load a dataset's graph with `neo4j-admin database import full` (fresh database; millions of
    relationships per minute), then start the server like `kgrec neo4j start`. Later changes go through `kg load`."""
    from kg.bulk_import import bulk_import, dataset_frames
    from kg.neo4j_server import Neo4jServer, cache_dir, password_file, read_state, server_from_state, write_state
    from kgrec.data.schema import Dataset
    from kgrec.errors import GraphStoreError

    load_config(config)
    state = read_state()
    if state is not None and server_from_state(state).is_running():
        raise GraphStoreError(f"a Neo4j server started by kgrec is running (pid {state['pid']}): the importer needs "
                              "it stopped — run `kgrec neo4j stop` first")
    home = home or cache_dir() / "neo4j" / "home"
    pw = password_file()
    password = pw.read_text().strip() if (home / "data" / "dbms").exists() and pw.is_file() else None
    server = Neo4jServer(home, password=password, heap=heap, remove_home=False)
    nodes, rels = dataset_frames(Dataset.open(dataset))
    report = bulk_import(server, nodes, rels, overwrite=overwrite)
    write_state(server)
    n_rel = sum(len(r) for r in rels.values())
    typer.echo(f"imported {sum(len(n) for n in nodes.values())} nodes and {n_rel} relationships; "
               f"Neo4j running (pid {server.pid}) at {server.uri}; home {server.home}")
    typer.echo(f"report: {report}")
    _print_exports(server.uri, server.user, str(pw))


def _print_exports(uri: str, user: str, password_file: str) -> None:
    typer.echo("export these to use it:")
    typer.echo(f"  export NEO4J_URI={uri}")
    typer.echo(f"  export NEO4J_USER={user}")
    typer.echo(f'  export NEO4J_PASSWORD="$(cat {password_file})"')
    typer.echo("  export NEO4J_DATABASE=neo4j")


@neo4j_app.command("stop")
@clean_errors
def neo4j_stop(
    purge: bool = typer.Option(False, "--purge", help="Also delete the server home (all graph data)."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Stop the server started by `kgrec neo4j start` (SIGTERM, then SIGKILL after 60 s)."""
    import shutil

    from kg.neo4j_server import clear_state, read_state, server_from_state

    load_config(config)
    state = read_state()
    if state is None:
        typer.echo("no Neo4j server was started by kgrec")
        return
    server = server_from_state(state)
    server.stop()
    if purge:
        shutil.rmtree(server.home, ignore_errors=True)
        clear_state()
    else:
        from kg.neo4j_server import state_file

        state_file().unlink(missing_ok=True)  # keep the password file: the kept home needs it next start
    typer.echo(f"Neo4j (pid {state['pid']}) stopped" + ("; home deleted" if purge else f"; data kept in {server.home}"))


@neo4j_app.command("status")
@clean_errors
def neo4j_status(config: Path | None = CONFIG_OPTION) -> None:
    """Say whether the kgrec-started server runs and answers on Bolt (exit 1 when not)."""
    from kg.neo4j_server import read_state, server_from_state

    load_config(config)
    state = read_state()
    if state is None:
        typer.echo("not running (no server started by `kgrec neo4j start`)")
        raise typer.Exit(1)
    server = server_from_state(state)
    if not server.is_running():
        typer.echo(f"not running (pid {state['pid']} is gone); logs in {server.home / 'logs'}")
        raise typer.Exit(1)
    from neo4j import GraphDatabase

    try:
        with GraphDatabase.driver(server.uri, auth=(server.user, server.password or "")) as driver:
            driver.verify_connectivity()
        answers = "answers on Bolt"
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        answers = f"does not answer yet ({type(exc).__name__})"
    typer.echo(f"running (pid {state['pid']}) at {server.uri}, {answers}; home {server.home}")


@kg_app.command("load")
@clean_errors
def kg_load(
    dataset: Path = typer.Argument(..., help="Dataset directory (from `kgrec ingest` / `kgrec demo-data`)."),
    backend: str | None = typer.Option(None, "--backend", help="embedded | neo4j (default: kg.backend)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Embedded store directory (default: <dataset>/graph)."),
    train_only: bool = typer.Option(False, "--train-only", help="Load only the train split's events (needs the "
                                    "dataset's split.parquet; load into an empty store: loading only adds)."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Load a dataset into the graph store (idempotent: loading again changes nothing) and print the counts."""
    from kg.factory import open_store
    from kg.loading import train_events
    from kgrec.data.schema import Dataset

    cfg = load_config(config, **{"kg.backend": backend})
    ds = Dataset.open(dataset)
    if train_only and not ds.has_split:
        raise DataError(f"{ds.root} has no split.parquet, so no train split to load: `kgrec train` splits such data "
                        "per user by time and keeps the held-out events out of its training graph by itself; load "
                        "without --train-only, or give the dataset a split.parquet (user_id, item_id, split)")
    store = open_store(cfg.kg, out or ds.root / "graph")
    try:
        store.load(ds, events=train_events(ds) if train_only else None)
        counts = store.counts()
    finally:
        store.close()
    where = getattr(store, "uri", None) or str(getattr(store, "path", ""))
    typer.echo(f"loaded {ds.root} into {cfg.kg.backend} graph {where}")
    for name, n in counts.items():
        if n:
            typer.echo(f"  {name:<16} {n:>12,}")
