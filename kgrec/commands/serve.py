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
    workers: int | None = typer.Option(
        None, "--workers", "-w", min=1, max=64,
        help="Server processes (serve.workers; default 1). Each loads the bundle: memory grows with N. "
             "Use about one per core that serving may use."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Serve recommend / search / similar / explain / items over HTTP, with a web page at / and docs at /docs."""
    import os

    import uvicorn

    from kgrec.errors import BundleError
    from kgrec.serve.app import ENV_BUNDLE, ENV_CONFIG, create_app, freeze_loaded_objects, limit_threads

    cfg = load_config(config, **{"serve.host": host, "serve.port": port, "serve.workers": workers})
    if not (bundle / "manifest.json").is_file():
        raise BundleError(f"{bundle} is not a bundle (no manifest.json); train one with `kgrec train`")
    if cfg.serve.workers > 1:
        # each worker process builds its own app from the environment (kgrec.serve.app.app_from_env)
        os.environ[ENV_BUNDLE] = str(bundle.resolve())
        os.environ[ENV_CONFIG] = cfg.to_yaml()
        typer.echo(f"serving {bundle} with {cfg.serve.workers} worker processes on "
                   f"http://{cfg.serve.host}:{cfg.serve.port}/  (API docs: /docs)")
        from kgrec.serve.workers import reuseport_supported, serve_workers

        if reuseport_supported():  # one listening socket per worker: connections spread over the workers
            raise typer.Exit(serve_workers(cfg.serve.workers, cfg.serve.host, cfg.serve.port, log_level=log_level,
                                             balance=cfg.serve.balance_connections))
        uvicorn.run("kgrec.serve.app:app_from_env", factory=True, host=cfg.serve.host, port=cfg.serve.port,
                    workers=cfg.serve.workers, log_level=log_level, access_log=False)
        return
    from kgrec.pipeline import Recommender

    limit_threads(cfg.serve.torch_threads)
    typer.echo(f"loading bundle {bundle} ...")
    rec = Recommender.load(bundle)
    app = create_app(rec, cfg)
    freeze_loaded_objects()
    typer.echo(f"serving {rec!r} on http://{cfg.serve.host}:{cfg.serve.port}/  (API docs: /docs)")
    uvicorn.run(app, host=cfg.serve.host, port=cfg.serve.port, log_level=log_level, access_log=False)
