"""Building the default CLIP from packaged weights tells the user one thing in our words, not the libraries' noise."""
from __future__ import annotations

import logging

from encoders.clip import _only_unused_pooler

POOLER_ONLY = """BertModel LOAD REPORT from: /x/model
Key                 | Status     |  | 
--------------------+------------+--+-
pooler.dense.bias   | UNEXPECTED |  | 
pooler.dense.weight | UNEXPECTED |  | 

Notes:
- UNEXPECTED:	can be ignored when loading from different task/architecture"""


def test_only_a_report_of_unused_pooler_weights_counts_as_expected() -> None:
    assert _only_unused_pooler(POOLER_ONLY)
    missing = POOLER_ONLY.replace("pooler.dense.bias   | UNEXPECTED", "encoder.layer.0.q   | MISSING   ")
    assert not _only_unused_pooler(missing)
    assert not _only_unused_pooler(POOLER_ONLY.replace("pooler.dense.weight", "embeddings.word_weight"))
    assert not _only_unused_pooler("BertModel LOAD REPORT from: /x/model\n")


def test_default_clip_builds_without_library_warnings(caplog, capfd) -> None:
    from encoders.clip import ClipEncoder

    root = logging.getLogger()
    filters_before = list(root.filters)
    with caplog.at_level(logging.INFO):
        ClipEncoder(device="cpu")  # packaged EfficientNet-Lite0 + MiniLM towers, projections untrained
    out = capfd.readouterr()
    text = caplog.text + out.err + out.out
    assert "initialized partially" not in text and "LOAD REPORT" not in text
    assert "Loading weights" not in text  # transformers' per-model weight-loading bar
    assert "Parsing model identifier" not in text  # open_clip's factory steps on the root logger
    ours = [r.getMessage() for r in caplog.records if r.name == "encoders.clip"]
    assert ours == ["CLIP kgrec-effnetlite0-minilm: packaged tower weights, projection heads untrained (align them on "
                    "the catalog with `kgrec encoders fit-clip`)"]
    assert root.filters == filters_before  # the filter is removed again
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="encoders.clip"):
        ClipEncoder("kgrec-tiny-test", device="cpu", seed=3)  # no packaged tower: random weights, said so
    assert "CLIP kgrec-tiny-test: random weights (seed 3), projection heads untrained" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        logging.getLogger().warning("Model elsewhere initialized partially.")  # outside a build: not filtered
    assert "initialized partially" in caplog.text


def test_the_command_line_hides_pygs_import_time_deprecation_warning() -> None:
    import subprocess
    import sys

    # the filter belongs to the script (kgrec.cli.main), not to an import of kgrec.cli
    code = ("import warnings; warnings.simplefilter('default'); import kgrec.cli as c\n"
            "def fake():\n    import torch_geometric.nn, fusion.gnn; print('ok')\n"
            "c.app = fake; c.main()")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
    assert "torch.jit.script` is deprecated" not in run.stderr


def test_the_text_encoder_loads_without_a_weight_loading_bar(capfd) -> None:
    from transformers.utils import logging as hf_logging

    from encoders.text import TextEncoder

    assert hf_logging.is_progress_bar_enabled()
    TextEncoder("packaged:all-MiniLM-L6-v2", device="cpu")
    out = capfd.readouterr()
    assert "Loading weights" not in out.err + out.out
    assert hf_logging.is_progress_bar_enabled()  # restored for the user's own transformers calls


def test_weight_loading_quietly_keeps_the_users_hub_progress_setting() -> None:
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    from encoders.text import quiet_weight_loading

    disable_progress_bars()
    try:
        with quiet_weight_loading():
            pass
        assert are_progress_bars_disabled()  # transformers' switch turned them back on before
    finally:
        enable_progress_bars()
