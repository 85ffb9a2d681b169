"""Every exception the library raises on purpose. Messages say what was wrong, where, and what to do."""
from __future__ import annotations


class KgrecError(Exception):
    """Base class of all kgrec errors."""


class ConfigError(KgrecError):
    """A configuration file, environment variable or flag is invalid."""


class DataError(KgrecError):
    """Input data cannot be read or violates the data model."""


class StrictModeError(DataError):
    """Raised by ``ingest(strict=True)`` when any row was quarantined."""


class DatasetNotFoundError(DataError):
    """A dataset directory is missing or has no manifest."""


class GraphStoreError(KgrecError):
    """A graph store operation failed."""


class Neo4jUnavailableError(GraphStoreError):
    """The Neo4j server cannot be reached or refused the credentials."""


class EncoderError(KgrecError):
    """An encoder could not be built or loaded."""


class ModelNotTrainedError(KgrecError):
    """A model was used before ``fit``."""


class BundleError(KgrecError):
    """A bundle directory is missing, incomplete or from an incompatible version."""


class UnknownIdError(KgrecError, KeyError):
    """A user or item id is not known to the model."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


def check_query_text(text: str | None, what: str) -> None:
    """Refuse a text query that was given but is empty or only whitespace (it would match arbitrary items): one
    rule and one message for the command line (``what`` = the flag) and HTTP (``what`` = the parameter; FastAPI's
    ``min_length`` counts the spaces)."""
    if text is not None and not text.strip():
        blank = "only whitespace" if text else "an empty string"
        raise DataError(f"the query is empty: {what} is {blank}; give some words to search for")
