"""Do the pair-standing, item-kNN and time columns help the product's re-ranker? Same GNN, the ranker refitted
with and without them (``ranking.extra_features``).

The columns (``ranking.features.OPTIONAL_FEATURES``, measured together): ``gnn_dot_z`` (the GNN dot product as a
standard score over every item for the user), ``user_activity``, ``co_buyer_cosine`` (item-kNN: cosine over shared
buyers summed over the user's history), ``days_user_to_item_activity`` and ``item_events_near_user_time`` (the
item's events in the 7 days up to the user's last event). Decided on demo catalogs never used for a decision before
(seeds 8-12) and ml-100k: adopt iff the demo mean test ratio to the GNN order ((Recall@20 + NDCG@20) / 2) does not
fall and ml-100k's Recall@20 drops at most 0.002. Result (benchmarks/results/ranker_features.json): 1.318 with
vs 1.428 without, ml-100k 0.4055 vs 0.4059 -> not adopted; they are opt-in.

For each dataset: fit the ``Recommender`` once, refit only the ranker per setting (``Recommender.refit_ranker``),
evaluate on test (RecBole definitions, train + valid masked) next to the GNN order.

    .venv/bin/python -m benchmarks.bench_ranker_features [--seeds 8,9,10,11,12] [--ml100k ../shared/data/ml-100k-kg]

Writes ``benchmarks/results/ranker_features.json`` and prints a table.
"""
from __future__ import annotations

from benchmarks.bench_ranker_labels import compare, demo_mean_ratio, write
from ranking.features import OPTIONAL_FEATURES

SETTINGS = ([], list(OPTIONAL_FEATURES))  # the default feature set, then with the opt-in columns added


def main() -> None:
    key = "extra_features"
    a, rows, t0 = compare(__doc__, "8,9,10,11,12", key, SETTINGS)
    summary = {}
    for v in SETTINGS:
        label = "with" if v else "without"
        mine = [r for r in rows if r[key] == v and r["gnn+ranker"]]
        ml = [r for r in mine if r["dataset"] == "ml-100k"]
        summary[label] = {"demo_mean_ratio": demo_mean_ratio(mine),
                          "ml100k_recall@20": ml[0]["gnn+ranker"]["recall@20"] if ml else None,
                          "ml100k_ndcg@20": ml[0]["gnn+ranker"]["ndcg@20"] if ml else None}
        print(f"{label} the new columns: demo mean test ratio to the GNN order ((R@20 + N@20) / 2) "
              f"{summary[label]['demo_mean_ratio']}; ml-100k R@20 / N@20 {summary[label]['ml100k_recall@20']} / "
              f"{summary[label]['ml100k_ndcg@20']}")
    write(a, "ranker_features", rows, summary, t0)


if __name__ == "__main__":
    main()
