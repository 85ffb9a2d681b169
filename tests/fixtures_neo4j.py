"""The real Neo4j server fixture (owned by kg/).

``neo4j_server`` (session): fetches the Neo4j jars with Maven on first use (cached under
``${KGREC_CACHE_DIR:-~/.cache/kgrec}``) and starts one server for the whole run, with a generated password that
starts with "-".
``neo4j_store`` (function): a ``Neo4jStore`` on that server with an emptied database.

Java 17 and Maven are required: when they are missing the fixture FAILS (CI has them), it does not skip.
"""
from __future__ import annotations

import secrets
import shutil
from typing import Iterator

import pytest


@pytest.fixture(scope="session")
def neo4j_server() -> Iterator["Neo4jServer"]:  # noqa: F821
    from kg.neo4j_server import Neo4jServer

    missing = [tool for tool in ("java", "mvn") if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"the Neo4j tests need {' and '.join(missing)} on PATH (OpenJDK 17 + Maven 3.8: "
            "apt-get install openjdk-17-jre-headless maven); they start a real Neo4j server",
            pytrace=False,
        )
    # A password that starts with "-": generated ones do 1 time in 64 (token_urlsafe), and neo4j-admin once read
    # such a password as an option and refused to start; every run now exercises that case.
    server = Neo4jServer(heap="768m", password="-" + secrets.token_urlsafe(18))
    try:
        server.start()
    except Exception as exc:  # show why (the server log tail is in the message) and fail loudly
        server.stop()
        pytest.fail(f"could not start the test Neo4j server: {exc}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def neo4j_store(neo4j_server) -> Iterator["Neo4jStore"]:  # noqa: F821
    from kg.neo4j_store import Neo4jStore

    store = Neo4jStore(neo4j_server.uri, neo4j_server.user, neo4j_server.password,
                       batch_size=2_000, max_retry_time_s=5.0, progress=False)
    store.clear()
    yield store
    store.close()
