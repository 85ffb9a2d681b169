"""CLI: the same command selects the engine; both engines give the same counts and vectors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from typer.testing import CliRunner

from kgrec.cli import app

runner = CliRunner()


def test_validate_events_local_and_dask_agree(demo_dataset, tmp_path: Path) -> None:
    events = pq.read_table(demo_dataset.root / "events.parquet")
    raw = tmp_path / "raw_events.parquet"
    pq.write_table(events, raw, row_group_size=max(1, events.num_rows // 3))
    outs = {}
    for engine in ("local", "dask"):
        res = runner.invoke(app, ["validate-events", str(raw), "--dataset", str(demo_dataset.root), "--engine", engine,
                                  "--workers", "2", "--out", str(tmp_path / f"{engine}.parquet")])
        assert res.exit_code == 0, res.output
        assert f"{events.num_rows:,} events read" in res.output
        outs[engine] = pq.read_table(tmp_path / f"{engine}.parquet")
    assert outs["local"].num_rows == outs["dask"].num_rows == events.num_rows  # an ingested dataset is clean
    assert sorted(map(str, outs["local"].to_pylist())) == sorted(map(str, outs["dask"].to_pylist()))


def test_relative_paths_reach_workers_that_run_elsewhere(demo_dataset, tmp_path: Path, monkeypatch) -> None:
    """Workers of a running scheduler resolve paths in their own working directory: the CLI sends absolute ones."""
    from distributed import LocalCluster

    events = pq.read_table(demo_dataset.root / "events.parquet")
    pq.write_table(events, tmp_path / "raw_events.parquet")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        monkeypatch.chdir(tmp_path)  # the workers keep the directory they started in
        res = runner.invoke(app, ["validate-events", "raw_events.parquet", "--dataset", str(demo_dataset.root),
                                  "--engine", "dask", "--scheduler", cluster.scheduler_address, "--out", "v.parquet"])
        assert res.exit_code == 0, res.output
        assert pq.read_table(tmp_path / "v.parquet").num_rows == events.num_rows


def test_encode_dask_local_engine_writes_embeddings(demo_dataset, tmp_path: Path) -> None:
    from encoders.items import ItemEmbeddings

    res = runner.invoke(app, ["encode-dask", str(demo_dataset.root), "--engine", "local", "--out", str(tmp_path / "e"),
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    emb = ItemEmbeddings.load(tmp_path / "e")
    assert emb.text.shape == (len(demo_dataset.items), 384)
    np.testing.assert_allclose(np.linalg.norm(emb.text, axis=1), 1.0, atol=1e-5)


def test_unknown_engine_and_unreachable_scheduler_are_clean_errors(demo_dataset, tmp_path: Path) -> None:
    res = runner.invoke(app, ["encode-dask", str(demo_dataset.root), "--engine", "spark"])
    assert res.exit_code == 2 and "unknown engine 'spark'" in res.output
    res = runner.invoke(app, ["validate-events", str(tmp_path / "x.parquet"), "--dataset", str(demo_dataset.root),
                              "--engine", "dask", "--scheduler", "tcp://127.0.0.1:9"])
    assert res.exit_code == 2 and "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in res.output


def test_train_ddp_prints_the_torchrun_line(tmp_path: Path) -> None:
    res = runner.invoke(app, ["train-ddp", str(tmp_path / "ds"), "--out", str(tmp_path / "m"), "--nproc-per-node", "4"])
    assert res.exit_code == 0, res.output
    assert "torch.distributed.run --nproc-per-node 4 -m kgrec.distributed.ddp --dataset" in res.output


def test_distill_static_then_config_selects_it(demo_dataset, tmp_path: Path) -> None:
    """`kgrec distill-static` on the catalog's tokens writes an encoder that `encoders.text_model: static:DIR` loads."""
    from encoders.factory import text_encoder_from_config
    from encoders.items import item_text
    from encoders.static import StaticTextEncoder
    from kgrec.config import EncodersConfig

    out = tmp_path / "static"
    res = runner.invoke(app, ["distill-static", str(out), "--dataset", str(demo_dataset.root),
                              "--vocabulary", "corpus", "--pca-dims", "32"])
    assert res.exit_code == 0, res.output
    assert f"static:{out}" in res.output
    enc = text_encoder_from_config(EncodersConfig(text_model=f"static:{out}"))
    assert isinstance(enc, StaticTextEncoder) and enc.dim == 32 and enc.info["vocabulary"] == "corpus"
    texts = [item_text(r) for r in demo_dataset.items.head(50).to_dict("records")]
    v = enc.encode(texts)
    assert v.shape == (50, 32)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    # encode-dask builds its workers' encoder from the same name
    res = runner.invoke(app, ["encode-dask", str(demo_dataset.root), "--engine", "local", "--text-model",
                              f"static:{out}", "--out", str(tmp_path / "e")])
    assert res.exit_code == 0, res.output
    from encoders.items import ItemEmbeddings

    emb = ItemEmbeddings.load(tmp_path / "e")
    assert emb.text.shape == (len(demo_dataset.items), 32) and emb.model_ids["text"] == enc.model_id
    np.testing.assert_allclose(emb.text[:50], v, atol=1e-6)
