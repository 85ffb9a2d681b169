"""Cross-modal search quality and incremental-update quality on the demo catalog (issue 8).

1. text -> items: for every (colour, category) query such as "red jacket", precision@10 of ``Recommender.search``
   = share of the top 10 whose true colour and category match (truth includes values the generator removed);
   per attribute too. Chance = the share of matching items in the catalog.
2. update vs full retrain: 10% of the items (and their events) are held out of training, then added with
   ``Recommender.update``; for those items we compare with a model trained on everything:
   similar-items category / brand precision@10, and the rank of the item when searching its own title.

    python -m benchmarks.bench_crossmodal --dataset demo_out/dataset [--clip-checkpoint demo_out/clip]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results"


def truth_table(ds) -> pd.DataFrame:
    """item_id, colour, category leaf (true values: removed ones restored from truth/missing_attributes.csv)."""
    attrs = ds.item_attributes()
    colour = attrs[attrs["name"] == "colour"].set_index("item_id")["value"]
    missing = ds.root / "truth" / "missing_attributes.csv"
    if missing.is_file():
        m = pd.read_csv(missing)
        colour = pd.concat([colour, m[m["name"] == "colour"].set_index("item_id")["value"]])
    items = ds.items.set_index("item_id")
    return pd.DataFrame({"colour": colour.reindex(items.index),
                         "leaf": items["category"].str.split(">").str[-1].str.lower()})


def search_precision(rec, truth: pd.DataFrame, k: int = 10) -> dict:
    rows = []
    for colour in sorted(truth["colour"].dropna().unique()):
        for leaf in sorted(truth["leaf"].dropna().unique()):
            if not ((truth["colour"] == colour) & (truth["leaf"] == leaf)).any():
                continue
            res = [r.item_id for r in rec.search(text=f"{colour} {leaf}", k=k)]
            t = truth.loc[res]
            rows.append({"query": f"{colour} {leaf}", "both": float(((t["colour"] == colour) & (t["leaf"] == leaf)).mean()),
                         "colour": float((t["colour"] == colour).mean()), "category": float((t["leaf"] == leaf).mean())})
    df = pd.DataFrame(rows)
    chance_both = float(np.mean([((truth["colour"] == q.split()[0]) & (truth["leaf"] == q.split()[1])).mean() for q in df["query"]]))
    return {"queries": len(df), "precision@10_both": df["both"].mean(), "precision@10_colour": df["colour"].mean(),
            "precision@10_category": df["category"].mean(), "chance_both": chance_both,
            "chance_colour": 1.0 / truth["colour"].nunique(),
            "chance_category": 1.0 / truth["leaf"].nunique()}


def new_item_quality(rec, items: list[str], meta: pd.DataFrame) -> dict:
    cat, brand, self_rank = [], [], []
    for i in items:
        sims = [r.item_id for r in rec.similar(i, 10)]
        cat.append(float((meta.loc[sims, "category"] == meta.loc[i, "category"]).mean()))
        brand.append(float((meta.loc[sims, "brand"] == meta.loc[i, "brand"]).mean()))
        found = [r.item_id for r in rec.search(text=meta.loc[i, "title"], k=50)]
        self_rank.append(found.index(i) + 1 if i in found else 51)
    return {"similar_category_p@10": float(np.mean(cat)), "similar_brand_p@10": float(np.mean(brand)),
            "title_search_hit@10": float(np.mean(np.array(self_rank) <= 10)),
            "title_search_median_rank": float(np.median(self_rank))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--clip-checkpoint", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/kgrec-bench-crossmodal"))
    ap.add_argument("--epochs", type=int, default=40)
    args = ap.parse_args()

    import torch

    from kgrec.config import Config
    from kgrec.data.schema import Dataset
    from kgrec.pipeline import Recommender

    torch.set_num_threads(1)
    ds = Dataset.open(args.dataset)
    over = {"fusion.epochs": args.epochs, "encoders.cache_dir": str(args.dataset / ".cache" / "embeddings")}
    if args.clip_checkpoint:
        over["encoders.clip_checkpoint"] = str(args.clip_checkpoint)
    cfg = Config.load(env={}, overrides=over)
    truth = truth_table(ds)
    meta = ds.items.set_index("item_id")
    out: dict = {"dataset": str(args.dataset), "clip_checkpoint": str(args.clip_checkpoint), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    t0 = time.perf_counter()
    full = Recommender.fit(ds, cfg, progress=False)
    out["full_fit_s"] = time.perf_counter() - t0
    out["search"] = search_precision(full, truth)

    items, events = ds.items, ds.events
    held = sorted(set(items["item_id"].iloc[::10]))
    base_dir, delta_dir = args.workdir / "base", args.workdir / "delta"
    base = Dataset.write(base_dir, {"items": items[~items["item_id"].isin(held)], "users": ds.users,
                                    "events": events[~events["item_id"].isin(held)], "triples": ds.triples,
                                    "links": ds.links[~ds.links["item_id"].isin(held)]}, images_from=ds.root)
    d_events = events[events["item_id"].isin(held)]
    delta = Dataset.write(delta_dir, {"items": items[items["item_id"].isin(set(held) | set(d_events["item_id"]))],
                                      "users": ds.users[ds.users["user_id"].isin(d_events["user_id"])],
                                      "events": d_events, "triples": ds.triples,
                                      "links": ds.links[ds.links["item_id"].isin(held)]}, images_from=ds.root)
    t0 = time.perf_counter()
    part = Recommender.fit(base, cfg, progress=False)
    out["base_fit_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["update_report"] = part.update(delta)
    out["update_s"] = time.perf_counter() - t0
    out["new_items"] = len(held)
    out["after_update"] = new_item_quality(part, held, meta)
    out["after_full_retrain"] = new_item_quality(full, held, meta)

    s = out["search"]
    print(f"text->items ({s['queries']} colour+category queries): P@10 both {s['precision@10_both']:.3f} "
          f"(chance {s['chance_both']:.3f}), colour {s['precision@10_colour']:.3f}, category {s['precision@10_category']:.3f} "
          f"(chance {s['chance_category']:.3f})")
    print(f"\n{len(held)} items added by update vs the same items after a full retrain")
    print(f"{'measure':<28}{'update':>10}{'full retrain':>14}")
    for key in out["after_update"]:
        print(f"{key:<28}{out['after_update'][key]:>10.3f}{out['after_full_retrain'][key]:>14.3f}")
    print(f"update {out['update_s']:.1f} s vs full fit {out['full_fit_s']:.1f} s; drift {out['update_report']['drift']:.3f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "crossmodal.json").write_text(json.dumps(out, indent=2, default=float), encoding="utf-8")


if __name__ == "__main__":
    main()
