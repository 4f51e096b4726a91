"""``fracture-node jobs``: operators inspect and retry processing jobs."""

from __future__ import annotations

from typing import Any

import click


def _database() -> Any:
    from service.cli import _database as database

    return database()


@click.group()
def jobs() -> None:
    """Inspect and retry processing jobs."""


@jobs.command("list")
@click.option("--state", type=click.Choice(["received", "queued", "processing", "done", "rejected", "failed"]),
              default=None, help="Only jobs in this state.")
@click.option("--limit", type=int, default=50, show_default=True)
def list_cmd(state: str | None, limit: int) -> None:
    """Latest jobs: id, state, attempts, SOP Instance UID, times, reason or error."""
    from sqlalchemy import select

    from service.jobs import counts, list_jobs
    from service.models import Instance

    db = _database()
    try:
        rows = list_jobs(db, state=state, limit=limit)
        with db.session() as session:
            uids = dict(session.execute(select(Instance.id, Instance.sop_instance_uid)
                                        .where(Instance.id.in_([j.instance_pk for j in rows]))).all())
        click.echo(f"{'id':>6}  {'state':10s} {'tries':5s} {'updated (UTC)':19s}  sop instance uid / detail")
        for job in rows:
            detail = job.error if job.state == "failed" else job.reason
            tries = f"{job.attempts}/{job.max_attempts}"
            click.echo(f"{job.id:6d}  {job.state:10s} {tries:5s} {job.updated_at:%Y-%m-%d %H:%M:%S}  "
                       f"{uids.get(job.instance_pk, '?')}" + (f"\n{'':8s}{detail}" if detail else ""))
        summary = counts(db)
        click.echo("total: " + (", ".join(f"{n} {s}" for s, n in sorted(summary.items())) or "no jobs"))
    finally:
        db.dispose()


@jobs.command("retry")
@click.argument("job_id", type=int)
def retry_cmd(job_id: int) -> None:
    """Send job JOB_ID (done, rejected or failed) back to the queue."""
    from service.jobs import JobError, retry_job

    db = _database()
    try:
        retry_job(db, job_id, actor="cli")
    except JobError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        db.dispose()
    click.echo(f"job {job_id} queued")


@jobs.command("requeue-failed")
def requeue_failed_cmd() -> None:
    """Send every failed job back to the queue."""
    from service.jobs import requeue_failed

    db = _database()
    try:
        n = requeue_failed(db, actor="cli")
    finally:
        db.dispose()
    click.echo(f"{n} failed job(s) queued")
