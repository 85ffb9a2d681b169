"""``kgrec serve``: the HTTP service and web page over a trained bundle."""
from __future__ import annotations

from pathlib import Path

import typer

from kgrec.commands._common import CONFIG_OPTION, clean_errors, load_config


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


@clean_errors
def serve(
    bundle: Path = typer.Option(Path("bundle"), "--bundle", "-b", help="Bundle directory written by `kgrec train`."),
    host: str | None = typer.Option(None, "--host", help="Address to bind (serve.host; default 127.0.0.1, loopback only)."),
    port: int | None = typer.Option(None, "--port", "-p", min=0, max=65535, help="TCP port (serve.port; default 8000)."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Serve recommend / search / similar / explain / items over HTTP, with a web page at / and docs at /docs."""
    import uvicorn

    from kgrec.pipeline import Recommender
    from kgrec.serve.app import create_app

    cfg = load_config(config, **{"serve.host": host, "serve.port": port})
    if cfg.serve.torch_threads > 0:
        import torch

        torch.set_num_threads(cfg.serve.torch_threads)
    typer.echo(f"loading bundle {bundle} ...")
    rec = Recommender.load(bundle)
    app = create_app(rec, cfg)
    typer.echo(f"serving {rec!r} on http://{cfg.serve.host}:{cfg.serve.port}/  (API docs: /docs)")
    uvicorn.run(app, host=cfg.serve.host, port=cfg.serve.port, log_level=log_level, access_log=False)
