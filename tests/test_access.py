"""service.access: who sees which study (admins all; clinicians theirs by uploader or referring physician;
service accounts what they submitted), the same in SQL and in Python, and 404 for the rest."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from service.access import can_see_study, get_study_for, normalise_person_name, visible_studies
from service.auth import create_user
from service.db import Database
from service.errors import NotFound
from service.models import Patient, Study


@pytest.fixture
def world(settings):  # type: ignore[no-untyped-def]
    db = Database.from_settings(settings)
    with db.session() as s:
        admin = create_user(s, "admin", None, role="admin")
        ruth = create_user(s, "ruth", None, referring_physician_name="Referrer^Ruth")
        bob = create_user(s, "bob", None, referring_physician_name="Other^Bob")
        robot = create_user(s, "ris", None, role="service")
        patient = Patient(patient_id="P1", name="Doe^Jane")
        s.add(patient)
        s.flush()
        studies = {
            "ruth_referred": Study(study_instance_uid="1.2.1", patient_pk=patient.id,
                                   referring_physician_name="REFERRER^RUTH^^"),
            "bob_uploaded": Study(study_instance_uid="1.2.2", patient_pk=patient.id, uploaded_by_id=bob.id,
                                  referring_physician_name="Someone^Else"),
            "robot": Study(study_instance_uid="1.2.3", patient_pk=patient.id, uploaded_by_id=robot.id,
                           referring_physician_name="Referrer^Ruth"),
            "nobody": Study(study_instance_uid="1.2.4", patient_pk=patient.id),
        }
        s.add_all(studies.values())
        s.flush()
        ids = {name: study.id for name, study in studies.items()}
        users = {"admin": admin.id, "ruth": ruth.id, "bob": bob.id, "robot": robot.id}
    yield db, users, ids
    db.dispose()


@pytest.mark.parametrize(("who", "expected"), [
    ("admin", {"ruth_referred", "bob_uploaded", "robot", "nobody"}),
    ("ruth", {"ruth_referred", "robot"}),
    ("bob", {"bob_uploaded"}),
    ("robot", {"robot"}),
])
def test_visibility_rules_agree_in_sql_and_python(world, who, expected):  # type: ignore[no-untyped-def]
    db, users, ids = world
    from service.models import User

    with db.session() as s:
        user = s.get(User, users[who])
        seen = {study.id for study in s.scalars(visible_studies(s, user))}
        assert seen == {ids[name] for name in expected}
        for name, study_id in ids.items():
            study = s.get(Study, study_id)
            assert can_see_study(s, user, study) is (name in expected)
            if name in expected:
                assert get_study_for(s, user, study_id).id == study_id
            else:
                with pytest.raises(NotFound):
                    get_study_for(s, user, study_id)


def test_missing_and_disabled(world):  # type: ignore[no-untyped-def]
    db, users, ids = world
    from service.models import User

    with db.session() as s:
        admin = s.get(User, users["admin"])
        with pytest.raises(NotFound) as caught:
            get_study_for(s, admin, 999_999)
        assert caught.value.status == 404
        with pytest.raises(NotFound):
            get_study_for(s, admin, 2**70)
        admin.is_active = False
        assert list(s.scalars(visible_studies(s, admin))) == []
        assert not can_see_study(s, admin, s.scalars(select(Study)).first())


def test_normalise_person_name():  # type: ignore[no-untyped-def]
    assert normalise_person_name(" Referrer^Ruth^^ ") == "REFERRER^RUTH"
    assert normalise_person_name(None) == ""
