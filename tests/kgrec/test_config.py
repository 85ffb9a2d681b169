from __future__ import annotations

import pytest

from kgrec.config import Config, neo4j_settings
from kgrec.errors import ConfigError


def test_precedence_defaults_yaml_env_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("fusion:\n  epochs: 7\n  dim: 32\nranking:\n  num_candidates: 50\n")
    cfg = Config.load(f, env={"KGREC_FUSION__EPOCHS": "9"}, overrides={"fusion.dim": 16})
    assert cfg.fusion.epochs == 9  # env beats YAML
    assert cfg.fusion.dim == 16  # override beats YAML
    assert cfg.ranking.num_candidates == 50  # YAML beats default
    assert cfg.kg.backend == "embedded"  # default


def test_unknown_key_is_a_clear_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("fusion:\n  epochz: 7\n")
    with pytest.raises(ConfigError, match="epochz"):
        Config.load(f, env={})


def test_roundtrip_yaml(tmp_path):
    cfg = Config.load(env={}, overrides={"kg.backend": "neo4j"})
    f = tmp_path / "r.yaml"
    f.write_text(cfg.to_yaml())
    assert Config.load(f, env={}) == cfg


def test_neo4j_password_only_from_env():
    cfg = Config.load(env={})
    s = neo4j_settings(cfg.kg, env={"NEO4J_URI": "bolt://127.0.0.1:1", "NEO4J_PASSWORD": "pw"})
    assert s == {"uri": "bolt://127.0.0.1:1", "user": "neo4j", "password": "pw", "database": "neo4j"}
    assert "password" not in cfg.to_yaml()


def test_with_epochs_reaches_the_trainer_that_reads_it():
    from kgrec.config import FusionConfig

    gnn = FusionConfig(epochs=50).with_epochs(7)
    assert gnn.epochs == 7 and gnn.scale_options == {}
    scale = FusionConfig(trainer="scale", scale_options={"lr": 0.005, "epochs": 20}).with_epochs(3)
    assert scale.epochs == 3 and scale.scale_options == {"lr": 0.005, "epochs": 3}
    assert FusionConfig(trainer="scale", scale_options={"lr": 0.005}).scale_options == {"lr": 0.005}  # not mutated
