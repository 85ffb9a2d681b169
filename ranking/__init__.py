"""Candidate features, the LightGBM LambdaRank re-ranker, and explanations (KG paths, feature contributions,
modality weights) with text / JSON / HTML reports.

The library API the app wires (``Recommender.fit / recommend(explain=True) / explain``, ``kgrec explain``)::

    from ranking import (RankingContext, FeatureBuilder, Ranker, Explainer, fit_ranker, evaluate_reranking,
                         top_candidates, write_report)

    # 1. Context: built once per bundle from the graph store (TRAIN interactions loaded) and the model arrays.
    ctx = RankingContext.from_store(
        store,                                   # any GraphStore (EmbeddedStore, Neo4jStore)
        user_vectors=U, item_vectors=V,          # (n_users, d) / (n_items, d) GNN vectors, rows in id order
        user_ids=user_ids, item_ids=item_ids,    # the bundle's id maps
        item_text=T, item_image=P,               # (n_items, dt) / (n_items, di) encoder vectors or None
        modality_weights=W,                      # (n_items, 3) text/image/graph fusion weights or None
        items=dataset.items, events=train_events)
    builder = FeatureBuilder(ctx)                # FEATURE_NAMES (the default columns), vectorised (n_users * C, F)

    # 2. Train on retrieval candidates labelled by held-out events (graded: purchase 4 > cart 3 > click 2 > view 1).
    ranker, report = fit_ranker(builder, users, candidates, valid_events, config=cfg.ranking)
    ranker.save(bundle / "ranker")               # model.txt (LightGBM text) + feature_spec.json
    ranker = Ranker.load(bundle / "ranker")
    builder = FeatureBuilder(ctx, ranker.feature_names)   # a saved ranker's own columns, by name
    table = evaluate_reranking(ranker, builder, test_users, test_candidates, test_events)  # retrieval vs re-ranked

    # 3. Serve: re-rank one user's candidates, explain the top.
    fm = builder.build(np.array([u]), candidates_row[None, :], query_vector)   # (C, F)
    order = np.argsort(-ranker.predict(fm))[:k]    # a FeatureMatrix: its column names are checked
    explainer = Explainer(ctx, ranker, store)
    explanations = explainer.explain_rows(u, candidates_row[order], fm.X[order])   # or .explain(user_id, item_id)
    explanations[0].to_dict()                    # JSON, schema in ranking/explanation.schema.json
    explanations[0].to_text()                    # terminal lines
    write_report("report.html", {user_id: explanations}, image_root=dataset.root)

Modules: ``context`` (arrays), ``features`` (FeatureBuilder), ``ranker`` (Ranker, LABEL_GRADES, training-set
helpers, ``top_candidates`` exact dot-product retrieval for arrays), ``train`` (fit / evaluate), ``graph_paths``
(user -> many items KG paths, identical to ``GraphStore.paths``), ``explain`` (Explainer, Explanation),
``report`` (HTML). Long-running services should call ``gc.freeze()`` after loading a large embedded graph.
"""
from __future__ import annotations

from ranking.context import RankingContext
from ranking.explain import Explainer, Explanation, ExplanationError, explain, explanation_schema
from ranking.features import FEATURE_DESCRIPTIONS, FEATURE_NAMES, FeatureBuilder, FeatureMatrix
from ranking.ranker import LABEL_GRADES, Ranker, TrainingSet, build_training_set, ndcg_at_k, top_candidates
from ranking.report import render_report, write_report
from ranking.train import evaluate_reranking, fit_ranker

__all__ = [
    "FEATURE_DESCRIPTIONS",
    "FEATURE_NAMES",
    "LABEL_GRADES",
    "Explainer",
    "Explanation",
    "ExplanationError",
    "FeatureBuilder",
    "FeatureMatrix",
    "Ranker",
    "RankingContext",
    "TrainingSet",
    "build_training_set",
    "evaluate_reranking",
    "explain",
    "explanation_schema",
    "fit_ranker",
    "ndcg_at_k",
    "render_report",
    "top_candidates",
    "write_report",
]
