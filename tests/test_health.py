def test_healthz(client) -> None:  # type: ignore[no-untyped-def]
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json()["status"] == "ok"
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_readyz_reports_each_check(client) -> None:  # type: ignore[no-untyped-def]
    response = client.get("/readyz")  # the default settings: the bundled models
    body = response.get_json()
    assert body == {"status": "ready", "checks": {"database": "ok", "storage": "ok", "models": "ok"}}
    assert response.status_code == 200


def test_readyz_is_503_naming_a_tampered_or_missing_bundle(app, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import dataclasses
    import shutil

    from pipeline.run import BUNDLED_MODEL_DIR

    models = tmp_path / "models"
    shutil.copytree(BUNDLED_MODEL_DIR, models)
    settings = app.extensions["fracture.settings"]
    app.extensions["fracture.settings"] = dataclasses.replace(settings, model_dir=models)
    client = app.test_client()
    assert client.get("/readyz").get_json()["checks"]["models"] == "ok"
    weights = models / "detector" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    response = client.get("/readyz")
    body = response.get_json()
    assert response.status_code == 503 and body["status"] == "not_ready"
    assert response.headers["Retry-After"] == "5"  # service.errors.RETRY_AFTER_SECONDS, as every 503 says
    assert "detector" in body["checks"]["models"] and "SHA-256" in body["checks"]["models"]
    assert body["checks"]["database"] == "ok"
    shutil.copy(BUNDLED_MODEL_DIR / "detector" / "weights.safetensors", weights)
    shutil.rmtree(models / "classifier")
    missing = client.get("/readyz").get_json()["checks"]["models"]
    assert "classifier" in missing and "model card missing" in missing


def test_unknown_api_path_is_a_json_404(client) -> None:  # type: ignore[no-untyped-def]
    response = client.get("/api/v1/nothing-here")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"
