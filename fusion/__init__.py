"""Graph learning and modality fusion: a GNN over the knowledge graph, a learned fusion of text, image and graph
embeddings, training, evaluation metrics and top-K retrieval. Plain arrays in, arrays out (no Dataset parsing).

Library API (what the app package wires into ``kgrec train / evaluate / recommend`` and the bundle):

Training (``fusion.train``)
    ``train_model(num_users, num_items, train_users, train_items, *, graph=HeteroData | None,
    text=(num_items, d_t) | None, image=(num_items, d_i) | None, image_present=(num_items,) bool | None,
    valid=(users, items) | None, config=FusionConfig) -> TrainedModel``.
    User-item edges inside ``graph`` are ignored (interactions come only from the train arrays); edges derived
    from interactions (ALSO_BOUGHT) are the caller's to build from training events (``kgrec.pipeline
    .training_graph``); every other HeteroData edge type is a KG relation with its own learned gate. ``config.use_kg / use_text /
    use_image`` are the ablation switches; ``config.hybrid_ease`` adds an EASE item-item term (chosen on valid).

``TrainedModel``
    ``user_embeddings`` (U, d), ``item_embeddings`` (I, d), ``modality_weights`` (I, 3: text, image, graph),
    ``relation_weights`` {relation: gate}, ``history`` [per-epoch loss / s / valid metrics],
    ``score(users, items)`` (n,), ``score_all(users)`` (b, I), ``recommend(users, k, exclude_seen=True)``,
    ``similar_items(item_idx, k)``, cold start: ``item_vectors_from_content(text, image)`` (n, d),
    ``user_vector_from_items(items)`` / ``user_vector_from_content(text, image)`` (d,),
    ``save(dir)`` -> ``config.json`` + ``model.safetensors`` (atomic), ``TrainedModel.load(dir)``.
    Note: with a hybrid EASE term, ``score_all``/``recommend`` include it; raw vectors (``topk``) do not.

Retrieval (``fusion.retrieve``)
    ``topk(user_vecs, item_vecs, k, exclude=csr | None, batch_size, device) -> (idx (b, k), scores (b, k))``,
    exact and batched on CPU/GPU; ``similar_items(item_vecs, item_idx, k)`` (cosine, self excluded).

Evaluation (``fusion.metrics``, ``fusion.splits``, ``fusion.baselines``)
    ``evaluate(score_fn, heldout_csr, exclude_csr, ks)`` -> Recall/NDCG/Hit/MRR/Precision@K and item coverage
    with RecBole 1.2.1's exact definitions (reproduces RecBole's PopExact row on ml-100k to 4 decimals);
    ``to_csr``; splits ``given_split``, ``random_split`` (8:1:1 per user), ``leave_one_out``,
    ``temporal_split``, ``global_temporal_split``; baselines ``Popularity``, ``EASE``, ``ItemKNN``, ``RP3beta``
    (``fit(train_csr)`` / ``score(users)``), ``MatrixFactorization`` (BPR-MF) and ``PyGLightGCN`` trained by
    ``train.fit_embeddings`` with the same sampler, loss and early stopping as our model.
"""
