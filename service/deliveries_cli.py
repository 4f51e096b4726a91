"""``fracture-node deliveries``: what was sent where, and resending what failed."""

from __future__ import annotations

import click
from sqlalchemy import select

from service.cli import load_settings, migrate
from service.db import Database
from service.delivery import retry
from service.models import Artifact, Delivery, Study


def _database() -> Database:
    settings = load_settings()
    migrate(settings)
    return Database.from_settings(settings)


@click.group()
def deliveries() -> None:
    """Inspect and retry deliveries of results to PACS nodes."""


@deliveries.command("list")
@click.option("--state", type=click.Choice(["pending", "sending", "retrying", "delivered", "failed"]),
              help="Only deliveries in this state.")
@click.option("--limit", type=int, default=100, show_default=True)
def list_deliveries(state: str | None, limit: int) -> None:
    """List deliveries, newest first: id, state, attempts, destination, object, last status and error."""
    db = _database()
    try:
        with db.session() as session:
            query = (select(Delivery, Artifact.kind, Artifact.sop_instance_uid, Study.study_instance_uid)
                     .join(Artifact, Artifact.id == Delivery.artifact_pk).join(Study, Study.id == Artifact.study_pk)
                     .order_by(Delivery.id.desc()).limit(limit))
            if state:
                query = query.where(Delivery.state == state)
            rows = session.execute(query).all()
        click.echo(f"{'id':>6}  {'state':<9} {'tries':>5}  {'destination':<32} {'kind':<4} {'status':<7} "
                   "study / object / error")
        for delivery, kind, sop_uid, study_uid in rows:
            status = "" if delivery.last_status is None else f"0x{delivery.last_status:04X}"
            click.echo(f"{delivery.id:>6}  {delivery.state:<9} {delivery.attempts:>5}  {delivery.destination:<32} "
                       f"{kind:<4} {status:<7} {study_uid} / {sop_uid}"
                       + (f" / {delivery.last_error}" if delivery.last_error else ""))
    finally:
        db.dispose()


@deliveries.command("retry")
@click.argument("delivery_id", type=int, required=False)
@click.option("--failed", "all_failed", is_flag=True, help="Retry every failed delivery.")
def retry_deliveries(delivery_id: int | None, all_failed: bool) -> None:
    """Send again: one delivery by ID, or every failed one (--failed). Delivered objects are never resent."""
    if (delivery_id is None) == (not all_failed):
        raise click.UsageError("give a delivery ID or --failed (not both)")
    db = _database()
    try:
        count = retry(db, delivery_id=delivery_id, failed=all_failed)
    finally:
        db.dispose()
    if delivery_id is not None and count == 0:
        raise click.ClickException(f"delivery {delivery_id} does not exist, is being sent, or was delivered")
    click.echo(f"{count} deliveries queued to be sent again")
