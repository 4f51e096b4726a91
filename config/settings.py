"""One typed settings object, read from ``FRACTURE_*`` environment variables.

Every setting has a documented default (see :data:`SETTINGS_DOC`, which the README's settings table and
``fracture-node config`` are built from). A bad value stops start-up with a :class:`SettingsError` whose
message names the variable.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

PREFIX = "FRACTURE_"
BUNDLED_MODEL_DIR = Path(__file__).resolve().parent.parent / "pipeline" / "models" / "bundled"
_AE_RE = re.compile(r"^[\x20-\x7e]{1,16}$")
_DEST_RE = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[A-Za-z0-9.\-:\[\]]+):(?P<port>\d{1,5})$")
MODEL_RUNTIMES = ("onnx", "numpy", "torch")  # pipeline.models.bundle.RUNTIMES (config does not import the pipeline)
_SUPPORTED_DB_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg2")


class SettingsError(ValueError):
    """A setting has a value FractureNode cannot start with; the message names the variable."""


@dataclass(frozen=True)
class Destination:
    """A DICOM node results are sent to: ``AE@host:port``."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


#: name -> (default shown to users, description). The README's settings table mirrors this.
SETTINGS_DOC: dict[str, tuple[str, str]] = {
    "DATA_DIR": ("./var", "Stored instances, generated artifacts, the SQLite file and the secret key."),
    "DATABASE_URL": (
        "sqlite:///<data dir>/fracture.db",
        "SQLAlchemy URL. Use postgresql+psycopg2://user:pass@host/db in production.",
    ),
    "HTTP_HOST": ("127.0.0.1", "Address the web portal and REST API listen on."),
    "HTTP_PORT": ("8000", "Port of the web portal and REST API."),
    "AE_TITLE": ("FRACTURENODE", "Our DICOM Application Entity title (called AE)."),
    "DICOM_HOST": ("127.0.0.1", "Address the DICOM listener binds to (0.0.0.0 for all interfaces)."),
    "DICOM_PORT": ("11112", "Port of the DICOM C-STORE/C-ECHO listener."),
    "MAX_ASSOCIATIONS": ("32", "DICOM associations served at once (one thread each); more are refused and retried."),
    "ALLOWED_CALLING_AES": ("(empty: accept any)", "Comma-separated calling AE titles allowed to associate."),
    "DESTINATIONS": ("(empty)", "Comma-separated PACS nodes results are sent to, e.g. PACS@10.0.0.5:4242."),
    "RETURN_TO_SENDER": ("false", "Send results only to the destination whose AE title sent the study."),
    "MODEL_DIR": ("(bundled models)", "Folder of model bundles (validity/, detector/, classifier/)."),
    "MODEL_RUNTIME": ("onnx", "How workers run the networks: onnx (convolutions in ONNX Runtime: no PyTorch, "
                              "analysis about 1.6 times faster than numpy), numpy (no PyTorch, about 40 MiB less "
                              "per worker) or torch."),
    "MIRROR_LOOK": ("on", "Read each image as it is and mirrored left to right and average, where the type reader's "
                          "card says so (the bundled one does): better calls and types for about a third more "
                          "analysis time. off reads once with the card's one-reading fit (calibrated too)."),
    "WORKERS": ("1", "Worker processes started by `fracture-node run`."),
    "SECRET_KEY": ("(generated, kept in <data dir>/secret_key)", "Flask session signing key."),
    "MAX_UPLOAD_MB": ("100", "Largest accepted HTTP upload or DICOM instance, in MB."),
    "STUDY_QUIET_SECONDS": ("10", "A study is reported once no new instance arrived for this long."),
    "JOB_LEASE_SECONDS": ("60", "How long a worker's claim on a job lasts before another may take it."),
    "JOB_MAX_ATTEMPTS": ("3", "Attempts before a job with transient errors is marked failed."),
    "DELIVERY_MAX_ATTEMPTS": ("8", "Attempts to deliver an object to a destination before it is failed."),
    "LOG_LEVEL": ("INFO", "Python logging level."),
    "TRUSTED_PROXIES": ("0", "Reverse proxies in front of the web service whose X-Forwarded-* headers are trusted."),
}


def _parse_port(name: str, raw: str) -> int:
    try:
        port = int(raw)
    except ValueError:
        raise SettingsError(f"{PREFIX}{name}={raw!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise SettingsError(f"{PREFIX}{name}={raw!r} is out of range (1-65535)")
    return port


def _parse_int(name: str, raw: str, minimum: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{PREFIX}{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SettingsError(f"{PREFIX}{name}={raw!r} must be at least {minimum}")
    return value


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(f"{PREFIX}{name}={raw!r} is not a boolean (true/false)")


def _parse_ae(name: str, raw: str) -> str:
    ae = raw.strip()
    if not _AE_RE.match(ae) or "\\" in ae:
        raise SettingsError(f"{PREFIX}{name}={raw!r} is not a valid AE title (1-16 printable ASCII characters)")
    return ae


def parse_destinations(raw: str, name: str = "DESTINATIONS") -> tuple[Destination, ...]:
    """Parse ``AE@host:port[,AE@host:port...]``."""
    result = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        match = _DEST_RE.match(item)
        if not match:
            raise SettingsError(f"{PREFIX}{name}: {item!r} is not of the form AE@host:port")
        port = _parse_port(name, match["port"])
        result.append(Destination(_parse_ae(name, match["ae"]), match["host"], port))
    return tuple(result)


def _check_db_url(url: str) -> str:
    scheme = urlsplit(url).scheme
    if scheme not in _SUPPORTED_DB_SCHEMES:
        raise SettingsError(
            f"{PREFIX}DATABASE_URL has unknown scheme {scheme!r}; use one of {', '.join(_SUPPORTED_DB_SCHEMES)}"
        )
    if scheme == "postgresql":
        url = "postgresql+psycopg2" + url[len("postgresql") :]
    return url


def mask_url(url: str) -> str:
    """Hide the password of a database URL."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("./var")
    database_url: str = ""
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    ae_title: str = "FRACTURENODE"
    dicom_host: str = "127.0.0.1"
    dicom_port: int = 11112
    max_associations: int = 32
    allowed_calling_aes: tuple[str, ...] = ()
    destinations: tuple[Destination, ...] = ()
    return_to_sender: bool = False
    model_dir: Path = BUNDLED_MODEL_DIR
    model_runtime: str = "onnx"
    mirror_look: bool = True
    workers: int = 1
    secret_key: str = field(default="", repr=False)
    max_upload_mb: int = 100
    study_quiet_seconds: int = 10
    job_lease_seconds: int = 60
    job_max_attempts: int = 3
    delivery_max_attempts: int = 8
    log_level: str = "INFO"
    trusted_proxies: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read settings from ``env`` (default ``os.environ``); keyword overrides win (used by tests)."""
        env = os.environ if env is None else env

        def get(name: str, default: str) -> str:
            return env.get(PREFIX + name, default)

        data_dir = Path(get("DATA_DIR", "./var")).expanduser()
        db_url = get("DATABASE_URL", "") or f"sqlite:///{(data_dir / 'fracture.db').resolve()}"
        level = get("LOG_LEVEL", "INFO").upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise SettingsError(f"{PREFIX}LOG_LEVEL={level!r} is not a logging level")
        model_dir_raw = get("MODEL_DIR", "")
        runtime = get("MODEL_RUNTIME", "onnx").strip().lower()
        if runtime not in MODEL_RUNTIMES:
            raise SettingsError(f"{PREFIX}MODEL_RUNTIME={runtime!r} is not one of {', '.join(MODEL_RUNTIMES)}")
        values: dict[str, Any] = dict(
            data_dir=data_dir,
            database_url=_check_db_url(db_url),
            http_host=get("HTTP_HOST", "127.0.0.1"),
            http_port=_parse_port("HTTP_PORT", get("HTTP_PORT", "8000")),
            ae_title=_parse_ae("AE_TITLE", get("AE_TITLE", "FRACTURENODE")),
            dicom_host=get("DICOM_HOST", "127.0.0.1"),
            dicom_port=_parse_port("DICOM_PORT", get("DICOM_PORT", "11112")),
            max_associations=_parse_int("MAX_ASSOCIATIONS", get("MAX_ASSOCIATIONS", "32"), 1),
            allowed_calling_aes=tuple(
                _parse_ae("ALLOWED_CALLING_AES", a) for a in get("ALLOWED_CALLING_AES", "").split(",") if a.strip()
            ),
            destinations=parse_destinations(get("DESTINATIONS", "")),
            return_to_sender=_parse_bool("RETURN_TO_SENDER", get("RETURN_TO_SENDER", "false")),
            model_dir=Path(model_dir_raw).expanduser() if model_dir_raw else BUNDLED_MODEL_DIR,
            model_runtime=runtime,
            mirror_look=_parse_bool("MIRROR_LOOK", get("MIRROR_LOOK", "on")),
            workers=_parse_int("WORKERS", get("WORKERS", "1"), 0),
            secret_key=get("SECRET_KEY", ""),
            max_upload_mb=_parse_int("MAX_UPLOAD_MB", get("MAX_UPLOAD_MB", "100"), 1),
            study_quiet_seconds=_parse_int("STUDY_QUIET_SECONDS", get("STUDY_QUIET_SECONDS", "10"), 0),
            job_lease_seconds=_parse_int("JOB_LEASE_SECONDS", get("JOB_LEASE_SECONDS", "60"), 1),
            job_max_attempts=_parse_int("JOB_MAX_ATTEMPTS", get("JOB_MAX_ATTEMPTS", "3"), 1),
            delivery_max_attempts=_parse_int("DELIVERY_MAX_ATTEMPTS", get("DELIVERY_MAX_ATTEMPTS", "8"), 1),
            log_level=level,
            trusted_proxies=_parse_int("TRUSTED_PROXIES", get("TRUSTED_PROXIES", "0"), 0),
        )
        values.update(overrides)
        return cls(**values)

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024

    @property
    def storage_dir(self) -> Path:
        """Where received instances are stored (content-addressed)."""
        return self.data_dir / "instances"

    @property
    def artifact_dir(self) -> Path:
        """Where generated heatmaps, SC and SR objects are written."""
        return self.data_dir / "artifacts"

    def ensure_dirs(self) -> None:
        for path in (self.data_dir, self.storage_dir, self.artifact_dir, self.data_dir / "tmp"):
            path.mkdir(parents=True, exist_ok=True)

    def with_secret_key(self) -> Settings:
        """Return settings whose secret key is set: the configured one, else one persisted in the data dir."""
        if self.secret_key:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        key_file = self.data_dir / "secret_key"
        if key_file.exists():
            key = key_file.read_text().strip()
        else:
            key = secrets.token_urlsafe(48)
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(key)
        return replace(self, secret_key=key)

    def describe(self) -> dict[str, str]:
        """Effective settings as ``FRACTURE_*`` names and printable values, secrets masked."""
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "secret_key":
                shown = "***" if value else "(unset: generated in data dir)"
            elif f.name == "database_url":
                shown = mask_url(value)
            elif isinstance(value, tuple):
                shown = ",".join(str(v) for v in value)
            else:
                shown = str(value)
            out[PREFIX + f.name.upper()] = shown
        return out
