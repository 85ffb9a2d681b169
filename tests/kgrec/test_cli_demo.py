"""`kgrec demo`'s step headers and its fit-clip step, up to the training step (which is stopped there: fitting is
covered in test_pipeline.py). Catalog generation and ingest run for real on a tiny catalog; fit_clip returns
recorded-looking metrics, since its training is covered in tests/encoders/test_fit.py."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from encoders.base import FitResult
from kgrec.errors import KgrecError


def _clip_metrics() -> dict:
    def attr(acc: float, p10: float) -> dict:
        return {"classes": 8, "n": 40, "zero_shot_accuracy": acc, "chance_uniform": 0.125,
                "chance_majority": 0.2250000000000001, "precision@10": p10, "precision@10_random": 0.1250000000000003}

    return {"before": {"colour": attr(0.1234567890123, 0.1), "category": attr(0.2, 0.15)},
            "after": {"colour": attr(0.87654321987654, 0.9), "category": attr(0.7, 0.65)},
            "pairs": 50, "train": 40, "held_out": 10, "mode": "heads", "top_blocks": 0, "epochs_run": 7,
            "best_val_loss": 1.2345678901234567, "seconds": 3.2109876, "device": "cpu",
            "timings": {"features": 0.123456789012345, "train": 2.98765432109876}}


class _StopAtTraining(KgrecError):
    pass


@pytest.fixture
def demo_until_training(monkeypatch):
    """Run `kgrec demo ARGS` until its training step; returns the CLI output."""
    from kgrec.cli import app
    from kgrec.pipeline import Recommender

    def fake_fit_clip(dataset, out_dir, config=None):
        assert dataset.manifest["counts"]["items"] == 50  # the ingested demo dataset
        return FitResult(Path(out_dir), _clip_metrics(), [], 3.2109876)

    def stop(*_a, **_k):
        raise _StopAtTraining("stopped at training (test)")

    # encoders/__init__ re-exports the function under the module's name, so patch the module object itself
    monkeypatch.setattr(importlib.import_module("encoders.fit_clip"), "fit_clip", fake_fit_clip)
    monkeypatch.setattr(Recommender, "fit", classmethod(lambda cls, *a, **k: stop()))

    def run(tmp_path: Path, *args: str) -> str:
        res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--items", "50", "--users", "10",
                                       *args])
        assert res.exit_code == 2 and "stopped at training (test)" in res.output, res.output
        return res.output

    return run


def test_demo_prints_fit_clip_metrics_as_the_fit_clip_table(demo_until_training, tmp_path):
    out = demo_until_training(tmp_path)
    assert re.findall(r"== (\d)/(\d) ", out) == [("1", "6"), ("2", "6"), ("3", "6"), ("4", "6")]
    clip_step = out[out.index("== 3/6"):out.index("== 4/6")]
    assert "{" not in clip_step and "timings" not in clip_step  # no raw metrics dict
    assert "fit-clip (heads) on 40 pairs, 10 held out, 7 epochs, 3.2 s" in clip_step
    lines = clip_step.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("attribute"))
    assert lines[header].split() == ["attribute", "classes", "chance", "zero_shot_before", "zero_shot_after",
                                     "p@10_random", "p@10_before", "p@10_after"]
    assert lines[header + 1].split() == ["colour", "8", "0.225", "0.123", "0.877", "0.125", "0.1", "0.9"]
    assert lines[header + 2].split()[0] == "category"
    assert all(len(line) < 100 for line in lines[header:header + 3])


def test_demo_without_fit_clip_numbers_its_steps_without_a_gap(demo_until_training, tmp_path):
    out = demo_until_training(tmp_path, "--no-fit-clip")
    assert re.findall(r"== (\d)/(\d) ", out) == [("1", "5"), ("2", "5"), ("3", "5")]
    assert "== 3/5 training" in out and "fit-clip" not in out
