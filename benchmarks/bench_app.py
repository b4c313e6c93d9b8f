"""The app's speed, memory and robustness on this machine (figures in README, "The app").

    python benchmarks/bench_app.py                       # every section (about 10 minutes on 2 cores)
    python benchmarks/bench_app.py --only overhead,threads

Sections (medians; each is a ratio or a time, never a pass/fail test):

- ``startup``: cold start (launch until the page is served) and the first 16 images (DDIM, 25 steps).
- ``page``: page load — Chromium from ``goto`` until the page's load events have filled it (the NFE
  line) — idle and while a long DDPM run holds the model (goal < 1 s while busy).
- ``preview``: time from a ``/generate`` request to its first streamed preview.
- ``overhead``: in-process, DDIM 50 steps × 16 images on the bundled DDPM model: the app's
  ``generate`` with previews, and with previews and trajectory capture, against the bare pipeline
  call (goal ≤ 1.05), interleaved runs.
- ``threads``: 20 DDIM steps × 16 images with 1 and 2 torch threads, idle and with another process
  busy on one core (what a Space's neighbours and the web server do).
- ``memory``: 200 requests across every tab (generate, compare, forward process, toy, load); the
  server's RSS after the first 20 and after all 200; Gradio's temporary files.
- ``load``: several clients at once, one cancelled mid-run, one with bad input, one that
  disconnects; then whether the server still serves, the order jobs finished in, whether the
  cancelled and disconnected runs' workers stopped, and the temporary files left after expiry.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SECTIONS = ("startup", "page", "preview", "overhead", "threads", "memory", "load")
APP_ARGS: list = []  # --device/--dtype for every ``python app.py`` this benchmark starts (set by main)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python app.py`` in a subprocess with its own Gradio temp dir; its log kept in memory."""

    def __init__(self, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.temp = Path(tempfile.mkdtemp(prefix="bench-app-"))
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_TEMP_DIR": str(self.temp / "gradio"),
                    "GRADIO_ANALYTICS_ENABLED": "0", **(env or {})}
        self.start = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "app.py", "--port", str(self.port), *APP_ARGS], cwd=ROOT, env=full_env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list = []
        threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")), daemon=True).start()
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=1)
                break
            except OSError:
                if self.proc.poll() is not None or time.perf_counter() - self.start > 180:
                    raise RuntimeError("the app did not start:\n" + "".join(self.lines[-30:]))
                time.sleep(0.05)
        self.cold = time.perf_counter() - self.start

    def client(self):
        from gradio_client import Client

        return Client(self.url, verbose=False)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def temp_files(self) -> tuple[int, float]:
        files = [p for p in (self.temp / "gradio").rglob("*") if p.is_file()]
        return len(files), sum(p.stat().st_size for p in files) / 2**20

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.temp, ignore_errors=True)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# ---- sections ----

def bench_startup(runs: int) -> dict:
    colds, firsts = [], []
    for r in range(runs):
        server = Server()
        try:
            client = server.client()
            t0 = time.perf_counter()
            out = client.predict(api_name="/generate", sampler="ddim", steps=25, batch_size=16, seed=0)
            firsts.append(time.perf_counter() - t0)
            colds.append(server.cold)
            print(f"  run {r + 1}: cold start {server.cold:.1f} s, first 16 images {firsts[-1]:.1f} s ({out[2]})", flush=True)
        finally:
            server.stop()
    return {"cold_start_s": median(colds), "first_16_images_s": median(firsts)}


def _long_job(client):
    job = client.submit(api_name="/generate", sampler="ddpm", steps=1000, batch_size=16)
    deadline = time.time() + 120
    while time.time() < deadline and not job.outputs():
        time.sleep(0.1)
    return job


def bench_page(server: Server, runs: int) -> dict:
    if not Path(CHROMIUM).exists():
        print("  (no chromium: page load measured as HTML + config only)")
    out = {}
    for state in ("idle", "busy"):
        times, http = [], []
        for _ in range(runs):
            job = _long_job(server.client()) if state == "busy" else None
            try:
                times.append(_page_load(server.url))
                http.append(_http_load(server.url))
            finally:
                if job is not None:
                    job.cancel()
                    time.sleep(1.0)
        out[f"page_load_{state}_s"] = median(times)
        out[f"html_config_{state}_s"] = median(http)
        print(f"  page load ({state}): browser until filled, median {median(times):.2f} s of "
              f"{[round(t, 2) for t in times]}; HTML + config alone {median(http):.3f} s", flush=True)
    return out


def _http_load(url: str) -> float:
    t0 = time.perf_counter()
    urllib.request.urlopen(url, timeout=60).read()
    urllib.request.urlopen(url + "config", timeout=60).read()
    return time.perf_counter() - t0


def _page_load(url: str) -> float:
    if not Path(CHROMIUM).exists():
        t0 = time.perf_counter()
        urllib.request.urlopen(url, timeout=60).read()
        urllib.request.urlopen(url + "config", timeout=60).read()
        return time.perf_counter() - t0
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        t0 = time.perf_counter()
        page.goto(url)
        page.get_by_text("network evaluations").wait_for(timeout=120_000)
        elapsed = time.perf_counter() - t0
        browser.close()
    return elapsed


def bench_preview(server: Server, runs: int) -> dict:
    client = server.client()
    out = {}
    for sampler, steps in (("ddim", 50), ("ddpm", 1000)):
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            job = client.submit(api_name="/generate", sampler=sampler, steps=steps, batch_size=16)
            while not job.outputs():
                time.sleep(0.01)
            times.append(time.perf_counter() - t0)
            job.cancel()
            time.sleep(0.5)
        out[f"first_preview_{sampler}_{steps}_s"] = median(times)
        print(f"  first preview, {sampler} {steps} steps × 16: median {median(times):.2f} s", flush=True)
    return out


def bench_overhead(runs: int) -> dict:
    import torch

    from ui import service

    torch.set_num_threads(1)
    label = service.DEFAULT_CHECKPOINT
    pipe = service.CACHE.get(label)
    req = service.make_request(label, "ddim", 50, None, 0, 16)
    kinds = {"bare pipeline": [], "generate, previews": [], "generate, previews + trajectory": []}

    def bare():  # in a worker thread, as the app runs it, so only the previews and the capture differ
        worker = threading.Thread(target=lambda: pipe(req.sampler, req.steps, req.params, batch_size=req.batch_size,
                                                      seed=req.seed, class_labels=req.class_label,
                                                      guidance_scale=req.guidance_scale, output_type="pt"))
        worker.start()
        worker.join()

    def generate(trajectory):
        for _ in service.generate(req, trajectory_image=0 if trajectory else None):
            pass

    bare()  # warm-up
    for r in range(runs):
        for name, fn in (("bare pipeline", bare), ("generate, previews", lambda: generate(False)),
                         ("generate, previews + trajectory", lambda: generate(True))):
            t0 = time.perf_counter()
            fn()
            kinds[name].append(time.perf_counter() - t0)
    base = median(kinds["bare pipeline"])
    out = {}
    for name, times in kinds.items():
        ratio = median(times) / base
        out[name] = {"median_s": median(times), "ratio": ratio}
        print(f"  {name:34s} median {median(times):.3f} s  ratio {ratio:.3f}", flush=True)
    out["added_work"] = _added_work(pipe, req)
    share = out["added_work"]["total_s"] / base
    out["added_work"]["share_of_bare"] = share
    print(f"  the app's own work, timed alone: previews {out['added_work']['previews_s']:.3f} s, trajectory capture "
          f"{out['added_work']['capture_s']:.3f} s, gallery + files {out['added_work']['outputs_s']:.3f} s "
          f"= {100 * share:.1f} % of the bare run", flush=True)
    return out


def _added_work(pipe, req) -> dict:
    """What ``generate`` adds to a run, each part timed on its own (immune to the machine's load swings)."""
    import torch

    from ui.outputs import gallery_images, preview_image, save_outputs
    from ui.trajectory import Trajectory, TrajectoryRecorder

    x = torch.randn(req.batch_size, *pipe.sample_shape)
    n_previews = min(req.nfe, 24) + 1
    t0 = time.perf_counter()
    frames = [preview_image(x, x, 4) for _ in range(n_previews)]
    previews = time.perf_counter() - t0
    scheduler, _, _ = pipe.prepare(req.sampler, req.steps, req.params)
    recorder = TrajectoryRecorder(scheduler, pipe.schedule, x, 0, Trajectory(req.sampler, "", req.nfe, 0, {}))
    t0 = time.perf_counter()
    for i in range(req.nfe):
        recorder(i, req.nfe, x, x)
    capture = time.perf_counter() - t0
    t0 = time.perf_counter()
    gallery_images(x)
    save_outputs(x, [f.resize((f.width // 2, f.height // 2)) for f in frames], "bench")
    outputs = time.perf_counter() - t0
    return {"previews_s": previews, "capture_s": capture, "outputs_s": outputs, "total_s": previews + capture + outputs}


def _ddim20(threads: int) -> float:
    code = ("import time, torch; torch.set_num_threads(%d)\n"
            "from ui import service\n"
            "label = service.DEFAULT_CHECKPOINT; pipe = service.CACHE.get(label)\n"
            "req = service.make_request(label, 'ddim', 20, None, 0, 16)\n"
            "run = lambda: pipe('ddim', 20, req.params, batch_size=16, seed=0, class_labels=req.class_label, "
            "guidance_scale=req.guidance_scale, output_type='pt')\n"
            "run(); ts = []\n"
            "for _ in range(5):\n"
            "    t = time.perf_counter(); run(); ts.append(time.perf_counter() - t)\n"
            "print(sorted(ts)[2])\n") % threads
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900)
    return float(out.stdout.strip().splitlines()[-1])


def bench_threads() -> dict:
    out = {}
    for state in ("idle", "one core busy"):
        hog = None
        if state != "idle":
            hog = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 900\nwhile time.time() < end: pass"])
        try:
            for threads in (1, 2):
                seconds = _ddim20(threads)
                out[f"{state}, {threads} thread{'s' if threads > 1 else ''}"] = seconds
                print(f"  {state:14s} {threads} thread(s): 20 DDIM steps × 16 images, median {seconds:.2f} s", flush=True)
        finally:
            if hog is not None:
                hog.kill()
    return out


def bench_memory(server: Server, requests: int = 200) -> dict:
    client = server.client()
    calls = [
        lambda: client.predict(api_name="/generate", steps=5, batch_size=4),
        lambda: client.predict(api_name="/compare", samplers=["ddim", "dpmsolver++"], budgets="5", batch_size=2),
        lambda: client.predict(api_name="/forward_process", t=300),
        lambda: client.predict(api_name="/toy", sampler="ddim", steps=10, particles=500),
        lambda: client.predict(api_name="/load_checkpoint"),
    ]
    rss = {}
    t0 = time.perf_counter()
    for i in range(requests):
        calls[i % len(calls)]()
        if i + 1 == 20 or (i + 1) % 100 == 0 or i + 1 == requests:
            rss[i + 1] = server.rss_mb()
            print(f"  after {i + 1} requests: server RSS {rss[i + 1]:.0f} MB", flush=True)
    files, mb = server.temp_files()
    print(f"  {requests} requests in {time.perf_counter() - t0:.0f} s; Gradio temp files: {files} ({mb:.1f} MB)")
    return {"rss_mb": rss, "growth_20_to_end_mb": rss[requests] - rss[20], "temp_files": files, "temp_mb": mb}


def _disconnecting_request(server: Server, fn_index: int) -> None:
    """Join the queue with a long generate, read a little of the event stream, then drop the connection."""
    from ui.handlers import PARAM_NAMES
    from ui.models import DEFAULT_CHECKPOINT

    session = "bench-disconnect"
    data = [DEFAULT_CHECKPOINT, "ddpm", 1000, 0, 16, None, 3.0, 0] + [None] * len(PARAM_NAMES)
    body = json.dumps({"data": data, "fn_index": fn_index,
                       "session_hash": session, "event_data": None, "trigger_id": None}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/gradio_api/queue/join", body, {"Content-Type": "application/json"})
    conn.getresponse().read()
    conn.close()
    stream = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    stream.request("GET", f"/gradio_api/queue/data?session_hash={session}")
    resp = stream.getresponse()
    seen = b""
    deadline = time.time() + 900
    while b"process_generating" not in seen and time.time() < deadline:
        seen += resp.read1(4096)
    stream.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-run
    resp.close()
    stream.close()
    print(f"  disconnected a client mid-run ({len(seen)} bytes of events read)", flush=True)


def bench_load(clients: int = 4) -> dict:
    server = Server({"SAMPLER_LAB_CACHE_TTL": "20"})
    try:
        main = server.client()
        fn_index = next(i for i, d in enumerate(main.config["dependencies"]) if d.get("api_name") == "generate")
        fn_index = main.config["dependencies"][fn_index].get("id", fn_index)
        finished: dict = {}
        start = time.perf_counter()

        def ok_client(k):
            c = server.client()
            t0 = time.perf_counter()
            out = c.predict(api_name="/generate", sampler="ddim", steps=30, batch_size=8, seed=k)
            finished[f"client {k}"] = (t0 - start, time.perf_counter() - start, out[2][:1])

        threads = [threading.Thread(target=ok_client, args=(k,)) for k in range(clients)]
        cancelled = main.submit(api_name="/generate", sampler="ddpm", steps=1000, batch_size=16)
        disconnect = threading.Thread(target=_disconnecting_request, args=(server, fn_index))
        disconnect.start()
        time.sleep(0.5)
        for th in threads:
            th.start()
            time.sleep(0.2)
        bad = server.client().submit(api_name="/generate", sampler="langevin", steps=1)  # queued like the rest
        deadline = time.time() + 60
        while time.time() < deadline and not cancelled.outputs():
            time.sleep(0.1)
        cancelled.cancel()
        disconnect.join(timeout=180)
        for th in threads:
            th.join(timeout=600)
        bad_error = None
        try:
            bad.result(timeout=600)
        except Exception as err:  # the client must receive the refusal
            bad_error = str(err).splitlines()[0][:120]
        after = server.client().predict(api_name="/generate", steps=5, batch_size=2)[2]
        deadline = time.time() + 60  # Gradio notices a dropped connection within a heartbeat or two
        while time.time() < deadline and server.log().count("generate stopped") < 2:
            time.sleep(1)
        log = server.log()
        for line in log.splitlines():
            if "stopped" in line:
                print("  server log:", line.split(": ", 1)[-1])
        order = sorted(finished.items(), key=lambda kv: kv[1][1])
        for name, (submitted, done, mark) in order:
            print(f"  {name}: submitted at {submitted:.1f} s, finished at {done:.1f} s {mark}")
        print(f"  bad input → client error: {bad_error!r}")
        stopped = log.count("generate stopped")
        print(f"  workers stopped early (cancelled + disconnected): {stopped}; server still serves: {after[:30]!r}")
        files_before, mb_before = server.temp_files()
        time.sleep(50)  # two expiry periods of the 20 s cache TTL
        files_after, mb_after = server.temp_files()
        print(f"  Gradio temp files: {files_before} ({mb_before:.1f} MB) right after, {files_after} ({mb_after:.1f} MB) "
              "after expiry")
        return {"finish_order": [name for name, _ in order], "bad_input_error": bad_error, "workers_stopped": stopped,
                "serves_after": after.startswith("✅"), "temp_files_after_expiry": files_after,
                "temp_files_before_expiry": files_before}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200, help="requests of the memory section")
    parser.add_argument("--json", default=None, help="also write the figures here")
    from pipelines.device import add_device_arguments, describe, device_from_args

    add_device_arguments(parser)
    args = parser.parse_args()
    device, dtype = device_from_args(args)
    APP_ARGS[:] = ["--device", str(device), "--dtype", str(dtype).replace("torch.", "")]
    from ui import service

    service.CACHE.configure(device, dtype)  # the in-process sections (overhead, threads)
    print(f"device: {describe(device, dtype)}", flush=True)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    results = {"device": describe(device, dtype)}
    if "startup" in only:
        print("startup", flush=True)
        results["startup"] = bench_startup(args.runs)
    if {"page", "preview", "memory"} & set(only):
        server = Server()
        try:
            if "page" in only:
                print("page", flush=True)
                results["page"] = bench_page(server, args.runs)
            if "preview" in only:
                print("preview", flush=True)
                results["preview"] = bench_preview(server, args.runs)
            if "memory" in only:
                print("memory", flush=True)
                results["memory"] = bench_memory(server, args.requests)
        finally:
            server.stop()
    if "overhead" in only:
        print("overhead", flush=True)
        results["overhead"] = bench_overhead(max(5, args.runs + 2))
    if "threads" in only:
        print("threads", flush=True)
        results["threads"] = bench_threads()
    if "load" in only:
        print("load", flush=True)
        results["load"] = bench_load()
    print(json.dumps(results, indent=2, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
