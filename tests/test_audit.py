"""Every read of patient data through the portal and the API leaves an audit row.

The routes are found from the app's URL map (every GET route that takes a study, instance, result, artifact or
job id, and the study lists), so a route added later is covered without editing this test. Each is called by
the user entitled to see the object; the number of audit rows must grow, and the new row must name who read
it. Both engines.
"""

from __future__ import annotations

from typing import Any

from flask import Flask
from sqlalchemy import func, select

from service.models import AuditEntry
from tests.test_portal_support import Portal
from tests.test_security import _fill, _ids
from tests.test_security import world as world  # noqa: F401 - the fixture, shared with the security sweep

#: Reads of patient data that are not routes with ids.
LIST_ROUTES = ["/history", "/api/v1/studies"]
#: Routes with ids that carry no patient data (answered for polling pages); each with the reason.
NOT_PATIENT_DATA: dict[str, str] = {
    "/studies/<int:study_id>/status": "polled every few seconds by the study page it belongs to (whose load is "
    "audited as study.view); ids, states and the call, no patient identifiers (see SECURITY.md)",
}


def _audit_count(p: Portal) -> int:
    with p.db.session() as s:
        return int(s.scalar(select(func.count()).select_from(AuditEntry)) or 0)


def _latest(p: Portal) -> AuditEntry:
    with p.db.session() as s:
        return s.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(1)).one()


def _routes(app: Flask) -> list[str]:
    keys = {"study_id", "instance_id", "result_id", "artifact_id", "job_id"}
    out = []
    for rule in app.url_map.iter_rules():
        if "GET" not in (rule.methods or set()) or not (set(rule.arguments) & keys):
            continue
        if rule.rule.startswith(("/admin", "/static")) or rule.rule in NOT_PATIENT_DATA:
            continue
        out.append(rule.rule)
    return sorted(out)


def _get(p: Portal, url: str, portal_client: Any) -> Any:
    if url.startswith("/api/"):
        return p.app.test_client().get(url, headers={"Authorization": f"Bearer {p.keys['ruth']}"})  # type: ignore[attr-defined]
    return portal_client.get(url)


def test_every_patient_data_read_is_audited(world: Portal) -> None:  # noqa: F811
    ruth = world.login("ruth")
    values = _ids(world, "ruth")
    unaudited, checked = [], 0
    for rule in _routes(world.app) + LIST_ROUTES:
        url = _fill(rule, values)
        if url is None:
            continue
        before = _audit_count(world)
        response = _get(world, url, ruth)
        response.close()
        if response.status_code >= 400:
            unaudited.append(f"{rule} answered {response.status_code} to its owner")
            continue
        checked += 1
        if _audit_count(world) <= before:
            unaudited.append(f"{rule} (GET {url}) -> {response.status_code}, no audit row")
            continue
        entry = _latest(world)
        assert entry.actor and entry.action, rule
    assert checked >= 8, "the route sweep found too few patient-data routes"
    assert not unaudited, "reads of patient data without an audit row:\n" + "\n".join(unaudited)


def test_reveal_and_downloads_name_the_reader_and_the_patient(world: Portal) -> None:  # noqa: F811
    ruth = world.login("ruth")
    before = _audit_count(world)
    response = ruth.post(f"/studies/{world.studies['ruth']}/reveal")
    assert response.status_code < 400
    assert _audit_count(world) > before
    entry = _latest(world)
    assert "reveal" in entry.action and entry.patient_id == "FN-0001"
    assert str(world.users["ruth"]) in entry.actor or entry.actor == "ruth"
