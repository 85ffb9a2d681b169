"""``kgrec encode`` end to end on a small catalog with the packaged models; help texts of the fit commands."""
from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from kgrec.cli import app
from tests.encoders.conftest import write_catalog

pytestmark = pytest.mark.slow


def test_encode_command_writes_embeddings_with_statuses(tmp_path):
    from encoders.items import ItemEmbeddings

    ds = write_catalog(tmp_path / "cat", n_per_cell=1)
    out = tmp_path / "emb"
    runner = CliRunner()
    result = runner.invoke(app, ["encode", str(ds.root), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "embedded" in result.output and "text_only" in result.output and "failed" in result.output
    emb = ItemEmbeddings.load(out)
    assert emb.text.shape == (len(emb), 384) and emb.image.shape == (len(emb), 256)
    status = dict(zip(emb.item_ids, emb.status))
    assert status["bad-corrupt"] == "text_only" and status["i000"] == "embedded"
    # second run: everything from the cache, identical vectors
    again = runner.invoke(app, ["encode", str(ds.root), "--out", str(tmp_path / "emb2"), "--device", "cpu"])
    assert again.exit_code == 0, again.output
    np.testing.assert_array_equal(ItemEmbeddings.load(tmp_path / "emb2").image, emb.image)


def test_encode_command_clean_error_for_missing_dataset(tmp_path):
    result = CliRunner().invoke(app, ["encode", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "not a kgrec dataset" in result.output


@pytest.mark.parametrize("cmd", [["encoders", "fit-clip", "--help"], ["encoders", "fit-text", "--help"], ["encode", "--help"]])
def test_help(cmd):
    result = CliRunner().invoke(app, cmd)
    assert result.exit_code == 0 and "--config" in result.output
