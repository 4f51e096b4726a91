"""End to end in a real headless browser: Debian's Chromium driven by Playwright (never a downloaded
browser) against a real HTTP server and a real worker with real models. A clinician signs in, uploads a
generated radiograph, waits for the result, switches views, zooms, submits feedback and downloads the
report; screenshots are saved under the test's tmp dir (and copied to ``docs/screenshots/`` when
``FRACTURE_UPDATE_SCREENSHOTS=1``)."""

from __future__ import annotations

import os
import shutil
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from config import Settings
from tests.conftest import free_port, png_bytes

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
DOCS_SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
#: The screenshots worth keeping in the repository (the README shows them).
DOCS_SHOTS = ("02-upload", "03-history", "06-study-hybrid", "07-report", "08-admin-audit")
PASSWORD = "browser test password"

pytestmark = pytest.mark.browser


def _need_chromium() -> None:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} (Debian package chromium) is required in CI")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")


@pytest.fixture
def node(tmp_path: Path, sqlite_url: str, model_dir: Path) -> Iterator[dict[str, Any]]:
    """The web app on a free port (werkzeug, threaded) and one worker thread, sharing a SQLite database.

    The worker uses a copy of the test model bundles whose detector operating point is lowered to 0.3, so
    that the barely trained test models flag the generated fracture and the whole fracture path (type
    distribution, type feedback) is exercised."""
    from werkzeug.serving import make_server

    from pipeline.models.bundle import update_card
    from pipeline.run import BUNDLE_NAMES, load_models
    from service.app import create_app
    from service.auth import create_user
    from service.db import upgrade
    from service.worker import run_worker

    upgrade(sqlite_url)
    model_dir = Path(shutil.copytree(model_dir, tmp_path / "models"))
    update_card(model_dir / BUNDLE_NAMES["detect"], operating_point={"threshold": 0.3,
                                                                     "indeterminate_band": [0.3, 0.3]})
    port = free_port()
    settings = Settings.from_env({}, data_dir=tmp_path / "var", database_url=sqlite_url, http_port=port,
                                 secret_key="browser-test-secret", study_quiet_seconds=0, job_lease_seconds=10,
                                 model_dir=model_dir)
    app = create_app(settings)
    db = app.extensions["fracture.db"]
    with db.session() as s:
        create_user(s, "jane", PASSWORD, role="clinician", display_name="Dr Jane Carter",
                    referring_physician_name="CARTER^JANE")
        create_user(s, "admin", PASSWORD, role="admin", display_name="Administrator")
    server = make_server("127.0.0.1", port, app, threaded=True)
    web = threading.Thread(target=server.serve_forever, name="web", daemon=True)
    web.start()
    stop = threading.Event()
    models = load_models(model_dir)
    worker = threading.Thread(target=run_worker, args=(settings, stop),
                              kwargs={"db": db, "models": models, "poll_interval": 0.2, "batch_size": 1},
                              name="worker", daemon=True)
    worker.start()
    try:
        yield {"url": f"http://127.0.0.1:{port}", "settings": settings, "db": db}
    finally:
        stop.set()
        server.shutdown()
        worker.join(timeout=30)
        web.join(timeout=10)
        db.dispose()


@pytest.fixture
def radiograph(tmp_path: Path) -> Path:
    """A generated forearm radiograph with a fracture, as a 16-bit PNG."""
    import cv2

    from pipeline.synth.dataset import png16
    from pipeline.synth.render import render_sample

    sample = render_sample(20261123, fracture=True, region="forearm", long_side=640)
    path = tmp_path / "forearm.png"
    cv2.imwrite(str(path), png16(sample))
    return path


@pytest.fixture
def full_store(node: dict[str, Any]) -> Iterator[Path]:
    """The served app's ``storage_dir`` (the store and the incoming folder uploads are written to) on a 1 MB
    tmpfs, as ``tests.conftest.full_disk`` does for the ``settings`` fixture's (needs root; skipped where
    mounting is not permitted). The ``node`` fixture has its own settings, so it mounts over theirs."""
    import subprocess

    storage = node["settings"].storage_dir
    storage.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(storage)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to simulate a full disk: {mounted.stderr.strip()}")
    try:
        yield storage
    finally:
        subprocess.run(["umount", "-l", str(storage)], check=False)


@pytest.fixture
def browser() -> Iterator[Any]:
    _need_chromium()
    with warnings.catch_warnings():
        # Playwright's sync API runs its own event loop in a greenlet; asyncio may warn about it on teardown.
        warnings.simplefilter("ignore", ResourceWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
            try:
                yield chromium
            finally:
                chromium.close()


def _shot(page: Any, out: Path, name: str, full_page: bool = False) -> Path:
    path = out / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


def test_clinician_uploads_reviews_gives_feedback_and_downloads_report(
        node: dict[str, Any], browser: Any, radiograph: Path, tmp_path: Path) -> None:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    base = node["url"]
    context = browser.new_context(viewport={"width": 1440, "height": 960}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text)
            if msg.type == "error" and not msg.text.startswith("Failed to load resource") else None)
    failed: list[tuple[int, str]] = []
    page.on("response", lambda r: failed.append((r.status, r.url)) if r.status >= 400 else None)
    page.set_default_timeout(20_000)

    # sign in (a wrong password first)
    page.goto(f"{base}/history")
    assert "/login" in page.url
    page.fill("#username", "jane")
    page.fill("#password", "wrong password!")
    page.click("button[type=submit]")
    assert "Invalid username or password" in page.inner_text("[data-testid=login-error]")
    page.fill("#password", PASSWORD)
    _shot(page, shots, "01-login")
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/history")

    # upload a generated radiograph and a file that is not an image
    page.click("text=Upload")
    page.wait_for_url(f"{base}/upload")
    page.fill("#patient_id", "FN-20261123")
    page.fill("#patient_name", "Doe^John")
    bad = tmp_path / "notes.txt"
    bad.write_text("this is not a radiograph")
    page.set_input_files("[data-testid=file-input]", [str(radiograph), str(bad)])
    items = page.locator("[data-testid=upload-item]")
    items.nth(1).locator(".msg").filter(has_text="Rejected").wait_for()
    assert "content type" in items.nth(1).inner_text()
    page.wait_for_selector("[data-testid=upload-item][data-outcome=done]", timeout=120_000)
    _shot(page, shots, "02-upload")
    study_id = items.nth(0).get_attribute("data-study-id")

    # history: the study is listed, masked; reveal is audited
    page.click("nav >> text=Studies")
    row = page.locator(f"tr[data-study-id='{study_id}']")
    assert "D*** J***" in row.inner_text() and "Doe" not in row.inner_text()
    row.locator("button.reveal").click()
    row.locator(".patient.revealed").wait_for()
    assert "Doe, John" in row.inner_text() and "FN-20261123" in row.inner_text()
    _shot(page, shots, "03-history")

    # study view: switch views, opacity, zoom
    row.locator("[data-testid=open-study]").click()
    page.wait_for_url(f"{base}/studies/{study_id}")
    verdict = page.inner_text("[data-testid=verdict]")
    assert any(v in verdict for v in ("Fracture suspected", "No fracture detected", "Indeterminate")), verdict
    assert "Not for diagnostic use" in page.inner_text("[data-testid=model-identity]")
    viewer = page.locator("[data-viewer]").first
    page.wait_for_function("() => [...document.querySelectorAll('[data-viewer] img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    _shot(page, shots, "04-study-original")
    for view in ("edges", "heatmap", "hybrid"):
        viewer.locator(f"[data-view={view}]").click()
        assert viewer.get_attribute("data-current-view") == view
        assert viewer.locator(f"img[data-layer={view}]").is_visible()
    viewer.locator("[data-view=heatmap]").click()
    viewer.locator("[data-opacity]").fill("45")
    assert viewer.locator("img[data-layer=heatmap]").evaluate("e => e.style.opacity") == "0.45"
    viewer.locator("[data-zoom=in]").click()
    assert viewer.locator("[data-zoom-level]").inner_text() == "150%"
    viewer.locator("[data-zoom=reset]").click()
    _shot(page, shots, "05-study-heatmap")
    viewer.locator("[data-view=hybrid]").click()
    _shot(page, shots, "06-study-hybrid", full_page=True)

    # feedback
    form = page.locator("[data-testid=feedback-form]").first
    form.locator("input[value=disagree]").check()
    form.locator("select[name=fracture_present]").select_option("yes")
    form.locator("select[name=correct_type]").select_option("spiral")
    form.locator("textarea[name=comment]").fill("Spiral line along the radial shaft.")
    form.locator("button[type=submit]").click()
    page.wait_for_selector("[data-testid=feedback-item]")
    assert "disagrees" in page.inner_text("[data-testid=feedback-item]")
    assert "Spiral" in page.inner_text("[data-testid=feedback-item]")

    # report: HTML, then the PDF download
    page.click("[data-testid=report-html]")
    page.wait_for_selector("[data-testid=report]")
    page.wait_for_function("() => [...document.querySelectorAll('.report img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)")
    assert "Doe, John" in page.inner_text("[data-testid=report]")
    _shot(page, shots, "07-report", full_page=True)
    with page.expect_download() as download_info:
        page.click("text=Download PDF")
    pdf = tmp_path / "report.pdf"
    download_info.value.save_as(str(pdf))
    assert pdf.read_bytes().startswith(b"%PDF")

    # the admin's view of the queue and the audit log
    admin = browser.new_context(viewport={"width": 1440, "height": 900}).new_page()
    admin.goto(f"{base}/login")
    admin.fill("#username", "admin")
    admin.fill("#password", PASSWORD)
    admin.click("button[type=submit]")
    admin.goto(f"{base}/admin/jobs")
    assert int(admin.inner_text("[data-testid=count-done]")) >= 1
    admin.goto(f"{base}/admin/audit")
    audit = admin.inner_text("[data-testid=audit-table]")
    assert "patient.reveal" in audit and "feedback.create" in audit and "report.pdf" in audit
    _shot(admin, shots, "08-admin-audit")
    admin.context.close()
    context.close()

    assert not errors, errors  # no script errors, no Content-Security-Policy violations
    assert sorted(status for status, _url in failed) == [401, 415], failed  # the wrong password, the text file
    if os.environ.get("FRACTURE_UPDATE_SCREENSHOTS") == "1":
        DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for name in DOCS_SHOTS:
            shutil.copy(shots / f"{name}.png", DOCS_SCREENSHOTS / f"{name}.png")


def test_a_full_disk_while_an_upload_is_received_shows_why(
        node: dict[str, Any], full_store: Path, browser: Any, tmp_path: Path) -> None:
    """A file dropped while the store's disk is full is refused before the upload view, by CSRF protection's
    read of the form (503 ``storage_full`` in the one error shape, ``service.errors``): the page shows the
    error's message, never "Rejected: [object Object]" (``portal.js``)."""
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes(1200))  # noise: about 1.4 MB, more than the 1 MB disk holds
    assert big.stat().st_size > 1024 * 1024
    page = browser.new_context().new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text)
            if msg.type == "error" and not msg.text.startswith("Failed to load resource") else None)
    refused: list[tuple[int, str | None]] = []
    page.on("response", lambda r: refused.append((r.status, r.headers.get("retry-after")))
            if r.status >= 400 else None)
    page.set_default_timeout(20_000)
    page.goto(f"{node['url']}/login")
    page.fill("#username", "jane")
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{node['url']}/history")
    page.goto(f"{node['url']}/upload")

    page.set_input_files("[data-testid=file-input]", str(big))
    item = page.locator("[data-testid=upload-item][data-outcome=error]")
    item.wait_for()
    message = item.locator(".msg").inner_text()
    assert message.startswith("Rejected: storage full while receiving the upload"), message  # no "[Errno 28]"
    assert "[object Object]" not in item.inner_text()
    assert refused == [(503, "5")], refused
    assert [p for p in full_store.rglob("*") if p.is_file()] == []
    page.context.close()
    assert not errors, errors
