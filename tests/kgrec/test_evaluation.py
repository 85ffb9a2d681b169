"""The evaluation harness (kgrec.evaluation / `kgrec evaluate DATASET`): every split, every baseline, every ablation
in one full-ranking protocol, written as Markdown + JSON + a bar chart."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from kgrec.cli import app
from kgrec.config import Config
from kgrec.errors import ConfigError, DataError
from kgrec.evaluation import ABLATIONS, BASELINES, run_evaluation
from tests.kgrec.test_pipeline import tiny_encoders  # noqa: F401  (fixture)

FAST = {"fusion.epochs": 6, "fusion.dim": 16, "fusion.patience": 2, "fusion.batch_size": 4096,
        "fusion.num_negatives": 256}


def _cfg(tmp_path) -> Config:
    return Config.load(env={}, overrides={**FAST, "encoders.cache_dir": str(tmp_path / "cache")})


def test_every_baseline_and_ablation_on_the_demo_catalog(demo_dataset, tiny_encoders, tmp_path):  # noqa: F811
    res = run_evaluation(demo_dataset, _cfg(tmp_path), split="temporal", out_dir=tmp_path / "out",
                         encoders=tiny_encoders, progress=False)
    names = [r["model"] for r in res.rows]
    assert names == list(BASELINES) + list(ABLATIONS)
    for r in res.rows:
        assert all(0.0 <= r[c] <= 1.0 for c in ("recall@20", "ndcg@20", "hit@20", "mrr@20", "precision@20"))
        assert r["hit@20"] >= r["recall@20"] >= r["recall@10"] and r["item_coverage@20"] > 0
    pop = res.row("popularity")["recall@20"]
    assert res.row("ease")["recall@20"] > pop and res.row("itemknn")["recall@20"] > pop
    assert res.row("fused")["recall@20"] > pop  # the generator's tastes are learnable
    assert "lambda" in res.row("ease")["note"] and "epochs" in res.row("bpr-mf")["note"]
    # the same counts the split gives, and the files
    assert res.counts["train pairs"] > res.counts["valid pairs"] > 0 and res.counts["test pairs"] > 0
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["split"] == "temporal" and [r["model"] for r in data["rows"]] == names
    md = (tmp_path / "out" / "results.md").read_text()
    assert all(f"| {n} |" in md for n in names) and "precision@20" in md
    # encoding is reported once, not added to the first ablation's fit time
    assert res.encode_seconds > 0 and data["encode_seconds"] == res.encode_seconds
    assert f"share {res.encode_seconds:.1f} s of item encoding" in md
    with Image.open(tmp_path / "out" / "results.png") as im:
        assert im.format == "PNG" and im.size[0] > 500


@pytest.mark.parametrize("split", ["random", "leave-one-out"])
def test_other_splits(demo_dataset, tiny_encoders, tmp_path, split):  # noqa: F811
    res = run_evaluation(demo_dataset, _cfg(tmp_path), split=split, baselines=["popularity", "ease"],
                         ablations=[], encoders=tiny_encoders, progress=False)
    c = res.counts
    if split == "leave-one-out":  # one test and one valid pair per user with >= 3 interactions
        assert c["test pairs"] == c["valid pairs"] <= demo_dataset.events["user_id"].nunique()
    else:
        assert 0.05 < c["test pairs"] / sum(c.values()) < 0.13  # int(0.1 * n) per user: small users give less
    assert res.row("ease")["recall@20"] > res.row("popularity")["recall@20"]


def test_given_split_bad_names_and_the_cli(demo_dataset, tiny_encoders, tmp_path):  # noqa: F811
    with pytest.raises(DataError, match="no split.parquet"):
        run_evaluation(demo_dataset, _cfg(tmp_path), split="given", encoders=tiny_encoders, progress=False)
    with pytest.raises(ConfigError, match="unknown split"):
        run_evaluation(demo_dataset, _cfg(tmp_path), split="sideways", progress=False)
    with pytest.raises(ConfigError, match=r"unknown baselines / ablations \['svd'\]"):
        run_evaluation(demo_dataset, _cfg(tmp_path), baselines=["svd"], progress=False)
    res = CliRunner().invoke(app, ["evaluate", str(demo_dataset.root), "--split", "random", "--baselines",
                                   "popularity,ease", "--ablations", "", "--out", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert "| ease |" in res.output and (tmp_path / "cli" / "results.png").is_file()
    rows = json.loads((tmp_path / "cli" / "results.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["popularity", "ease"] and np.isfinite(rows[1]["ndcg@20"])
    from kgrec.commands.model import _EVAL_ABLATIONS, _EVAL_BASELINES

    assert _EVAL_BASELINES == BASELINES and _EVAL_ABLATIONS == tuple(ABLATIONS)


def test_an_ablation_without_its_modality_is_skipped_and_said(demo_dataset, tiny_encoders, tmp_path):  # noqa: F811
    text, _ = tiny_encoders
    res = run_evaluation(demo_dataset, _cfg(tmp_path), baselines=["popularity"], ablations=["text-only", "image-only"],
                         encoders=(text, None), out_dir=tmp_path / "out", progress=False)
    assert [r["model"] for r in res.rows] == ["popularity", "text-only", "image-only"]
    assert res.row("image-only")["skipped"] == "the dataset has no image vectors"
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| text-only |" in md and "- image-only: skipped, the dataset has no image vectors" in md
    assert [r["model"] for r in json.loads((tmp_path / "out" / "results.json").read_text())["rows"]] == [
        "popularity", "text-only", "image-only"]


def test_image_only_is_skipped_when_no_item_has_a_picture(demo_dataset, tiny_encoders, tmp_path):  # noqa: F811
    """A CLIP encoder but no pictures (ml-100k): zero image rows are not an image input, so image-only is skipped."""
    from kgrec.data.schema import Dataset

    ds = Dataset.write(tmp_path / "no-images", {"items": demo_dataset.items.assign(image=None),
                                                "events": demo_dataset.events})
    res = run_evaluation(ds, _cfg(tmp_path), baselines=["popularity"], ablations=["image-only"],
                         encoders=tiny_encoders, progress=False)
    assert res.row("image-only")["skipped"] == "the dataset has no image vectors"


def test_train_and_evaluate_take_a_clip_checkpoint(demo_dataset, tmp_path, monkeypatch):  # noqa: F811
    """`kgrec train / evaluate DATASET --clip-checkpoint DIR` put DIR (absolute) into encoders.clip_checkpoint."""
    import kgrec.evaluation as ev
    from kgrec.errors import KgrecError
    from kgrec.pipeline import Recommender

    seen: list[str | None] = []

    def capture(dataset, cfg, *a, **kw):
        seen.append(cfg.encoders.clip_checkpoint)
        raise KgrecError("stop here")

    monkeypatch.setattr(ev, "run_evaluation", capture)
    monkeypatch.setattr(Recommender, "fit", classmethod(lambda cls, dataset, cfg, *a, **kw: capture(dataset, cfg)))
    monkeypatch.chdir(tmp_path)
    for argv in (["evaluate", str(demo_dataset.root)], ["train", str(demo_dataset.root)]):
        res = CliRunner().invoke(app, argv + ["--clip-checkpoint", "ck"])
        assert res.exit_code == 2 and "stop here" in res.output, res.output
    assert seen == [str(tmp_path / "ck")] * 2
    res = CliRunner().invoke(app, ["evaluate", str(demo_dataset.root)])
    assert seen[-1] is None  # without the flag the config's value (none here) stands
