"""Shared fixtures: real SQLite files, a real PostgreSQL database per test, real ledgers.

PostgreSQL: tests marked ``postgres`` (and the ``store`` parametrisation) use the
server on 127.0.0.1:5432, each in a fresh database created and dropped around
the test. Without a server they are skipped with the reason, unless
LEDGER_REQUIRE_POSTGRES=1 (set by .ci/run), which turns the skip into a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from ledger.ledger import Ledger
from ledger.settings import Settings

PG_HOST = os.environ.get("LEDGER_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("LEDGER_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("LEDGER_TEST_PG_USER", "postgres")
TEST_MASTER_KEY = "a" * 64  # hex of 32 bytes: tests must not depend on a key file


def _admin() -> psycopg.Connection:
    return psycopg.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", autocommit=True,
        connect_timeout=3,
    )


@pytest.fixture(scope="session")
def postgres_available() -> bool:
    try:
        with _admin() as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError as exc:
        reason = f"PostgreSQL is not reachable on {PG_HOST}:{PG_PORT} ({exc})".strip()
        if os.environ.get("LEDGER_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{reason}, and LEDGER_REQUIRE_POSTGRES=1 requires it")
        pytest.skip(reason)


@pytest.fixture
def pg_url(postgres_available: bool) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test; dropped afterwards."""
    name = f"ledger_test_{uuid.uuid4().hex[:12]}"
    with _admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with _admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(store_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """Settings for a ledger in ``tmp_path``; PostgreSQL-backed when store_kind is postgres."""
    url = request.getfixturevalue("pg_url") if store_kind == "postgres" else None
    return Settings(home=tmp_path / "home", store_url=url, master_key=TEST_MASTER_KEY)


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home", master_key=TEST_MASTER_KEY)


@pytest.fixture
def ledger(settings: Settings) -> Iterator[Ledger]:
    with Ledger.open(settings) as opened:
        yield opened
