"""``kgrec train | evaluate | recommend | similar | search | explain | demo``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from kgrec.commands._common import CONFIG_OPTION, clean_errors, load_config
from kgrec.errors import check_query_text
from kgrec.evaluation import ABLATIONS, BASELINES  # the module imports numpy only at the top

_EVAL_BASELINES, _EVAL_ABLATIONS = BASELINES, tuple(ABLATIONS)
CLIP_CHECKPOINT_OPTION = typer.Option(
    None, "--clip-checkpoint", help="A `kgrec encoders fit-clip` output to encode images with (overrides "
    "encoders.clip_checkpoint; `kgrec demo` writes one to OUT/clip).")
BUNDLE_OPTION = typer.Option(Path("bundle"), "--bundle", "-b", help="Bundle directory written by `kgrec train`.")


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("evaluate")(evaluate)
    app.command("recommend")(recommend)
    app.command("similar")(similar)
    app.command("search")(search)
    app.command("explain")(explain)
    app.command("update")(update)
    app.command("demo")(demo)


def metrics_table(metrics: dict[str, Any], split: str = "test") -> str:
    """Markdown table of the evaluation rows (RecBole definitions; train+valid masked at test)."""
    rows = metrics.get(split, {})
    cols = ["recall@10", "recall@20", "ndcg@10", "ndcg@20", "hit@20", "mrr@20", "item_coverage@20"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, vals in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{vals.get(c, float('nan')):.4f}" for c in cols) + " |")
    return "\n".join(lines)


def _print_results(results: list[Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in results], indent=2, default=float))
        return
    for r in results:
        typer.echo(f"{r.rank:>3}. {r.item_id:<12} {r.score:8.4f}  {r.title}")
        if r.explanation:
            typer.echo(f"      why: {r.explanation['sentence']}")


@clean_errors
def train(
    dataset: Path = typer.Argument(..., help="Dataset directory (from `kgrec ingest` or `kgrec demo-data --ingest-to`)."),
    out: Path = typer.Option(Path("bundle"), "--out", "-o", help="Bundle directory to write (replaced atomically)."),
    epochs: int | None = typer.Option(None, "--epochs", help="GNN epochs (overrides fusion.epochs)."),
    backend: str | None = typer.Option(None, "--backend", help="Graph store: embedded | neo4j (NEO4J_* env)."),
    clip_checkpoint: Path | None = CLIP_CHECKPOINT_OPTION,
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Train the whole recommender (graph, encoders, GNN + fusion, ranker), evaluate it, write a bundle."""
    from kgrec.pipeline import Recommender

    cfg = load_config(config, **{"fusion.epochs": epochs, "kg.backend": backend,
                                 "encoders.clip_checkpoint": str(clip_checkpoint.resolve()) if clip_checkpoint else None})
    rec = Recommender.fit(dataset, cfg)
    rec.save(out)
    typer.echo(metrics_table(rec.metrics))
    typer.echo(f"wrote bundle {out}")


@clean_errors
def evaluate(
    dataset: Path | None = typer.Argument(
        None, help="A dataset to evaluate baselines and ablations on (without it: print BUNDLE's stored metrics)."),
    bundle: Path = BUNDLE_OPTION,
    split: str = typer.Option("temporal", "--split", help="given | temporal | random | leave-one-out."),
    baselines: str = typer.Option(",".join(_EVAL_BASELINES), "--baselines",
                                  help="Comma-separated: popularity, itemknn, ease, bpr-mf, lightgcn ('' for none)."),
    ablations: str = typer.Option(",".join(_EVAL_ABLATIONS), "--ablations",
                                  help="Comma-separated: fused, no-kg, graph-only, text-only, image-only ('' for none)."),
    out: Path | None = typer.Option(None, "--out", "-o",
                                    help="Where results.md / .json / .png go (default: DATASET/evaluation-SPLIT)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    clip_checkpoint: Path | None = CLIP_CHECKPOINT_OPTION,
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Evaluate baselines and our model's ablations on DATASET under one split (full ranking, RecBole metrics; a
    Markdown + JSON table and a bar chart), or print the test metrics a bundle was evaluated with."""
    from kgrec.bundle import read_manifest

    if dataset is not None:
        from kgrec.evaluation import run_evaluation

        cfg = load_config(config, **{"encoders.clip_checkpoint": str(clip_checkpoint.resolve()) if clip_checkpoint else None})
        names = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
        res = run_evaluation(dataset, cfg, split=split, baselines=names(baselines), ablations=names(ablations),
                             out_dir=out or Path(dataset) / f"evaluation-{split}")
        typer.echo(json.dumps(res.to_dict(), indent=2) if as_json else res.to_markdown())
        typer.echo(f"wrote {', '.join(res.files.values())}")
        return
    info = read_manifest(bundle, verify=False)
    metrics = _read_stored_metrics(info.path / "evaluation.json")
    typer.echo(json.dumps(metrics, indent=2) if as_json else metrics_table(metrics))


def _read_stored_metrics(path: Path) -> dict[str, Any]:
    """The metrics a bundle was evaluated with (evaluation.json), or a BundleError naming the file when it is
    missing or damaged (``evaluate`` reads the manifest without verifying hashes, so damage shows up here)."""
    from kgrec.errors import BundleError

    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BundleError(f"{path} is missing; the bundle is incomplete, re-run `kgrec train`") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} cannot be read ({exc}); the bundle is damaged, re-run `kgrec train`") from exc
    if not isinstance(metrics, dict):
        raise BundleError(f"{path} holds a JSON {type(metrics).__name__}, not an object of metrics; the bundle is "
                          "damaged, re-run `kgrec train`")
    return metrics


@clean_errors
def recommend(
    user: str | None = typer.Argument(None, help="User id (leave out with --query or --items: no history)."),
    bundle: Path = BUNDLE_OPTION,
    k: int = typer.Option(10, "--k", "-k", min=1, max=1000),
    query: str | None = typer.Option(None, "--query", "-q", help="Free text that makes the list query-aware."),
    items: str | None = typer.Option(None, "--items", help="Comma-separated item ids chosen by a user without "
                                     "history: recommend from them (Recommender.recommend_from_items)."),
    explain_: bool = typer.Option(False, "--explain", help="Explain every recommendation."),
    as_json: bool = typer.Option(False, "--json"),
    html: Path | None = typer.Option(None, "--html", help="Also write an HTML report with images."),
) -> None:
    """Top-k items for a user, re-ranked and optionally explained; or for someone without history, from a query
    (--query) or a few chosen items (--items)."""
    from kgrec.errors import DataError
    from kgrec.pipeline import Recommender

    check_query_text(query, "--query")
    if items is not None:
        if user is not None or query is not None or explain_ or html is not None:
            raise DataError("--items stands for a user without history: give it without USER, --query, --explain "
                            "or --html")
        rec = Recommender.load(bundle)
        _print_results(rec.recommend_from_items([x.strip() for x in items.split(",") if x.strip()], k), as_json)
        return
    if user is None and query is None:
        raise DataError("give a USER id, or --query / --items for a user without history")
    rec = Recommender.load(bundle)
    results = rec.recommend(user, k, query=query, explain=explain_ or html is not None)
    _print_results(results, as_json)
    who = "without a USER" if user is None else f"{user!r} has no history, so"
    if explain_ and results and not any(r.explanation for r in results):
        typer.echo(f"no explanations: {who} these results come from the query alone and there is nothing to "
                   "explain", err=True)
    if html is not None:
        if write_html(rec, {user: results}, html, query=query) is None:
            typer.echo(f"no HTML report: {who} these results come from the query alone and there is nothing to "
                       "explain", err=True)
        else:
            typer.echo(f"wrote {html}")


@clean_errors
def similar(
    item: str = typer.Argument(..., help="Item id."),
    bundle: Path = BUNDLE_OPTION,
    k: int = typer.Option(10, "--k", "-k", min=1, max=1000),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Items most similar to an item (fused text + image + graph vectors)."""
    from kgrec.pipeline import Recommender

    _print_results(Recommender.load(bundle).similar(item, k), as_json)


@clean_errors
def search(
    text: str | None = typer.Argument(None, help="Free-text query, e.g. 'red leather jacket'."),
    image: Path | None = typer.Option(None, "--image", help="Query image file (image -> items through CLIP)."),
    bundle: Path = BUNDLE_OPTION,
    k: int = typer.Option(10, "--k", "-k", min=1, max=1000),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Cross-modal search: text -> items (BERT + CLIP text tower), image -> items (CLIP)."""
    from kgrec.errors import DataError
    from kgrec.pipeline import Recommender

    check_query_text(text, "the text query")
    if text is None and image is None:
        raise DataError("give a text query or --image FILE")
    if image is not None and not image.is_file():
        raise DataError(f"query image {image} does not exist")
    _print_results(Recommender.load(bundle).search(text=text, image=str(image) if image else None, k=k), as_json)


@clean_errors
def explain(
    user: str = typer.Argument(..., help="User id."),
    item: str = typer.Argument(..., help="Item id."),
    bundle: Path = BUNDLE_OPTION,
    query: str | None = typer.Option(None, "--query", "-q"),
    as_json: bool = typer.Option(False, "--json", help="Print the explanation JSON (ranking/explanation.schema.json)."),
    html: Path | None = typer.Option(None, "--html", help="Also write an HTML page with images."),
) -> None:
    """Why an item suits a user: KG paths, feature contributions, which modality mattered."""
    from kgrec.pipeline import Recommender

    check_query_text(query, "--query")
    rec = Recommender.load(bundle)
    e = rec.explain(user, item, query=query)
    typer.echo(json.dumps(e.to_dict(), indent=2, default=float) if as_json else e.to_text())
    if html is not None:
        from ranking.report import write_report

        write_report(html, {user: [e]}, image_root=rec.dataset_root, title=f"Why {item} for {user}",
                     ranker_gain=_ranker_gain(rec))
        typer.echo(f"wrote {html}")


@clean_errors
def update(
    bundle: Path = typer.Argument(..., help="Bundle to update in place (atomically)."),
    new_data: Path = typer.Option(..., "--new-data", help="Dataset (from `kgrec ingest`) with new items/users/events."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the updated bundle here instead of in place."),
    retrain_threshold: float = typer.Option(0.25, "--retrain-threshold", help="Drift above which a retrain is suggested."),
) -> None:
    """Add new items, users and events without retraining the GNN; report drift and suggest a retrain if large."""
    from kgrec.pipeline import Recommender

    rec = Recommender.load(bundle)
    report = rec.update(new_data, retrain_threshold=retrain_threshold)
    rec.save(out or bundle)
    typer.echo(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in report.items()}, indent=2))
    if report["retrain_suggested"]:
        typer.secho(f"drift {report['drift']:.2f} > {retrain_threshold}: a full retrain (`kgrec train`) is suggested",
                    fg=typer.colors.YELLOW)


def write_html(rec: Any, results: dict[str, list[Any]], path: Path, title: str = "Explained recommendations",
               query: str | None = None) -> Path | None:
    """HTML report (images, KG paths, contribution charts) for explained results of several users. Users without
    history (served from the query alone) have nothing to explain and are left out; None when none is left."""
    from ranking.report import write_report

    exps = {u: [rec.explain(u, r.item_id, query=query) for r in rs]
            for u, rs in results.items() if rec.has_history(u)}
    if not exps:
        return None
    return write_report(path, exps, image_root=rec.dataset_root, title=title, ranker_gain=_ranker_gain(rec))


def _ranker_gain(rec: Any) -> dict[str, float] | None:
    """The bundle's ranker's split-gain shares for the report's overall chart (None without a ranker)."""
    from ranking.train import gain_shares

    return gain_shares(rec.ranker) if rec.ranker is not None else None


@clean_errors
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", "-o", help="Working directory for everything the demo writes."),
    items: int = typer.Option(1000, "--items", min=50),
    users: int = typer.Option(300, "--users", min=10),
    seed: int = typer.Option(0, "--seed"),
    epochs: int = typer.Option(60, "--epochs", help="GNN epochs (early stopping usually ends sooner)."),
    fit_clip_: bool = typer.Option(True, "--fit-clip/--no-fit-clip", help="Align the CLIP heads on the catalog first."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """All of it on the embedded default: generate a catalog, ingest, align CLIP, train, evaluate, explain."""
    import time

    from kgrec.data.ingest import ingest
    from kgrec.data.synthetic import generate_catalog
    from kgrec.pipeline import Recommender

    t0 = time.perf_counter()
    cfg = load_config(config, **{"fusion.epochs": epochs})
    out.mkdir(parents=True, exist_ok=True)
    raw, ds_dir, bundle = out / "raw", out / "dataset", out / "bundle"
    n_steps = 6 if fit_clip_ else 5  # without fit-clip the steps are numbered 1..5, with no gap
    steps = iter(range(1, n_steps + 1))

    def step(title: str) -> None:
        typer.secho(f"== {next(steps)}/{n_steps} {title}", bold=True)

    step("generating the demo catalog")
    generate_catalog(raw, n_items=items, n_users=users, seed=seed, images=True, progress=True)
    step("ingesting (validation + quarantine)")
    report = ingest(raw, ds_dir, config=cfg.data, progress=True)
    typer.echo(report.to_text())
    if fit_clip_:
        step("aligning CLIP on the catalog (fit-clip)")
        from encoders.fit_clip import fit_clip
        from kgrec.commands.encoders import fit_clip_report
        from kgrec.data.schema import Dataset

        result = fit_clip(Dataset.open(ds_dir), out / "clip")
        cfg.encoders.clip_checkpoint = str(out / "clip")
        typer.echo(fit_clip_report(result, out / "clip"))
    step("training: knowledge graph, encoders, GNN + fusion, LightGBM ranker")
    rec = Recommender.fit(ds_dir, cfg)
    rec.save(bundle)
    step("evaluation on the held-out test split (RecBole definitions)")
    typer.echo(metrics_table(rec.metrics))
    (out / "metrics.md").write_text(metrics_table(rec.metrics) + "\n", encoding="utf-8")
    step("explained recommendations")
    demo_users = _demo_users(rec, 3)
    results = {}
    for u in demo_users:
        typer.secho(f"-- user {u}", bold=True)
        results[u] = rec.recommend(u, 5, explain=True)
        _print_results(results[u], False)
    q = "red leather jacket"
    typer.secho(f"-- search: {q!r}", bold=True)
    _print_results(rec.search(text=q, k=5), False)
    html = write_html(rec, results, out / "report.html", title="kgrec demo: explained recommendations")
    typer.echo(f"\nbundle: {bundle}\nHTML report: {html}\ntotal {time.perf_counter() - t0:.0f} s")


def _demo_users(rec: Any, n: int) -> list[str]:
    """The n users with the most events (deterministic)."""
    counts = rec.events["user_id"].value_counts()
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [u for u, _ in ranked[:n]]
