"""Shared fixtures: real databases (a SQLite file and a PostgreSQL database per test), settings with free
ports, and the Flask ``app`` / ``client`` / ``runner`` trio.

Every test that asks for ``database_url`` runs once on SQLite and once on PostgreSQL. The PostgreSQL server
comes from ``FRACTURE_TEST_POSTGRES_URL`` (default ``postgresql+psycopg2://postgres@127.0.0.1:5432/postgres``);
when it cannot be reached those tests are skipped and the run says so at the end, unless
``FRACTURE_REQUIRE_POSTGRES=1`` (set by CI) turns that into a failure.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from config import Settings

PG_ADMIN_URL = os.environ.get(
    "FRACTURE_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
_pg_state: dict[str, str | None] = {}


def _postgres_problem() -> str | None:
    """None when the PostgreSQL server is reachable, else why not (checked once per run)."""
    if "problem" not in _pg_state:
        try:
            engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            engine.dispose()
            _pg_state["problem"] = None
        except Exception as exc:  # noqa: BLE001 - any failure means "not available"
            _pg_state["problem"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return _pg_state["problem"]


def require_postgres() -> None:
    problem = _postgres_problem()
    if problem is None:
        return
    message = f"PostgreSQL not reachable at {make_url(PG_ADMIN_URL).render_as_string()} ({problem})"
    if os.environ.get("FRACTURE_REQUIRE_POSTGRES") == "1":
        pytest.fail(message + " and FRACTURE_REQUIRE_POSTGRES=1")
    pytest.skip(message + "; set FRACTURE_TEST_POSTGRES_URL to run the PostgreSQL tests")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped after the test."""
    require_postgres()
    name = f"fn_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fracture.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """An empty database on each engine in turn."""
    fixture = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(fixture))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    """Settings for one test: its own data dir, database and free ports; the database is migrated."""
    from service.db import upgrade

    upgrade(database_url)
    return Settings.from_env(
        {}, data_dir=tmp_path / "var", database_url=database_url, http_port=free_port(),
        dicom_port=free_port(), secret_key="test-secret-key", study_quiet_seconds=0, job_lease_seconds=5,
    )


@pytest.fixture
def app(settings: Settings):  # type: ignore[no-untyped-def]
    from service.app import create_app

    application = create_app(settings)
    application.config["TESTING"] = True
    yield application
    application.extensions["fracture.db"].dispose()


@pytest.fixture
def client(app):  # type: ignore[no-untyped-def]
    return app.test_client()


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # type: ignore[no-untyped-def]
    problem = _pg_state.get("problem")
    if problem:
        terminalreporter.write_line(
            f"NOTE: PostgreSQL tests were SKIPPED ({problem}). Start PostgreSQL or set "
            "FRACTURE_TEST_POSTGRES_URL=postgresql+psycopg2://user@host:port/postgres to run them.",
            yellow=True,
        )
