"""App start-up and first-result latency on the bundled model.

    python benchmarks/bench_app.py              # 3 cold starts

(1) Cold start: from launching ``python app.py`` until the page is served (HTTP 200).
(2) Time to the first 16 images: one ``/generate`` call through gradio_client with DDIM at 25
    steps, batch 16, on the bundled class-conditional DDPM (guidance off) — measured from the
    request to the final result, the first request after start-up.
Goals on 2 CPU cores: ≤ 15 s and ≤ 5 s. Medians over the runs are printed.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run() -> tuple[float, float, str]:
    from gradio_client import Client

    port = free_port()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.perf_counter() - start > 180:
                    raise RuntimeError("the app did not start")
                time.sleep(0.05)
        cold = time.perf_counter() - start
        client = Client(url, verbose=False)
        t0 = time.perf_counter()
        out = client.predict(api_name="/generate", sampler="ddim", steps=25, batch_size=16, seed=0)
        first = time.perf_counter() - t0
        return cold, first, out[2]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    colds, firsts = [], []
    for r in range(args.runs):
        cold, first, status = one_run()
        colds.append(cold)
        firsts.append(first)
        print(f"run {r + 1}: cold start {cold:.1f} s, first 16 images {first:.1f} s ({status})", flush=True)
    print(f"\ncold start: median {statistics.median(colds):.1f} s (goal ≤ 15 s)")
    print(f"time to the first 16 images (DDIM, 25 steps): median {statistics.median(firsts):.1f} s (goal ≤ 5 s)")


if __name__ == "__main__":
    main()
