"""Shared CLI helpers: config loading and turning library errors into clean exits."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import typer

from kgrec.config import Config
from kgrec.errors import KgrecError

CONFIG_OPTION = typer.Option(None, "--config", "-c", help="YAML config file (see README: Configuration).")


def register(app: typer.Typer) -> None:  # this module holds helpers only
    return None


def load_config(path: Path | None, **overrides: Any) -> Config:
    return Config.load(path, overrides=overrides)


def clean_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a KgrecError as one red line and exit 2, instead of a stack trace."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KgrecError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from exc

    return wrapper
