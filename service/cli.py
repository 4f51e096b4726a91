"""The ``fracture-node`` command line.

``run`` starts the whole node on the embedded default (migrate, web server, DICOM listener, workers);
``web``, ``listen`` and ``work`` start one part each so a deployment can scale them separately. Commands
that live with their subsystem (``synth``, ``train``, ``jobs``...) are imported only when called; one
whose subsystem is not built yet says so and exits with status 2.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from typing import Any

import click

from config import Settings, SettingsError

log = logging.getLogger("fracture_node")

#: command name -> "module:attribute" of a click command, imported on first use.
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("pipeline.synth.cli:synth", "Generate synthetic radiographs with ground truth."),
    "altsim": ("pipeline.altsim.cli:altsim", "Generate radiographs with a second, independently written simulator."),
    "train": ("pipeline.training.cli:train", "Train a model bundle."),
    "recalibrate": ("pipeline.training.cli:recalibrate", "Refit a type reader behind another detector."),
    "average": ("pipeline.training.cli:average", "Average sibling bundles' weights into one network."),
    "evaluate": ("pipeline.evaluation.cli:evaluate", "Evaluate model bundles on a labelled folder."),
    "analyze": ("pipeline.cli_analyze:analyze", "Run the whole pipeline on local files."),
    "work": ("service.worker:work", "Run a job worker."),
    "jobs": ("service.jobs_cli:jobs", "Inspect and retry processing jobs."),
    "deliveries": ("service.deliveries_cli:deliveries", "Inspect and retry deliveries to PACS."),
    "feedback": ("service.feedback_cli:feedback", "Export clinician feedback as a labelled dataset."),
}


def _not_built(name: str, target: str, reason: str) -> click.Command:
    @click.command(name=name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
                   help=f"(not built yet) {LAZY_COMMANDS[name][1]}")
    def stub(**_: Any) -> None:
        click.echo(f"fracture-node {name}: this part of FractureNode is not built yet ({target}: {reason}).",
                   err=True)
        sys.exit(2)

    return stub


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in LAZY_COMMANDS:
            return super().get_command(ctx, cmd_name)
        target, _help = LAZY_COMMANDS[cmd_name]
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only a missing *subsystem* means "not built"; a missing third-party module is a real error.
            if exc.name and module_name.startswith(exc.name) or exc.name == module_name:
                return _not_built(cmd_name, target, "module missing")
            raise
        command = getattr(module, attr, None)
        if not isinstance(command, click.Command):
            return _not_built(cmd_name, target, "command missing")
        return command


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def load_settings() -> Settings:
    """Settings from the environment; a bad value stops the command with a message naming the variable."""
    try:
        return Settings.from_env()
    except SettingsError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None


def log_settings(settings: Settings) -> None:
    for name, value in settings.describe().items():
        log.info("setting %s=%s", name, value)


def migrate(settings: Settings) -> None:
    from service.db import upgrade

    settings.ensure_dirs()
    upgrade(settings.database_url)


def migrate_in_child(first_admin: bool = False) -> None:
    """``fracture-node db upgrade`` in a child process (same environment, so the same settings): for a
    long-lived process that should not keep SQLAlchemy, Alembic and the models imported just to migrate.
    With ``first_admin``, the child also creates the first admin on a new database (``--first-admin``)."""
    import subprocess

    command = [sys.executable, "-m", "service.cli", "db", "upgrade", *(["--first-admin"] if first_admin else [])]
    done = subprocess.run(command, check=False)
    if done.returncode != 0:
        what = "database migration or first-admin creation" if first_admin else "database migration"
        raise click.ClickException(f"{what} failed (status {done.returncode}; its message is above)")


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fracture-node")
def cli() -> None:
    """FractureNode: a DICOM node and web service that flags bone fractures on radiographs.

    Research use only. Not for diagnostic use.
    """


# ------------------------------------------------------------------------------------------ run parts


@cli.command()
@click.option("--workers", type=int, default=None, help="Worker processes (default FRACTURE_WORKERS).")
@click.option("--no-web", is_flag=True, help="Do not start the web server.")
@click.option("--no-listen", is_flag=True, help="Do not start the DICOM listener.")
def run(workers: int | None, no_web: bool, no_listen: bool) -> None:
    """Start the whole node: migrate, web server, DICOM listener and workers. Ctrl-C stops it all."""
    from service.node import supervise

    settings = load_settings()
    configure_logging(settings.log_level)
    log_settings(settings)
    # Migration and the first admin in a child: the supervisor lives as long as the node, and would otherwise
    # keep SQLAlchemy, Alembic and the password hasher resident (about 45 MB, measured for issue #9).
    migrate_in_child(first_admin=True)
    parts = [] if no_web else ["web"]
    parts += [] if no_listen else ["listen"]
    parts += ["work"] * (settings.workers if workers is None else workers)
    sys.exit(supervise(parts))


@cli.command()
@click.option("--threads", type=int, default=8, show_default=True, help="Request threads.")
def web(threads: int) -> None:
    """Serve the web portal and REST API with gunicorn."""
    from service.node import serve_web

    settings = load_settings()
    configure_logging(settings.log_level)
    migrate_in_child()  # the gunicorn master this process becomes need not hold the database layer
    serve_web(settings, threads=threads)


@cli.command()
def listen() -> None:
    """Run the DICOM listener (C-ECHO, C-STORE)."""
    from service.node import serve_dicom

    settings = load_settings()
    configure_logging(settings.log_level)
    migrate_in_child()
    serve_dicom(settings)


# -------------------------------------------------------------------------------------------- database


@cli.group()
def db() -> None:
    """Database migrations."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@click.option("--first-admin", is_flag=True,
              help="On a new database also create the first admin, as `run` does (password from "
                   "FRACTURE_ADMIN_PASSWORD, else generated and printed once).")
def db_upgrade(revision: str, first_admin: bool) -> None:
    """Migrate the database to the latest schema."""
    from service.db import current_revision, upgrade

    settings = load_settings()
    configure_logging(settings.log_level)
    settings.ensure_dirs()
    upgrade(settings.database_url, revision)
    click.echo(f"database at revision {current_revision(settings.database_url)}")
    if first_admin:
        from service.auth import AuthError
        from service.node import bootstrap

        try:
            bootstrap(settings)
        except AuthError as exc:
            raise click.ClickException(f"cannot create the first admin: {exc} (FRACTURE_ADMIN_PASSWORD)") from None


@db.command("downgrade")
@click.option("--revision", default="base", show_default=True)
@click.confirmation_option(prompt="This drops tables and their data. Continue?")
def db_downgrade(revision: str) -> None:
    """Migrate the database down (drops data)."""
    from service.db import downgrade

    downgrade(load_settings().database_url, revision)


@db.command("current")
def db_current() -> None:
    """Print the database's schema revision."""
    from service.db import current_revision

    click.echo(current_revision(load_settings().database_url) or "(empty database)")


# --------------------------------------------------------------------------------------- users & keys


def _database() -> Any:
    from service.db import Database

    settings = load_settings()
    migrate(settings)
    return Database.from_settings(settings)


@cli.group()
def users() -> None:
    """Portal users (clinicians and admins)."""


@users.command("add")
@click.argument("username")
@click.option("--role", type=click.Choice(["clinician", "admin", "service"]), default="clinician",
              show_default=True)
@click.option("--display-name", default="")
@click.option("--referring-physician-name", default=None,
              help="DICOM Referring Physician's Name (e.g. 'Smith^Jane') whose studies this user sees.")
@click.option("--password-env", default=None, metavar="VAR",
              help="Read the password from this environment variable (default: generate and print it).")
def users_add(username: str, role: str, display_name: str, referring_physician_name: str | None,
              password_env: str | None) -> None:
    """Create a user; the generated password is printed once."""
    from service.audit import audit
    from service.auth import AuthError, create_user, generate_password

    if password_env:
        password = os.environ.get(password_env, "")
        if not password:
            raise click.ClickException(f"environment variable {password_env} is empty")
        generated = False
    else:
        password, generated = generate_password(), True
    database = _database()
    try:
        with database.session() as session:
            create_user(session, username, password, role=role, display_name=display_name,
                        referring_physician_name=referring_physician_name)
            audit(session, actor_type="system", actor="cli", action="user.create", object_type="user",
                  object_id=username, detail={"role": role})
    except AuthError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"created {role} {username!r}")
    if generated:
        click.echo(f"password (shown once): {password}")


@users.command("list")
def users_list() -> None:
    """List users."""
    from sqlalchemy import select

    from service.models import User

    with _database().session() as session:
        for user in session.scalars(select(User).order_by(User.id)):
            state = "active" if user.is_active else "disabled"
            click.echo(f"{user.id:4d}  {user.username:20s} {user.role:10s} {state:9s} "
                       f"{user.referring_physician_name or ''}")


@users.command("disable")
@click.argument("username")
def users_disable(username: str) -> None:
    """Disable a user (their sessions and API keys stop working)."""
    from sqlalchemy import select

    from service.audit import audit
    from service.models import User

    with _database().session() as session:
        user = session.scalar(select(User).where(User.username == username))
        if user is None:
            raise click.ClickException(f"no user {username!r}")
        user.is_active = False
        audit(session, actor_type="system", actor="cli", action="user.disable", object_type="user",
              object_id=username)
    click.echo(f"disabled {username!r}")


@cli.group()
def apikeys() -> None:
    """API keys for integrators."""


@apikeys.command("create")
@click.option("--user", "username", required=True, help="User (or service account) the key acts as.")
@click.option("--name", required=True, help="What the key is for, e.g. 'RIS bridge'.")
def apikeys_create(username: str, name: str) -> None:
    """Create an API key; it is printed once and stored only as a hash."""
    from sqlalchemy import select

    from service.audit import audit
    from service.auth import create_api_key
    from service.models import User

    with _database().session() as session:
        user = session.scalar(select(User).where(User.username == username))
        if user is None:
            raise click.ClickException(f"no user {username!r}")
        key, plaintext = create_api_key(session, user, name)
        audit(session, actor_type="system", actor="cli", action="apikey.create", object_type="api_key",
              object_id=key.prefix, detail={"user": username, "name": name})
    click.echo(f"API key for {username!r} ({name}), shown once:\n{plaintext}")


@apikeys.command("revoke")
@click.argument("prefix")
def apikeys_revoke(prefix: str) -> None:
    """Revoke the key whose prefix (the 8 characters after 'fn_') is PREFIX."""
    from service.audit import audit
    from service.auth import AuthError, revoke_api_key

    try:
        with _database().session() as session:
            revoke_api_key(session, prefix)
            audit(session, actor_type="system", actor="cli", action="apikey.revoke", object_type="api_key",
                  object_id=prefix)
    except AuthError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"revoked {prefix}")


@apikeys.command("list")
def apikeys_list() -> None:
    """List API keys (prefix, owner, state, last use)."""
    from sqlalchemy import select

    from service.models import ApiKey

    with _database().session() as session:
        for key in session.scalars(select(ApiKey).order_by(ApiKey.id)):
            state = "revoked" if key.revoked_at else "active"
            click.echo(f"{key.prefix}  {key.user.username:20s} {state:8s} {key.name:30s} "
                       f"last used {key.last_used_at or 'never'}")


# --------------------------------------------------------------------------------------------- config


@cli.command("config")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def config_cmd(as_json: bool) -> None:
    """Print the effective settings (secrets masked)."""
    described = load_settings().describe()
    if as_json:
        click.echo(json.dumps(described, indent=2))
    else:
        for name, value in described.items():
            click.echo(f"{name}={value}")


def main() -> None:
    cli(prog_name="fracture-node")


if __name__ == "__main__":
    main()
