from pathlib import Path

import pytest

from config import Destination, Settings, SettingsError
from config.settings import BUNDLED_MODEL_DIR, SETTINGS_DOC


def test_defaults_are_the_embedded_node(tmp_path: Path) -> None:
    s = Settings.from_env({"FRACTURE_DATA_DIR": str(tmp_path)})
    assert s.database_url == f"sqlite:///{(tmp_path / 'fracture.db').resolve()}"
    assert (s.http_host, s.http_port) == ("127.0.0.1", 8000)
    assert (s.ae_title, s.dicom_port) == ("FRACTURENODE", 11112)
    assert s.allowed_calling_aes == () and s.destinations == ()
    assert s.model_dir == BUNDLED_MODEL_DIR
    assert s.max_upload_bytes == 100 * 1024 * 1024
    assert s.mirror_look is True  # as the reader's card says (the bundled one reads every image twice)
    assert Settings.from_env({"FRACTURE_DATA_DIR": str(tmp_path), "FRACTURE_MIRROR_LOOK": "off"}).mirror_look is False


def test_every_setting_is_documented() -> None:
    names = {name.removeprefix("FRACTURE_") for name in Settings.from_env({}).describe()}
    assert names == set(SETTINGS_DOC)


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("HTTP_PORT", "99999", "out of range"),
        ("DICOM_PORT", "abc", "not a port number"),
        ("DESTINATIONS", "PACS@host", "AE@host:port"),
        ("DESTINATIONS", "PACS@127.0.0.1:0", "out of range"),
        ("DATABASE_URL", "mysql://root@localhost/db", "unknown scheme"),
        ("AE_TITLE", "THIS_AE_TITLE_IS_TOO_LONG", "not a valid AE title"),
        ("WORKERS", "-1", "at least 0"),
        ("RETURN_TO_SENDER", "maybe", "not a boolean"),
        ("MIRROR_LOOK", "twice", "not a boolean"),
        ("LOG_LEVEL", "LOUD", "not a logging level"),
    ],
)
def test_bad_value_names_the_variable(name: str, value: str, fragment: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({f"FRACTURE_{name}": value})
    assert f"FRACTURE_{name}" in str(info.value)
    assert fragment in str(info.value)


def test_destinations_are_parsed() -> None:
    s = Settings.from_env({"FRACTURE_DESTINATIONS": "PACS@127.0.0.1:4242, ARCHIVE@pacs.example.org:104"})
    assert s.destinations == (Destination("PACS", "127.0.0.1", 4242),
                              Destination("ARCHIVE", "pacs.example.org", 104))
    assert str(s.destinations[0]) == "PACS@127.0.0.1:4242"


def test_postgresql_scheme_uses_psycopg2() -> None:
    s = Settings.from_env({"FRACTURE_DATABASE_URL": "postgresql://u:secret@db/fracture"})
    assert s.database_url == "postgresql+psycopg2://u:secret@db/fracture"
    described = s.describe()
    assert "secret" not in described["FRACTURE_DATABASE_URL"]
    assert described["FRACTURE_DATABASE_URL"] == "postgresql+psycopg2://u:***@db/fracture"


def test_secret_key_is_generated_once_and_persisted(tmp_path: Path) -> None:
    s = Settings.from_env({"FRACTURE_DATA_DIR": str(tmp_path)})
    first = s.with_secret_key()
    second = Settings.from_env({"FRACTURE_DATA_DIR": str(tmp_path)}).with_secret_key()
    assert len(first.secret_key) >= 40 and first.secret_key == second.secret_key
    assert (tmp_path / "secret_key").stat().st_mode & 0o077 == 0
    other = Settings.from_env({"FRACTURE_DATA_DIR": str(tmp_path / "other")}).with_secret_key()
    assert other.secret_key != first.secret_key
    assert first.describe()["FRACTURE_SECRET_KEY"] == "***"
    assert first.secret_key not in repr(first)
