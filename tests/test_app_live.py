"""The launched app: named endpoints through gradio_client (by parameter name, without loading the
page), errors a client receives, cancel of generate and compare, light requests that do not wait
behind sampling; and one browser test (Debian's Chromium driven by Playwright) over the layout and
the four lab views, with screenshots (``SAMPLER_LAB_SCREENSHOTS=docs`` writes the README's)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
NCSN = "MNIST NCSN score network (bundled)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    """The app in a subprocess, its log collected line by line."""

    def __init__(self, tmp: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_TEMP_DIR": str(tmp / "gradio"), "GRADIO_ANALYTICS_ENABLED": "0"}
        self.proc = subprocess.Popen([sys.executable, "app.py", "--port", str(self.port)], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def log(self) -> str:
        return "".join(self.lines)

    def wait_for_log(self, text: str, timeout: float = 60) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if text in self.log():
                return True
            time.sleep(0.2)
        return False


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    server = App(tmp_path_factory.mktemp("live"))
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            urllib.request.urlopen(server.url, timeout=2)
            break
        except OSError:
            if server.proc.poll() is not None:
                pytest.fail(f"app exited: {server.log()}")
            time.sleep(0.5)
    else:
        server.proc.kill()
        pytest.fail("app did not start within 180 s")
    yield server
    server.proc.terminate()
    try:
        server.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.proc.kill()


def new_client(app):
    from gradio_client import Client

    return Client(app.url, verbose=False)


@pytest.mark.slow
def test_api_by_name_without_the_page(app):
    """Defects 3 and 8: named inputs; a digit (int or str) without any page event; the chosen sampler's
    defaults for what is left out; after the unconditional NCSN checkpoint the defaults still work."""
    client = new_client(app)
    preview, gallery, status, grid, gif, settings, code = client.predict(api_name="/generate", steps=5, batch_size=3)
    assert status.startswith("✅") and "NFE 5" in status and "digit 0–9, w = 3" in status
    assert len(gallery) == 3 and Path(grid).suffix == ".png" and Path(gif).suffix == ".gif"
    assert '"sampler": "ddim"' in settings and "DDIMScheduler" in code
    out = client.predict(api_name="/generate", sampler="pc", steps=10, batch_size=2, digit=7)
    assert "NFE 20" in out[2] and "digit 7" in out[2]  # one corrector step per predictor step, as in the UI
    assert "digit 3" in client.predict(api_name="/generate", steps=4, batch_size=1, digit="3")[2]
    info, *_ = client.predict(NCSN, api_name="/load_checkpoint")
    assert "VE" in info
    assert client.predict(api_name="/generate", steps=4, batch_size=1)[2].startswith("✅")
    assert client.predict(api_name="/generate", checkpoint=NCSN, steps=4, batch_size=1)[2].startswith("✅")
    image, table, cmp_status, conversion = client.predict(api_name="/compare", samplers=["ddim", "pf_ode"], budgets="9",
                                                          batch_size=1, digit=2)
    assert cmp_status.startswith("✅") and [row[2] for row in table["data"]] == [9, 4] and "→ steps" in conversion
    vp, ve, note, plot = client.predict(api_name="/forward_process", t=500)
    assert "ᾱ_t" in note
    toy_image, caption, modes = client.predict(api_name="/toy", sampler="ddim", steps=10, particles=300)
    assert "NFE 10" in caption and len(modes["data"]) == 3


@pytest.mark.slow
def test_refusals_reach_the_client_as_errors(app):
    """Defect 9 (and 3): a refused request raises in the client, with a message that names the input."""
    from gradio_client.exceptions import AppError

    client = new_client(app)
    for kwargs, match in [(dict(sampler="langevin", steps=1), "steps: .*between 2"), (dict(steps=0), "steps"),
                          (dict(sampler="ddpm", steps=1000, batch_size=64), "budget"), (dict(seed=-1), "seed"),
                          (dict(digit=12), "digit"), (dict(sampler="dpmsolver++", steps=1040), "between 1 and 1000")]:
        with pytest.raises(AppError, match=match):
            client.predict(api_name="/generate", **kwargs)
    with pytest.raises(AppError, match="exist|download"):
        client.predict("/no/such/folder", api_name="/load_checkpoint")


@pytest.mark.slow
def test_cancel_stops_runs_and_light_requests_do_not_wait(app):
    """Defects 1, 4, 10: cancel ends the worker of generate and of compare; while a long run holds the
    model, loading a checkpoint and the forward-process view are answered (they do not queue behind it)."""
    client = new_client(app)
    job = client.submit(api_name="/generate", sampler="ddpm", steps=1000, batch_size=16)
    deadline = time.time() + 120
    while time.time() < deadline and not job.outputs():
        time.sleep(0.2)
    assert job.outputs(), "no preview arrived"
    other = new_client(app)
    assert other.predict(api_name="/load_checkpoint")[0].startswith("**VP")
    assert "ᾱ_t" in other.predict(api_name="/forward_process", t=100)[2]
    assert job.cancel()
    assert app.wait_for_log("generate stopped: ddpm"), app.log()[-2000:]
    # the long run never finished: the light requests were answered while it held the model
    assert not any(str(out[2]).startswith("✅") for out in job.outputs())
    cmp = client.submit(api_name="/compare", samplers=["ddpm"], budgets="900", mode="nfe", batch_size=8)
    deadline = time.time() + 120
    while time.time() < deadline and not cmp.outputs():
        time.sleep(0.2)
    assert cmp.cancel()
    assert app.wait_for_log("compare stopped: 0 of 1 runs done; worker ended"), app.log()[-2000:]
    assert client.predict(api_name="/generate", steps=3, batch_size=1)[2].startswith("✅")


def _set_steps(page, value: int, shown: int) -> None:
    """Type a step count once the control shows ``shown`` (the sampler's default, set by the server), so a late
    update cannot overwrite what was typed; the NFE line confirms it."""
    box = page.get_by_label("number input for Steps")
    page.wait_for_function(f"document.querySelector('input[aria-label=\"number input for Steps\"]').value == '{shown}'",
                           timeout=30_000)
    box.fill(str(value))
    box.press("Enter")
    page.get_by_text(f"{value} network evaluations").wait_for(timeout=30_000)


def _thumbs_inside(page) -> dict:
    return page.evaluate("""() => {
        const wrap = document.querySelector('#samples .grid-wrap');
        const box = wrap.getBoundingClientRect();
        const thumbs = Array.from(document.querySelectorAll('#samples .thumbnail-item'));
        const inside = thumbs.filter(t => { const r = t.getBoundingClientRect();
            return r.width > 10 && r.left >= box.left - 1 && r.right <= box.right + 1 && r.bottom <= box.bottom + 1; });
        return {total: thumbs.length, inside: inside.length, scroll: wrap.scrollHeight - wrap.clientHeight};
    }""")


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
def test_browser_layout_and_lab_views(app, tmp_path):
    """Defects 4, 5, 7 and the four lab views, in a real browser, with screenshots."""
    playwright = pytest.importorskip("playwright.sync_api")
    shots = Path(os.environ.get("SAMPLER_LAB_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        try:
            _lab_views(browser, page, app, shots)
        except Exception:
            page.screenshot(path=str(shots / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()
    assert all((shots / f"app-{name}.png").stat().st_size > 10_000
               for name in ("generate", "trajectory", "compare", "quality", "toy"))


def _lab_views(browser, page, app, shots):
    if True:
        page.goto(app.url)
        page.get_by_role("button", name="Generate", exact=True).wait_for(timeout=90_000)
        page.get_by_text("network evaluations").wait_for(timeout=90_000)
        # guidance is inactive with 'unconditional' (defect 7), active with a digit
        guidance = page.get_by_label("number input for Guidance scale w")
        page.get_by_label("Digit").first.click()
        page.get_by_role("option", name="unconditional", exact=True).click()
        page.wait_for_function("document.querySelector('input[aria-label=\"number input for Guidance scale w\"]').disabled",
                               timeout=10_000)
        page.get_by_label("Digit").first.click()
        page.get_by_role("option", name="7", exact=True).click()
        page.wait_for_function("!document.querySelector('input[aria-label=\"number input for Guidance scale w\"]').disabled",
                               timeout=10_000)
        assert guidance.is_enabled()
        # the steps control follows the sampler: Langevin counts noise levels, from 2 (defect 4: label, defect 2: range)
        page.get_by_label("Sampler").first.click()
        page.get_by_role("option", name="Annealed Langevin (SMLD/NCSN)").click()
        page.get_by_text("Steps: noise levels L").wait_for(timeout=10_000)
        page.get_by_label("Sampler").first.click()
        page.get_by_role("option", name="DPM-Solver++ (2M)").click()
        page.get_by_text("Lu et al. 2022").wait_for(timeout=10_000)
        _set_steps(page, 12, 25)
        page.get_by_role("button", name="Generate", exact=True).click()
        page.wait_for_function("document.querySelector('#preview img') && document.querySelector('#preview img').naturalWidth > 0",
                               timeout=120_000)
        live_width = page.evaluate("document.querySelector('#preview img').naturalWidth")
        page.get_by_text("NFE 12").wait_for(timeout=120_000)
        assert "digit 7" in page.locator("#status").inner_text()
        page.wait_for_function("document.querySelectorAll('#samples .thumbnail-item').length >= 16", timeout=30_000)
        page.wait_for_timeout(500)
        # defect 5: the final preview is as large as the live ones; all 16 images show at 1280 px
        assert page.evaluate("document.querySelector('#preview img').naturalWidth") == live_width
        seen = _thumbs_inside(page)
        assert seen["total"] == 16 and seen["inside"] == 16 and seen["scroll"] <= 1, seen
        page.screenshot(path=str(shots / "app-generate.png"), full_page=True)
        # the trajectory explorer: the slider steps through the stored run
        page.get_by_role("tab", name="Trajectory").click()
        page.get_by_text("step **12 of 12**".replace("**", "")).wait_for(timeout=30_000)
        slider = page.locator("#traj-step input[type=range]")
        slider.focus()
        for _ in range(7):
            slider.press("ArrowLeft")
        page.get_by_text("step 5 of 12").wait_for(timeout=30_000)
        page.screenshot(path=str(shots / "app-trajectory.png"), full_page=True)
        # cancel: the status says so (defect 4)
        page.get_by_role("tab", name="Generate").click()
        page.get_by_label("Sampler").first.click()
        page.get_by_role("option", name="DDPM (ancestral)").click()
        page.get_by_role("button", name="Generate", exact=True).click()
        page.get_by_text("left").first.wait_for(timeout=60_000)
        page.get_by_role("button", name="Cancel", exact=True).first.click()
        page.locator("#status").get_by_text("Cancelled").wait_for(timeout=30_000)
        _set_steps(page, 50, 1000)
        # compare at equal NFE
        page.get_by_role("tab", name="Compare").click()
        page.get_by_label("NFE budgets (or step counts), comma-separated").fill("10, 20")
        page.get_by_role("button", name="Compare", exact=True).click()
        page.locator("#cmp-status").get_by_text("✅").wait_for(timeout=180_000)
        page.screenshot(path=str(shots / "app-compare.png"), full_page=True)
        # quality against NFE, with the current choice marked
        page.get_by_role("tab", name="Quality vs NFE").click()
        page.get_by_text("Your choice, DDPM at NFE 50").wait_for(timeout=60_000)
        page.screenshot(path=str(shots / "app-quality.png"), full_page=True)
        # the toy 2-D world
        page.get_by_role("tab", name="Toy 2-D").click()
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Largest mode-weight error").wait_for(timeout=60_000)
        page.screenshot(path=str(shots / "app-toy.png"), full_page=True)
        # a phone: every image of the batch shows (defect 5)
        phone = browser.new_page(viewport={"width": 390, "height": 844})
        phone.goto(app.url)
        phone.get_by_text("network evaluations").wait_for(timeout=90_000)
        _set_steps(phone, 5, 50)
        phone.get_by_role("button", name="Generate", exact=True).click()
        phone.get_by_text("NFE 5").wait_for(timeout=120_000)
        phone.wait_for_function("document.querySelectorAll('#samples .thumbnail-item').length >= 16", timeout=30_000)
        seen = _thumbs_inside(phone)
        assert seen["inside"] == 16 and seen["scroll"] <= 1, seen
        phone.screenshot(path=str(shots / "app-phone.png"), full_page=True)
