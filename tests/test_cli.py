"""The command line, run through click's runner against a real database."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from service import cli as cli_module
from service.cli import cli


@pytest.fixture
def env(tmp_path: Path, database_url: str) -> dict[str, str]:
    return {"FRACTURE_DATA_DIR": str(tmp_path / "var"), "FRACTURE_DATABASE_URL": database_url}


def test_db_upgrade_on_a_new_database(env: dict[str, str]) -> None:
    result = CliRunner().invoke(cli, ["db", "upgrade"], env=env)
    assert result.exit_code == 0, result.output
    assert "database at revision 0001" in result.output
    result = CliRunner().invoke(cli, ["db", "current"], env=env)
    assert result.output.strip() == "0001"


def test_db_upgrade_first_admin_once_with_a_clear_error_for_a_weak_password(env: dict[str, str]) -> None:
    """What `fracture-node run` runs in a child before it starts the node's parts."""
    weak = CliRunner().invoke(cli, ["db", "upgrade", "--first-admin"], env={**env, "FRACTURE_ADMIN_PASSWORD": "short"})
    assert weak.exit_code == 1
    assert "cannot create the first admin: password must be at least" in weak.output
    good = {**env, "FRACTURE_ADMIN_PASSWORD": "a long enough password"}
    first = CliRunner().invoke(cli, ["db", "upgrade", "--first-admin"], env=good)
    assert first.exit_code == 0, first.output
    assert "created first admin user 'admin'" in first.output
    again = CliRunner().invoke(cli, ["db", "upgrade", "--first-admin"], env=good)
    assert again.exit_code == 0 and "created first admin" not in again.output
    assert "admin" in CliRunner().invoke(cli, ["users", "list"], env=env).output


def test_users_and_api_keys(env: dict[str, str]) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["users", "add", "drhouse", "--role", "admin"], env=env)
    assert result.exit_code == 0, result.output
    assert "password (shown once): " in result.output
    env_pw = {**env, "NEW_PW": "a long enough password"}
    result = runner.invoke(cli, ["users", "add", "jdoe", "--password-env", "NEW_PW",
                                 "--referring-physician-name", "Doe^Jane"], env=env_pw)
    assert result.exit_code == 0 and "shown once" not in result.output
    result = runner.invoke(cli, ["users", "add", "jdoe", "--password-env", "NEW_PW"], env=env_pw)
    assert result.exit_code == 1 and "already exists" in result.output
    result = runner.invoke(cli, ["apikeys", "create", "--user", "jdoe", "--name", "RIS"], env=env)
    assert result.exit_code == 0, result.output
    key = result.output.strip().splitlines()[-1]
    assert key.startswith("fn_")
    prefix = key[3:11]
    listing = runner.invoke(cli, ["apikeys", "list"], env=env).output
    assert prefix in listing and "active" in listing and key not in listing
    assert runner.invoke(cli, ["apikeys", "revoke", prefix], env=env).exit_code == 0
    assert "revoked" in runner.invoke(cli, ["apikeys", "list"], env=env).output
    assert runner.invoke(cli, ["users", "disable", "jdoe"], env=env).exit_code == 0
    listing = runner.invoke(cli, ["users", "list"], env=env).output
    assert "drhouse" in listing and "disabled" in listing
    assert runner.invoke(cli, ["users", "disable", "nobody"], env=env).exit_code == 1


def test_config_prints_effective_settings_with_secrets_masked(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["config"], env={
        "FRACTURE_DATA_DIR": str(tmp_path), "FRACTURE_SECRET_KEY": "s3cr3t-value",
        "FRACTURE_DATABASE_URL": "postgresql://fn:hunter2@db.internal/fracture"})
    assert result.exit_code == 0
    assert "FRACTURE_SECRET_KEY=***" in result.output
    assert "s3cr3t-value" not in result.output and "hunter2" not in result.output


def test_bad_setting_stops_with_the_variable_named(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["db", "upgrade"], env={"FRACTURE_DICOM_PORT": "0",
                                                             "FRACTURE_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 1
    assert "FRACTURE_DICOM_PORT" in result.output


def test_a_part_not_built_says_so_and_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli_module.LAZY_COMMANDS, "future", ("service.not_written_yet:future", "Later."))
    result = CliRunner().invoke(cli, ["future", "--anything"])
    assert result.exit_code == 2
    assert "not built yet" in result.output
