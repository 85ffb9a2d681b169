"""``kgrec enrich``: the offline catalog enrichment job (inferred attributes, duplicates, SIMILAR_TO, COMPLEMENTS)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer

from kgrec.commands._common import CONFIG_OPTION, clean_errors, load_config
from kgrec.errors import ConfigError

logger = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    app.command("enrich")(enrich_command)


def _embeddings_for(dataset: Any, embeddings_dir: Path | None, bundle: Path | None, cfg: Any,
                    encoders: tuple[Any, Any] | None) -> Any:
    """Precomputed item embeddings (``--embeddings``, the bundle's, ``DATASET/embeddings``), else encode now."""
    from encoders.items import ItemEmbeddings
    from kgrec.errors import DataError

    candidates = [embeddings_dir] if embeddings_dir is not None else []
    if bundle is not None:
        candidates.append(bundle / "embeddings")
    candidates.append(Path(dataset.root) / "embeddings")
    for path in candidates:
        if (path / "items.json").is_file():
            typer.echo(f"item embeddings: {path}")
            return ItemEmbeddings.load(path)
        if path == embeddings_dir:
            raise DataError(f"--embeddings {path} holds no item embeddings (items.json); run `kgrec encode` first")
    if encoders is None:
        raise DataError(
            f"no item embeddings found ({', '.join(str(p) for p in candidates)}) and --no-encoders was given; "
            "run `kgrec encode DATASET` first"
        )
    from encoders.factory import default_cache_dir
    from encoders.items import encode_dataset

    typer.echo("no precomputed item embeddings: encoding the catalog (cached by content)")
    return encode_dataset(dataset, encoders[0], encoders[1], default_cache_dir(cfg.encoders, dataset.root))


def _open_store(cfg: Any, dataset: Any, graph: Path | None, bundle: Path | None) -> tuple[Any, Path | None]:
    """The graph store to write to, with the dataset loaded when it holds no items yet."""
    if cfg.kg.backend == "neo4j":
        from kg.neo4j_store import Neo4jStore

        store = Neo4jStore.from_config(cfg.kg)
        path = None
    else:
        from kg.embedded_store import EmbeddedStore

        path = graph or Path(dataset.root) / "graph"  # a bundle's own graph is written through the bundle
        store = EmbeddedStore.open(path, also_bought_min_count=cfg.kg.also_bought_min_count)
    if store.counts().get("Item", 0) == 0:
        typer.echo("the graph holds no items yet: loading the dataset into it first")
        store.load(dataset)
    return store, path


def _encoders_for(cfg: Any, bundle: Path | None) -> tuple[Any, Any]:
    """(text, CLIP) encoders for prompts and attribute-free texts: a bundle's own (its models and fit-clip
    checkpoint, as ``Recommender.enrich`` uses), else the configured ones. A bundle trained with encoders built in
    code names none: the configured ones are tried (they are used only if they made the embeddings)."""
    import json

    from encoders.factory import clip_encoder_from_config, text_encoder_from_config

    spec_path = None if bundle is None else Path(bundle) / "encoders" / "encoders.json"
    if spec_path is not None and spec_path.is_file():
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
        if not spec.get("custom"):
            from kgrec.pipeline import build_encoders, bundle_config

            # the bundle's own settings (max length, pretrained tag ... are part of the model ids), as load() uses
            if (Path(bundle) / "config.yaml").is_file():  # type: ignore[arg-type]
                cfg = bundle_config(bundle)  # type: ignore[arg-type]
            return build_encoders(cfg, None, spec=spec, bundle=Path(bundle).resolve())  # type: ignore[arg-type]
        typer.echo("the bundle's encoders were built in code: using the configured encoders")
    return text_encoder_from_config(cfg.encoders), clip_encoder_from_config(cfg.encoders)


@clean_errors
def enrich_command(
    dataset: Path = typer.Argument(..., help="Dataset directory (from `kgrec ingest` / `kgrec demo-data`)."),
    bundle: Path | None = typer.Option(None, "--bundle", "-b",
                                       help="A `kgrec train` bundle: its encoders, embeddings and graph (its directory, "
                                            "or the Neo4j server it names when NEO4J_URI is unset) are used."),
    embeddings: Path | None = typer.Option(
        None, "--embeddings",
        help="Item embeddings from `kgrec encode` (default: the bundle's, else DATASET/embeddings, else encode now)."),
    dry_run: bool = typer.Option(False, "--dry-run",
                                 help="Write nothing to the graph: a reviewable CSV + Parquet instead."),
    out: Path | None = typer.Option(None, "--out", "-o",
                                    help="Report, reliability plot (and dry-run files) (default: DATASET/enrichment)."),
    threshold: float | None = typer.Option(
        None, "--threshold", "-t", min=0.0, max=1.0,
        help="Calibrated confidence an inferred value needs (default: enrichment.threshold, 0.8)."),
    backend: str | None = typer.Option(None, "--backend", help="Graph store: embedded | neo4j (NEO4J_* env)."),
    graph: Path | None = typer.Option(
        None, "--graph", help="Embedded graph directory (default: the bundle's graph, else DATASET/graph)."),
    use_encoders: bool = typer.Option(True, "--encoders/--no-encoders",
                                      help="Load the configured encoders for CLIP zero-shot prompts and attribute-free "
                                           "text vectors (only used when they match the embeddings' models)."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Infer missing attribute values (calibrated; nothing below the threshold is written), find near-duplicate
    listings, derive SIMILAR_TO / COMPLEMENTS, and write them to the graph with provenance. Idempotent."""
    from kgrec.data.schema import Dataset
    from kgrec.enrichment import enrich

    cfg = load_config(config, **{"kg.backend": backend, "enrichment.threshold": threshold})
    ds = Dataset.open(dataset)
    graph_json = None if bundle is None else Path(bundle) / "graph" / "graph.json"
    if graph_json is not None and graph_json.is_file():
        import json

        from kgrec.pipeline import use_bundle_graph

        info = json.loads(graph_json.read_text(encoding="utf-8"))
        if backend is None and graph is None:  # write where the bundle's graph lives
            cfg.kg.backend = info.get("backend", cfg.kg.backend)
        if cfg.kg.backend == "neo4j" and not cfg.kg.uri:  # a server named in the user's own config wins
            use_bundle_graph(cfg.kg, info)
        if cfg.kg.backend == "embedded" and graph is None and info.get("backend") == "neo4j" and not dry_run:
            raise ConfigError(f"{bundle}'s graph lives in Neo4j ({info.get('uri')}): leave out --backend embedded "
                              "to write there, or name an embedded graph directory with --graph")
    encoders = _encoders_for(cfg, bundle) if use_encoders else None
    emb = _embeddings_for(ds, embeddings, bundle, cfg, encoders)
    text_enc = clip_enc = None
    if encoders is not None:
        # the prompts and the attribute-free texts must live in the same spaces as the embeddings
        text_model, clip_model = encoders  # None where the bundle / config names no such model
        if text_model is None:
            typer.echo("no text encoder: the classifier reads the stored text vectors")
        elif emb.model_ids.get("text") == text_model.model_id:
            text_enc = text_model
        else:
            typer.echo("text encoder differs from the one that made the embeddings: "
                       "the classifier reads the stored text vectors")
        if clip_model is None:
            typer.echo("no CLIP encoder: no zero-shot source")
        elif emb.model_ids.get("clip") == clip_model.model_id:
            clip_enc = clip_model
        else:
            typer.echo("CLIP encoder differs from the one that made the embeddings: no zero-shot source")
    rec = None
    if not dry_run and bundle is not None and graph is None and cfg.kg.backend == "embedded":
        # the bundle's own embedded graph is written through the bundle: its manifest hashes every file, so
        # rewriting graph/ in place would leave a bundle that no longer loads
        from kgrec.pipeline import Recommender

        rec = Recommender.load(bundle)
        store, store_path = rec.store, None
    else:
        store, store_path = (None, None) if dry_run else _open_store(cfg, ds, graph, bundle)
    out_dir = out or Path(ds.root) / "enrichment"
    try:
        report = enrich(ds, emb, store, clip_encoder=clip_enc, text_encoder=text_enc, dry_run=dry_run,
                        out_dir=out_dir, config=cfg.enrichment, also_bought_min_count=cfg.kg.also_bought_min_count,
                        progress=True)
        wrote = bool(report.written and report.written.get("written"))
        if store is not None and store_path is not None and wrote:
            store.save(store_path)
        if rec is not None and wrote:
            rec.hetero, rec.id_maps = rec.store.to_hetero_data()
            rec.save(bundle)  # atomic, with a new manifest
            typer.echo(f"bundle {bundle} saved with the enriched graph")
    finally:
        if store is not None and rec is None:
            store.close()
    typer.echo(report.to_text())
