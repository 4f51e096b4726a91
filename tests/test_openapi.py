"""The OpenAPI document matches the application's routes (both ways), renders as a reference page, and
schemathesis finds no server error and no response outside the document when it fuzzes every operation."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings

from service.auth import create_api_key, create_user

DOCUMENTED_PREFIXES = ("/api/v1/", "/dicomweb/")
DOCUMENTED_EXACT = ("/healthz", "/readyz", "/metrics")


def _openapi_path(rule: str) -> str:
    return re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule)


def test_document_and_routes_agree(client, app):  # type: ignore[no-untyped-def]
    response = client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    doc = response.get_json()
    assert doc["openapi"] == "3.1.0"
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert "Error" in doc["components"]["schemas"]
    routes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith(DOCUMENTED_PREFIXES) or rule.rule in DOCUMENTED_EXACT:
            methods = {m.lower() for m in rule.methods or ()} - {"head", "options"}
            routes.setdefault(_openapi_path(rule.rule), set()).update(methods)
    documented = {path: set(item) for path, item in doc["paths"].items()}
    assert documented == routes
    operation_ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert len(operation_ids) == len(set(operation_ids))
    for item in doc["paths"].values():
        for op in item.values():
            for status, resp in op["responses"].items():
                for media in resp.get("content", {}).values():
                    ref = media["schema"].get("$ref")
                    if ref:
                        assert ref.rsplit("/", 1)[1] in doc["components"]["schemas"], (status, ref)


def test_reference_page_is_rendered_from_the_document(client):  # type: ignore[no-untyped-def]
    response = client.get("/api/v1/docs")
    assert response.status_code == 200 and response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    assert "<script" not in page and "http" not in page.split("openapi.json")[0].split("<body>")[1]
    assert "POST /api/v1/studies" in page and 'id="schema-Error"' in page
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]


@pytest.fixture
def fuzz_app(tmp_path, sqlite_url):  # type: ignore[no-untyped-def]
    """The application on SQLite only: fuzzing once keeps the suite short (the routes' SQL is shared)."""
    from config import Settings
    from service.app import create_app
    from service.db import upgrade

    upgrade(sqlite_url)
    app = create_app(Settings.from_env({}, data_dir=tmp_path / "var", database_url=sqlite_url,
                                       secret_key="test-secret-key"))
    app.config.update(TESTING=True, API_RATE_LIMIT_BURST=1_000_000)
    yield app
    app.extensions["fracture.db"].dispose()


@pytest.fixture
def admin_key(fuzz_app) -> str:  # type: ignore[no-untyped-def]
    with fuzz_app.extensions["fracture.db"].session() as s:
        user = create_user(s, "fuzz-admin", None, role="admin")
        return create_api_key(s, user, "schemathesis")[1]


def _seed(app: Any, key: str) -> dict[str, int]:
    """A study with a finished result and every output, so that fuzzed ids can hit real objects."""
    import io

    from tests.test_api import Api, dicom_bytes

    client = app.test_client()
    response = client.post("/api/v1/studies", headers={"Authorization": f"Bearer {key}"},
                           data={"file": [(io.BytesIO(dicom_bytes()), "a.dcm", "application/dicom")]},
                           content_type="multipart/form-data")
    item = response.get_json()["items"][0]
    out = app.extensions["fracture.settings"].data_dir / "outputs"
    out.mkdir()
    Api(client, app.extensions["fracture.db"], {}, {}, out).finish(item["instance_id"])
    return {"study_id": item["study_id"], "instance_id": item["instance_id"], "job_id": item["job_id"]}


def test_schemathesis_finds_no_server_errors(fuzz_app, admin_key):  # type: ignore[no-untyped-def]
    """Fuzz every documented operation (positive examples, at most 12 each) with an admin key."""
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    seen: dict[str, set[int]] = {}

    @fuzz_app.after_request
    def _record(response: Any) -> Any:
        from flask import request

        rule = request.url_rule.rule if request.url_rule else "?"
        seen.setdefault(f"{request.method} {_openapi_path(rule)}", set()).add(response.status_code)
        return response

    if "multipart/related" not in getattr(schemathesis.serializer, "_aliases", {}):
        schemathesis.serializer.alias("multipart/related", "application/octet-stream")  # STOW-RS bodies as bytes
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", fuzz_app)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance, response_headers_conformance]
    headers = {"Authorization": f"Bearer {admin_key}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    ids = _seed(fuzz_app, admin_key)
    failures: list[str] = []
    for operation in operations:
        if operation.path == "/readyz":  # 503 by design when the model bundles are absent; see test_health
            continue
        params = {p.name for p in operation.path_parameters}
        if params:  # one case on the seeded study, whose objects exist, before the random ones
            case = operation.Case(path_parameters={name: ids[name] for name in params},
                                  **({"body": {"agrees": True}} if operation.method == "post" else {}))
            try:
                case.call_and_validate(headers=headers, checks=checks)
            except Exception as exc:  # noqa: BLE001
                failures.append(f"{operation.method.upper()} {operation.path} (seeded): {exc}")

        @given(case=operation.as_strategy())
        @hypothesis_settings(max_examples=12, deadline=None, database=None,
                             suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            case.call_and_validate(headers=headers, checks=checks)

        try:
            run()
        except Exception as exc:  # noqa: BLE001 - collect every operation's failure, then report them all
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert not failures, "\n\n".join(failures)
    # The key worked: the operations that cannot fail for an admin did succeed.
    for operation in ("GET /api/v1/studies", "GET /api/v1/models", "GET /metrics", "GET /api/v1/docs",
                      "GET /api/v1/studies/{study_id}", "GET /api/v1/jobs/{job_id}",
                      "GET /api/v1/studies/{study_id}/instances/{instance_id}/hybrid.png",
                      "GET /api/v1/studies/{study_id}/sr.dcm"):
        assert 200 in seen[operation], (operation, seen[operation])
