"""The ``kgrec`` command line. Each group of commands lives in ``kgrec/commands/<topic>.py`` and registers itself
here, so that stages can be wired independently."""
from __future__ import annotations

import logging
import warnings

import typer

app = typer.Typer(
    name="kgrec",
    help="Knowledge-graph-enhanced multimodal recommender for e-commerce catalogs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level.")) -> None:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)  # no-op when main() configured it
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.INFO)


def main() -> None:
    """The ``kgrec`` script: log lines go through tqdm, so they print above a running progress bar instead of being
    glued onto it."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    # torch_geometric scripts a class with torch.jit.script when it is imported, which recent torch marks
    # deprecated: a warning about PyG's code that a command's user can do nothing about, so the script hides it
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    with logging_redirect_tqdm():
        app()


def _register() -> None:
    import importlib
    import pkgutil

    import kgrec.commands as commands

    for mod in sorted(m.name for m in pkgutil.iter_modules(commands.__path__)):
        module = importlib.import_module(f"kgrec.commands.{mod}")
        module.register(app)


_register()

if __name__ == "__main__":  # pragma: no cover
    main()
