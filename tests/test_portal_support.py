"""Shared set-up for the portal tests (no tests here): users, studies with finished analyses, logged-in clients."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from sqlalchemy import select

from config import Settings
from service.db import Database
from service.models import (
    AnalysisResult,
    Artifact,
    Delivery,
    Instance,
    Job,
    JobEvent,
    Series,
    User,
    utcnow,
)
from tests.conftest import dicom_bytes, png_bytes

PASSWORD = "correct horse battery"
TYPES = ("transverse", "oblique", "spiral", "comminuted", "greenstick", "hairline", "impacted", "longitudinal",
         "avulsion", "pathological", "fracture_dislocation")
_HASH: dict[str, str] = {}


def password_hash() -> str:
    """One Argon2id hash shared by every test user, with light parameters so that signing in is quick
    (verification reads the parameters from the hash; the portal fixture turns off rehash-on-login)."""
    if "h" not in _HASH:
        _HASH["h"] = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(PASSWORD)
    return _HASH["h"]




def csrf_from(html: str) -> str:
    match = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', html) or re.search(
        r'name="csrf-token" content="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


@dataclass
class Portal:
    app: Any
    db: Database
    settings: Settings
    tmp: Path
    users: dict[str, int] = field(default_factory=dict)
    studies: dict[str, int] = field(default_factory=dict)
    instances: dict[str, int] = field(default_factory=dict)
    results: dict[str, int] = field(default_factory=dict)
    artifacts: dict[str, dict[str, int]] = field(default_factory=dict)

    def add_user(self, name: str, role: str = "clinician", referring: str | None = None) -> int:
        with self.db.session() as s:
            user = User(username=name, display_name=name.title(), role=role, password_hash=password_hash(),
                        referring_physician_name=referring)
            s.add(user)
            s.flush()
            self.users[name] = user.id
            return user.id

    def login(self, name: str, password: str = PASSWORD, base_url: str | None = None) -> Any:
        client = self.app.test_client()
        kwargs = {"base_url": base_url} if base_url else {}
        response = client.post("/login", data={"username": name, "password": password}, **kwargs)
        assert response.status_code == 302, response.get_data(as_text=True)[:500]
        return client

    def ingest(self, key: str, *, uploaded_by: str | None = None, **attrs: Any) -> int:
        from service.ingest import ingest_upload

        result = ingest_upload(self.db, self.settings, dicom_bytes(**attrs), content_type="application/dicom",
                               filename=f"{key}.dcm",
                               uploaded_by_id=self.users[uploaded_by] if uploaded_by else None)
        with self.db.session() as s:
            study_pk = s.scalar(select(Series.study_pk).join(Instance, Instance.series_pk == Series.id)
                                .where(Instance.id == result.instance_pk))
        self.studies[key], self.instances[key] = study_pk, result.instance_pk
        return study_pk

    def finish(self, key: str, *, call: str = "fracture", probability: float = 0.87) -> int:
        """What a worker and the reporter leave behind: a done job, a result, PNG layers, SC, SR, deliveries."""
        instance_id = self.instances[key]
        now = utcnow()
        with self.db.session() as s:
            job = s.scalars(select(Job).where(Job.instance_pk == instance_id).order_by(Job.id.desc())).first()
            job.state, job.started_at, job.finished_at, job.attempts = "done", now, now + dt.timedelta(seconds=2), 1
            s.add_all([JobEvent(job_pk=job.id, state="processing", at=now),
                       JobEvent(job_pk=job.id, state="done", at=now + dt.timedelta(seconds=2))])
            paths = {}
            for kind in ("heatmap", "edges", "hybrid"):
                paths[kind] = self.tmp / f"{instance_id}-{kind}.png"
                paths[kind].write_bytes(png_bytes(32, seed=instance_id))
            distribution = {t: 0.01 for t in TYPES} | {"greenstick": 0.9}
            result = AnalysisResult(
                instance_pk=instance_id, job_pk=job.id, is_radiograph=True, validity_score=0.98,
                validity_reason="radiograph", fracture_probability=probability, operating_point=0.5,
                detection_call=call, top_type="greenstick", top_type_probability=0.9,
                type_distribution=distribution, peak_box=[4, 5, 20, 24],
                models=[{"name": "fn-detector", "version": "1.2.3", "sha256": "a" * 64, "task": "detect"}],
                model_name="fn-detector", model_version="1.2.3",
                **{f"{k}_path": str(v) for k, v in paths.items()})
            s.add(result)
            s.flush()
            instance = s.get(Instance, instance_id)
            study_pk = s.get(Series, instance.series_pk).study_pk
            self.artifacts[key] = {}
            for kind in ("sc", "sr"):
                path = self.tmp / f"{instance_id}-{kind}.dcm"
                path.write_bytes(Path(instance.file_path).read_bytes())
                artifact = Artifact(study_pk=study_pk, instance_pk=instance_id if kind == "sc" else None,
                                    kind=kind, sop_instance_uid=f"2.25.{instance_id}{1 + (kind == 'sr')}",
                                    file_path=str(path), sha256="0" * 64)
                s.add(artifact)
                s.flush()
                self.artifacts[key][kind] = artifact.id
                s.add(Delivery(artifact_pk=artifact.id, destination="PACS@127.0.0.1:4242",
                               state="delivered" if kind == "sr" else "failed", attempts=1, delivered_at=now,
                               last_error=None if kind == "sr" else "association rejected"))
            self.results[key] = result.id
            return result.id


def two_clinicians(app: Any, settings: Settings, tmp_path: Path, monkeypatch: Any, *, bob_call: str = "fracture",
                   bob_probability: float = 0.87) -> Portal:
    """admin; ruth (referring name Referrer^Ruth) and bob (uploads his own) as clinicians; one finished study
    each: "ruth" (referred to Ruth, uploaded by nobody) and "bob" (uploaded by Bob, another referrer).
    CSRF is off (tests that check it turn it back on)."""
    monkeypatch.setattr("service.portal.auth_views.password_needs_rehash", lambda _hash: False)
    app.config["WTF_CSRF_ENABLED"] = False
    out = tmp_path / "outputs"
    out.mkdir()
    p = Portal(app, app.extensions["fracture.db"], settings, out)
    p.add_user("admin", "admin")
    p.add_user("ruth", "clinician", "REFERRER^RUTH")
    p.add_user("bob", "clinician", "Other^Bob")
    p.ingest("ruth")
    p.finish("ruth", call="fracture", probability=0.87)
    p.ingest("bob", uploaded_by="bob", PatientID="FN-0002", PatientName="Roe^Richard",
             ReferringPhysicianName="Someone^Else", AccessionNumber="ACC0002")
    p.finish("bob", call=bob_call, probability=bob_probability)
    return p
