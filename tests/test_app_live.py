"""The launched app: named endpoints through gradio_client (generate, compare, cancel, forward
process), and a real browser (Debian's Chromium driven by Playwright) generating images."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url():
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"app exited: {proc.stdout.read()}")
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("app did not start within 120 s")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)


@pytest.mark.slow
def test_named_endpoints_with_defaults(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/generate", "/compare", "/forward_process", "/load_checkpoint"} <= names
    preview, gallery, status, grid, gif = client.predict(api_name="/generate")
    assert status.startswith("✅") and "NFE 50" in status
    assert len(gallery) == 16 and Path(grid).suffix == ".png" and Path(gif).suffix == ".gif"
    info, *_ = client.predict(api_name="/load_checkpoint")
    assert "VP (DDPM)" in info
    image, table, cmp_status = client.predict(api_name="/compare")
    assert cmp_status.startswith("✅") and len(table["data"]) == 6
    vp, ve, note, plot = client.predict(api_name="/forward_process")
    assert "ᾱ_t" in note


@pytest.mark.slow
def test_generate_with_arguments_and_bad_input(client):
    out = client.predict(api_name="/generate", sampler="langevin", steps=20, batch_size=4, seed=3)
    assert "NFE 61" in out[2]
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="minimum"):  # Gradio's own range check on the slider
        client.predict(api_name="/generate", sampler="ddim", steps=0)
    bad = client.predict(api_name="/generate", sampler="langevin", steps=1)  # passes the slider, not the server
    assert bad[2].startswith("⚠️") and "between 2" in bad[2]
    over = client.predict(api_name="/generate", sampler="ddpm", steps=1000, batch_size=64)
    assert over[2].startswith("⚠️") and "budget" in over[2]
    missing = client.predict("/no/such/folder", api_name="/load_checkpoint")
    assert missing[0].startswith("⚠️")


@pytest.mark.slow
def test_cancel_stops_a_long_run(client):
    job = client.submit(api_name="/generate", sampler="ddpm", steps=1000, batch_size=16)
    deadline = time.time() + 60
    while time.time() < deadline and not job.outputs():
        time.sleep(0.2)  # wait for the first preview
    assert job.outputs(), "no preview arrived"
    assert job.cancel()
    start = time.time()
    out = client.predict(api_name="/generate", steps=5, batch_size=2)  # the model is free again at once
    assert out[2].startswith("✅")
    assert time.time() - start < 30


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
def test_browser_generates_images(app_url, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(app_url)
        page.get_by_role("button", name="Generate", exact=True).wait_for(timeout=60_000)
        page.get_by_text("network evaluations").wait_for(timeout=60_000)
        # pick a sampler
        page.get_by_label("Sampler").click()
        page.get_by_role("option", name="DPM-Solver++ (2M)").click()
        page.get_by_text("Lu et al. 2022").wait_for(timeout=10_000)
        # set the steps
        steps = page.get_by_label("number input for Steps")
        steps.fill("12")
        steps.press("Enter")
        page.get_by_text("12 network evaluations").wait_for(timeout=10_000)
        # ask for one digit of the class-conditional model
        page.get_by_label("Digit").click()
        page.get_by_role("option", name="7", exact=True).click()
        page.get_by_role("button", name="Generate", exact=True).click()
        status = page.get_by_text("NFE 12")
        status.wait_for(timeout=120_000)
        assert "DPM-Solver++" in status.inner_text()
        page.wait_for_function("document.querySelectorAll('.grid-wrap img, [data-testid=\"gallery\"] img, button.thumbnail-item img').length >= 16",
                               timeout=30_000)
        shot = Path(os.environ.get("SAMPLER_LAB_SCREENSHOT", tmp_path / "app.png"))
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000
