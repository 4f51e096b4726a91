def test_healthz(client) -> None:  # type: ignore[no-untyped-def]
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json()["status"] == "ok"
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_readyz_reports_each_check(client) -> None:  # type: ignore[no-untyped-def]
    body = client.get("/readyz").get_json()
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["storage"] == "ok"
    assert "models" in body["checks"]


def test_unknown_api_path_is_a_json_404(client) -> None:  # type: ignore[no-untyped-def]
    response = client.get("/api/v1/nothing-here")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"
