"""One configuration object with a section per stage.

Precedence (lowest to highest): defaults written here < YAML file < ``KGREC_SECTION__KEY`` environment variables <
explicit overrides (CLI flags). Neo4j credentials come from ``NEO4J_URI``, ``NEO4J_USER``, ``NEO4J_PASSWORD``,
``NEO4J_DATABASE`` and are never written into a bundle.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kgrec.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Ingestion and validation."""

    strict: bool = False  # fail on any quarantined row
    max_text_length: int = 20_000  # characters; longer titles/descriptions are quarantined
    max_id_length: int = 256
    check_images: bool = True  # open every referenced image to verify it decodes
    max_image_pixels: int = 50_000_000
    chunk_rows: int = 1_000_000  # rows per chunk when streaming large files
    min_timestamp: str = "1970-01-01T00:00:00Z"
    max_timestamp: str = "2100-01-01T00:00:00Z"


class KGConfig(_Section):
    """Knowledge graph store."""

    backend: Literal["embedded", "neo4j"] = "embedded"
    batch_size: int = 10_000
    also_bought_min_count: int = 2  # co-purchases needed for an ALSO_BOUGHT edge
    max_path_hops: int = 3
    uri: str | None = None  # NEO4J_URI wins when set
    user: str = "neo4j"
    database: str = "neo4j"


class EncodersConfig(_Section):
    """Text (BERT family) and CLIP encoders."""

    text_model: str = "packaged:all-MiniLM-L6-v2"  # or a local directory / hub name; "static:<dir or base>" = encoders.static (big catalogs)
    text_max_length: int = 128
    text_batch_size: int = 64
    clip_model: str = "kgrec-effnetlite0-minilm"  # an open_clip config name (ours or open_clip's)
    clip_pretrained: str | None = None  # open_clip tag or a local checkpoint file
    clip_checkpoint: str | None = None  # our fit-clip output directory
    image_batch_size: int = 64
    num_workers: int = 0
    device: str = "auto"
    cache_dir: str | None = None  # defaults to <dataset>/.cache/embeddings


class FusionConfig(_Section):
    """GNN and fusion training."""

    dim: int = 64
    num_layers: int = 2
    epochs: int = 100
    # defaults = the settings measured best on ml-100k (benchmarks/bench_ml100k.py TRAIN_CONFIG + OURS_CONFIG)
    batch_size: int = 16384  # 16384 with 1024 negatives: half the propagations per epoch of 8192/256, and a higher
    # valid NDCG@20 on ml-100k (measured; 16384/256 lost accuracy)
    lr: float = 0.01
    weight_decay: float = 0.0
    patience: int = 6
    seed: int = 2020
    use_kg: bool = True
    use_text: bool = True
    use_image: bool = True
    device: str = "auto"
    deterministic: bool = True  # torch deterministic algorithms while training: same result every run (fusion/train.py)
    # --- fusion/ training details (fusion/train.py documents each) ---
    loss: Literal["bpr", "softmax"] = "softmax"  # softmax = sampled softmax over num_negatives shared negatives
    num_negatives: int = 1024  # uniform negatives per positive (bpr) or per batch (softmax)
    temperature: float = 0.2  # softmax loss temperature
    id_dropout: float = 0.1  # share of items whose ID embedding is hidden per step (teaches content-only vectors)
    prune_kg_leaves: bool = True  # drop KG nodes with a single edge (no signal between items; fusion/gnn.py)
    max_eval_users: int = 10_000  # users sampled for per-epoch validation on large data
    hybrid_ease: bool = True  # add an EASE item-item term learned on train, weight chosen on valid
    ease_lambdas: list[float] = Field(default_factory=lambda: [100.0, 200.0, 300.0, 500.0, 800.0])
    hybrid_weights: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 1.0, 2.0, 4.0])
    max_ease_items: int = 30_000  # EASE needs a dense items x items inverse; skipped above this
    # "gnn": the relation-aware GNN (full-graph propagation every step, fusion/train.py); "scale": features
    # propagated once + mini-batch two-tower training (fusion/scale.py), for catalogs of ~1M items where a GNN step
    # over all edges takes seconds. scale takes dim/max_eval_users/seed/use_* from this section and its own
    # optimisation settings (fusion.scale.ScaleTrainConfig defaults, measured at 100k items: batch 4096, lr 0.002,
    # 2048 negatives, temperature 0.1, 20 epochs, patience 3), overridden by scale_options, e.g.
    # {"hidden": 0, "lr": 0.005, "pairs_per_epoch": 2000000}; no EASE term, no cold-start vectors for new items.
    trainer: Literal["gnn", "scale"] = "gnn"
    scale_options: dict[str, Any] = Field(default_factory=dict)

    def with_epochs(self, epochs: int) -> FusionConfig:
        """A copy that trains for ``epochs`` epochs with either trainer (``scale`` reads ``scale_options``)."""
        update: dict[str, Any] = {"epochs": epochs}
        if self.trainer == "scale":
            update["scale_options"] = {**self.scale_options, "epochs": epochs}
        return self.model_copy(update=update)


class RankingConfig(_Section):
    """Candidate generation and LightGBM re-ranking."""

    num_candidates: int = 200  # retrieval candidates the ranker re-ranks; on five demo catalogs 200 beat 100 and 400
    # (test ratio to the GNN order 1.447 vs 1.223 / 1.357, benchmarks/bench_ranker_setting.py)
    n_estimators: int = 300
    learning_rate: float = 0.05
    num_leaves: int = 7  # small trees: the ranker often learns from few labels (a few hundred users' valid
    # events); over three demo catalogs its test Recall@20 is 1.36x the GNN order's with 7 leaves, 1.18x with 31
    # (benchmarks/bench_ranker_leaves.py)
    early_stopping_rounds: int = 30
    cv_folds: int = Field(default=5, ge=0)  # >= 2: the tree count is chosen by cross-validation over the users
    # (the fold-mean NDCG@20 curve's best iteration), then one ranker learns from every user; 0 or 1: early stopping
    # on 20% of the users, the ranker learns from the other 80% (the earlier default). On five fresh demo catalogs
    # the test (Recall@20 + NDCG@20) ratio to the GNN order is 1.318 with 5 folds vs 1.294 (ml-100k: 0.4059 vs
    # 0.4073 Recall@20); the stopping point no longer rests on ~46 users (benchmarks/bench_ranker_cv.py)
    label_gain: list[float] = Field(default_factory=lambda: [0.0, 1.0, 2.0, 4.0, 8.0])
    explain_max_paths: int = 3
    seed: int = 2020
    min_child_samples: int = 20  # rows per leaf at least; on five demo catalogs 20 beat 50 and 100 (test ratio to the
    # GNN order 1.447 vs 1.326 / 1.365, benchmarks/bench_ranker_setting.py)
    subsample: float = 1.0  # row bagging fraction (1.0 = off)
    colsample_bytree: float = 1.0
    lambdarank_truncation_level: int = 30  # pairs considered per query: deeper than the NDCG@20 it optimises
    n_jobs: int = 2
    explain_max_features: int = 4  # positive contributions cited per explanation
    explain_path_limit: int = 200  # paths read from the store per (user, item) before ranking them
    # recommend(user, query=...): order by z(ranker score) + query_weight * z(query match) over the candidates (the
    # ranker is trained without queries, so the query steers the list through this term)
    query_weight: float = Field(default=1.0, ge=0.0)
    # what the ranker learns from: "valid" = the valid events (GNN candidates, features from the train history);
    # "fold" = a held-out fold of train instead: the GNN is refitted on the rest of train (the epochs the main GNN
    # kept, its EASE setting), whose candidates and history give the features and the fold's events the labels (more
    # users to learn from, one more GNN fit); "valid+fold" = both. The tree count and the report come from the
    # valid users (cv_folds; a user's fold groups are left out wherever that user is held out), or from the fold's
    # users when there are no valid events: "fold" gives a ranker to a dataset whose split has none. "valid" stays the default: over ml-100k and three demo
    # catalogs its test Recall@20 is 1.24x the GNN order's, "fold" 1.09x, "valid+fold" 1.15x
    # (benchmarks/bench_ranker_labels.py)
    label_source: Literal["valid", "fold", "valid+fold"] = "valid"
    fold_split: Literal["auto", "temporal", "random"] = "auto"  # how the fold is cut from each user's train pairs:
    # "temporal" = the user's latest, "random" = a seeded sample; "auto" = temporal when fit's own split is (every
    # user's valid pairs after their train pairs, as in the split fit makes itself), random otherwise
    fold_share: float | None = Field(default=None, gt=0.0, lt=1.0)  # share of each user's train pairs held out
    # (None: valid's share of train + valid, so the fold looks like the valid split)
    exclude_features: list[str] = Field(default_factory=list)  # default columns a new ranker leaves out
    extra_features: list[str] = Field(default_factory=list)  # opt-in columns it adds (ranking.features.
    # OPTIONAL_FEATURES: gnn_dot_z, user_activity, co_buyer_cosine, days_user_to_item_activity,
    # item_events_near_user_time; together they lowered test accuracy on five demo catalogs and left ml-100k flat,
    # benchmarks/bench_ranker_features.py). A saved ranker keeps the names it learned from; serving builds those.

    @model_validator(mode="after")
    def _known_features(self) -> RankingConfig:
        # unknown names, or every column left out: a clear error when the config is read (the default needs no
        # check, and reading a config should not import the feature code's numerical stack)
        if self.exclude_features or self.extra_features:
            from ranking.features import ranker_feature_names

            ranker_feature_names(self.exclude_features, self.extra_features)
        return self

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The columns a ranker trained with this config learns from."""
        from ranking.features import ranker_feature_names

        return ranker_feature_names(self.exclude_features, self.extra_features)


class ServeConfig(_Section):
    """HTTP service (``kgrec serve``)."""

    host: str = "127.0.0.1"  # loopback by default; set 0.0.0.0 deliberately to expose the service
    port: int = 8000
    max_k: int = 100  # largest k a request may ask for
    max_upload_bytes: int = 10 * 1024 * 1024  # image search uploads
    max_query_chars: int = 1000  # longest text query accepted
    torch_threads: int = 1  # intra-op threads (torch and numpy's BLAS) per `kgrec serve` process (0 = library
    # defaults); requests are served one at a time, and on 2 shared cores 1 thread encoded a query ~5x faster than 2
    workers: int = 1  # `kgrec serve` processes, each with the bundle loaded (one per core that serving may use)
    balance_connections: bool = True  # with workers > 1: a worker holding more than its share of the open
    # connections closes the excess after a response (clients reconnect; the kernel spreads them afresh)
    max_batch: int = 32  # concurrent /recommend or /search requests answered as one batch (1 = no batching)
    batch_gather_ms: float = Field(1.0, ge=0.0)  # before a batch, wait in steps this long while requests keep
    # arriving (at most 3 steps; 0 = take what is queued): keeps closed-loop clients in one batch
    query_runtime: Literal["onnx", "torch"] = "onnx"  # text query encoders in ONNX Runtime (same vectors to ~1e-7,
    # checked at start; falls back to torch, logged, where an encoder cannot be exported) or in torch
    query_bf16: bool = False  # APPROXIMATE text search: query encoders in bfloat16 (~2x faster on AVX512-BF16
    # CPUs), items and scoring float32; measured agreement with float32 results in docs/serve.md


class EnrichmentConfig(_Section):
    """Offline catalog enrichment (``kgrec enrich``): attribute inference, duplicates, SIMILAR_TO, COMPLEMENTS."""

    threshold: float = Field(0.8, ge=0.0, le=1.0)  # calibrated confidence an inferred value needs to be written
    folds: int = Field(5, ge=2)  # cross-validation folds over items with known values (hidden-value training)
    seed: int = 2020
    min_labelled: int = 20  # items with a known value an attribute needs before it is inferred
    min_applicable_share: float = 0.5  # an attribute is missing (not inapplicable) where >= this share of the category has it
    knn_k: int = 10  # labelled neighbours that vote (cosine-weighted)
    classifier_dims: int = 64  # PCA components of the content vectors fed to the logistic regression
    classifier_c: float = 1.0  # inverse L2 strength of that regression
    kg_smoothing: float = 1.0  # pseudo-votes of the catalog-wide value frequencies in every KG vote
    prompt: str = "a photo of a {value} {noun}"  # CLIP zero-shot prompt; noun = the item's leaf category
    duplicate_k: int = 10  # neighbours per item compared for duplicates (blocking)
    duplicate_min_cosine: float = 0.5  # floor under the data-chosen text/image cosine thresholds (centred vectors)
    duplicate_price_tolerance: float = 0.005  # relative price difference still counted as the same price
    similar_k: int = 5  # SIMILAR_TO neighbours per item
    similar_min_cosine: float = 0.5  # centred content cosine a SIMILAR_TO pair needs
    complement_min_users: int = 2  # common buyers a COMPLEMENTS pair (different categories) needs
    exclude_sources: list[str] = Field(default_factory=list)  # attribute evidence left out, e.g. ["text", "zero_shot"]


class Config(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    kg: KGConfig = Field(default_factory=KGConfig)
    encoders: EncodersConfig = Field(default_factory=EncodersConfig)
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    ranking: RankingConfig = Field(default_factory=RankingConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    enrichment: EnrichmentConfig = Field(default_factory=EnrichmentConfig)

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        *,
        env: dict[str, str] | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> Config:
        """Build a config from defaults, an optional YAML file, ``KGREC_SECTION__KEY`` env vars and overrides.

        ``overrides`` uses dotted keys: ``{"fusion.epochs": 5}``.
        """
        raw: dict[str, Any] = {}
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file {p} does not exist")
            try:
                loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
            if not isinstance(loaded, dict):
                raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(loaded).__name__}")
            raw = loaded
        env = dict(os.environ if env is None else env)
        for key, value in env.items():
            if not key.startswith("KGREC_") or "__" not in key:
                continue
            section, _, field = key[len("KGREC_"):].lower().partition("__")
            raw.setdefault(section, {})[field] = yaml.safe_load(value) if value else value
        for dotted, value in (overrides or {}).items():
            if value is None:
                continue
            section, _, field = dotted.partition(".")
            raw.setdefault(section, {})[field] = value
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(f"invalid configuration: {exc}") from exc

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def neo4j_settings(cfg: KGConfig, env: dict[str, str] | None = None) -> dict[str, str | None]:
    """Connection settings: environment variables win over the config file; the password only from env."""
    env = dict(os.environ if env is None else env)
    return {
        "uri": env.get("NEO4J_URI") or cfg.uri,
        "user": env.get("NEO4J_USER") or cfg.user,
        "password": env.get("NEO4J_PASSWORD"),
        "database": env.get("NEO4J_DATABASE") or cfg.database,
    }
