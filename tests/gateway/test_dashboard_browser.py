"""The dashboard in a real headless browser (Debian's chromium, driven by Playwright) against a
real serve --http with a cpu worker on the tiny kit: no console errors, the workers are shown,
a job submitted while the page is open shows a live preview and then its final image, and the
page fits a phone's width. Screenshots are saved under test-artifacts/."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import uuid

import pytest
import requests

from tests.serve.conftest import ROOT

pytestmark = pytest.mark.slow

ARTIFACTS = os.path.join(ROOT, "test-artifacts")


def chromium_path() -> str:
    """Debian's chromium, installed here when missing (as CI does: root, apt-get)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update"], capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, timeout=1200)
        found = shutil.which("chromium")
        if found:
            return found
    pytest.skip("no chromium and it cannot be installed here (needs root and apt-get)")


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api")
    executable = chromium_path()
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


def test_dashboard_shows_workers_a_live_preview_then_the_image(browser, real_rig):
    os.makedirs(ARTIFACTS, exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto(real_rig.url + "/")

    workers = requests.get(real_rig.url + "/v1/status", timeout=10).json()["workers"]
    for worker in workers:
        page.wait_for_selector(f'tr.worker[data-worker="{worker["worker_id"]}"]', timeout=30_000)
    row = page.inner_text(f'tr.worker[data-worker="{workers[0]["worker_id"]}"]')
    assert workers[0]["device"] in row

    rid = "dash-" + uuid.uuid4().hex[:8]
    body = {"message_type": "generate_sdxl_enhanced", "request_id": rid, "prompt": "a lighthouse",
            "model_base": "tiny-sdxl", "width": 256, "height": 256, "steps": 30, "seed": 1,
            "preview": True, "preview_size": 128, "return_images": True}
    outcome = {}
    submit = threading.Thread(target=lambda: outcome.update(
        reply=requests.post(real_rig.url + "/v1/generate", json=body, timeout=600).json()))
    submit.start()
    try:
        preview = page.wait_for_selector(f'#running .job[data-request="{rid}"] img.preview', timeout=240_000)
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=preview, timeout=30_000)
        page.screenshot(path=os.path.join(ARTIFACTS, "dashboard-preview.png"), full_page=True)
        final = page.wait_for_selector(f'#recent .job[data-request="{rid}"] img.final', timeout=600_000)
        page.wait_for_function("img => img.complete && img.naturalWidth === 256", arg=final, timeout=30_000)
        page.screenshot(path=os.path.join(ARTIFACTS, "dashboard-final.png"), full_page=True)
    finally:
        submit.join(timeout=600)
    assert outcome["reply"]["success"], outcome

    phone = browser.new_page(viewport={"width": 390, "height": 844})
    phone.on("pageerror", lambda e: problems.append(f"phone page error: {e}"))
    phone.goto(real_rig.url + "/")
    phone.wait_for_selector("tr.worker", timeout=30_000)
    phone.wait_for_selector("#recent img.final", timeout=30_000)
    overflow = phone.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    phone.screenshot(path=os.path.join(ARTIFACTS, "dashboard-phone.png"), full_page=True)
    assert overflow <= 1, f"the page is {overflow}px wider than a phone screen"
    assert problems == []
