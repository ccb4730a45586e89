"""The dashboard in a real headless browser (Debian's chromium, driven by Playwright) against a
real serve --http with a cpu worker on the tiny kit: no console errors, the workers are shown,
a job submitted while the page is open shows a live preview and then its final image, jobs of a
plain ZeroMQ client show in the queue, running (prompt, step) and recent images, and the page
fits a phone's width. Screenshots are saved under test-artifacts/."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
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

    # jobs of a plain ZeroMQ client (not through the gateway) show too, from the broker's
    # list_queue / list_history: queue rows, running with prompt and step, then the image
    from clients.client import BrokerClient

    # long enough (~2 s a job on a quiet box) that the 1 s dashboard poll sees each state
    ZMQ_STEPS = 100
    zids = [f"zmq-{n}-" + uuid.uuid4().hex[:6] for n in range(3)]
    zreplies: dict = {}

    def send_zmq(zid: str, n: int) -> None:
        with BrokerClient(real_rig.endpoint, timeout_s=600) as client:
            # steps differ, so the three cannot share one batched call (dynamic batching)
            zreplies[zid] = client.generate(prompt=f"a zeromq lighthouse number {n}",
                                            model_base="tiny-sdxl", width=256, height=256,
                                            steps=ZMQ_STEPS + n, seed=n, request_id=zid,
                                            raise_on_error=False).reply
    senders = [threading.Thread(target=send_zmq, args=(zid, n)) for n, zid in enumerate(zids)]
    senders[0].start()   # the first one runs first: its card is the one checked for steps
    with BrokerClient(real_rig.endpoint, timeout_s=30) as watcher:
        deadline = time.monotonic() + 60
        while zids[0] not in [j["request_id"] for j in watcher.list_queue()["jobs"]]:
            assert time.monotonic() < deadline, "the first ZeroMQ job never reached the broker"
            time.sleep(0.02)
    for sender in senders[1:]:
        sender.start()
    try:
        # one cpu worker holds one running and one prefetched job: the third waits in the queue
        queued = page.wait_for_selector("#queue .queued[data-request^='zmq-']", timeout=120_000)
        assert "a zeromq lighthouse" in queued.inner_text()
        running = page.wait_for_selector(f'#running .job[data-request="{zids[0]}"]', timeout=240_000)
        page.wait_for_function(
            r"id => { const c = document.querySelector(`#running .job[data-request=\"${id}\"]`);"
            r" return c && / [0-9]+\/" + str(ZMQ_STEPS) + "/.test(c.innerText); }", arg=zids[0], timeout=240_000)
        assert "a zeromq lighthouse number 0" in running.inner_text()
        page.screenshot(path=os.path.join(ARTIFACTS, "dashboard-zmq-clients.png"), full_page=True)
        for zid in zids:
            final = page.wait_for_selector(f'#recent .job[data-request="{zid}"] img.final', timeout=600_000)
            page.wait_for_function("img => img.complete && img.naturalWidth === 256", arg=final,
                                   timeout=30_000)
    finally:
        for sender in senders:
            sender.join(timeout=600)
    assert all(zreplies[zid]["success"] for zid in zids), zreplies

    phone = browser.new_page(viewport={"width": 390, "height": 844})
    phone.on("pageerror", lambda e: problems.append(f"phone page error: {e}"))
    phone.goto(real_rig.url + "/")
    phone.wait_for_selector("tr.worker", timeout=30_000)
    phone.wait_for_selector("#recent img.final", timeout=30_000)
    overflow = phone.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    phone.screenshot(path=os.path.join(ARTIFACTS, "dashboard-phone.png"), full_page=True)
    assert overflow <= 1, f"the page is {overflow}px wider than a phone screen"
    assert problems == []
