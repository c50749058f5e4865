"""Open an MLflow run page in headless Chromium, wait for its charts, save a screenshot and print the chart order.

Checks what a user sees first on the run's "Model metrics" tab (the issue was forty curation-count charts sorting
before the loss curve). Chromium comes from Debian (`apt-get install chromium`); it is driven over the DevTools
protocol with aiohttp (already installed with Ray), so the page renders in real time: `--screenshot` alone captures
before MLflow's charts have drawn.

    python scripts/mlflow_screenshot.py --workdir runs/demo --out docs/mlflow-run.png
    python scripts/mlflow_screenshot.py --server http://127.0.0.1:5000 --run-id RUN_ID --out x.png

With --workdir it starts `mlflow server` on the run's SQLite store on a free loopback port and opens that run. It
prints one JSON line: the chart sections and the chart titles in page order.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def start_mlflow(workdir: Path) -> tuple[subprocess.Popen, str, str]:
    """`mlflow server` on the run's SQLite store, on a free loopback port; returns (process, base URL, run id)."""
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                             f"sqlite:///{(workdir / 'mlflow.db').resolve()}", "--host", "127.0.0.1", "--port",
                             str(port), "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/health", 120)
    return proc, base, (workdir / "mlflow_run_id").read_text().strip()


def run_page(base: str, run_id: str) -> tuple[str, str]:
    """(URL of the run's Model metrics tab, the run's name), from the tracking server's REST API."""
    with urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}") as r:
        info = json.load(r)["run"]["info"]
    return f"{base}/#/experiments/{info['experiment_id']}/runs/{run_id}/model-metrics", info["run_name"]


async def capture(url: str, run_name: str, out: Path, width: int, height: int, settle: float, timeout: float) -> dict:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        raise SystemExit("no Chromium: apt-get install chromium")
    profile = tempfile.mkdtemp(prefix="athanor-chromium-")
    port = free_port()
    browser = subprocess.Popen([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                                f"--remote-debugging-port={port}", f"--window-size={width},{height}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/json/version", 60)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        async with aiohttp.ClientSession() as session, session.ws_connect(page["webSocketDebuggerUrl"],
                                                                          max_msg_size=0) as ws:
            ids = iter(range(1, 1 << 30))

            async def call(method: str, **params):
                i = next(ids)
                await ws.send_json({"id": i, "method": method, "params": params})
                async for msg in ws:
                    data = json.loads(msg.data)
                    if data.get("id") == i:
                        if "error" in data:
                            raise RuntimeError(f"{method}: {data['error']}")
                        return data["result"]
                raise RuntimeError("Chromium closed the connection")

            async def text() -> str:
                r = await call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''")
                return r["result"].get("value", "")

            await call("Page.enable")
            await call("Page.navigate", url=url)
            deadline = time.monotonic() + timeout
            while "Model metrics" not in await text():  # the run page has rendered its tabs and sections
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url} did not render in {timeout:.0f} s")
                await asyncio.sleep(1)
            await asyncio.sleep(settle)  # the charts draw after their data arrives
            shot = await call("Page.captureScreenshot", format="png")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(base64.b64decode(shot["data"]))
            body = await text()
    finally:
        browser.terminate()
        browser.wait(10)
        shutil.rmtree(profile, ignore_errors=True)
    return page_order(body, run_name)


def page_order(body: str, run_name: str) -> dict:
    """The tab's sections and the metric keys of their drawn charts, in page order, read from its text: a section
    header is its name on one line and "(n)" on the next; a drawn chart's legend reads "<run name> (<metric key>)".
    Charts below the window may not be drawn yet: a taller --size reads more of them."""
    lines = [line.strip() for line in body.splitlines() if line.strip()]
    start = lines.index("Model metrics") + 1 if "Model metrics" in lines else 0
    sections: list[dict] = []
    legend = f"{run_name} ("
    for before, line in zip(lines[start:], lines[start + 1:]):
        if line.startswith("(") and line.endswith(")") and line[1:-1].isdigit():
            sections.append({"section": before, "count": int(line[1:-1]), "charts": []})
        elif sections and line.startswith(legend) and line.endswith(")"):
            sections[-1]["charts"].append(line[len(legend):-1])
    return {"sections": sections, "first_charts": [c for s in sections for c in s["charts"]][:6]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--workdir", type=Path, help="a run's workdir with its local MLflow store")
    where.add_argument("--server", help="a running MLflow server's URL (with --run-id)")
    ap.add_argument("--run-id", help="the run to open on --server")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--size", default="1600x1200", help="window WIDTHxHEIGHT")
    ap.add_argument("--settle", type=float, default=8.0, help="seconds to let the charts draw")
    ap.add_argument("--timeout", type=float, default=90.0)
    ap.add_argument("--expect", help="comma-separated metric keys the page must draw first (exit 1 otherwise), "
                                     "e.g. train/loss,train/lr,train/val_loss")
    args = ap.parse_args()
    if args.server and not args.run_id:
        ap.error("--server needs --run-id")
    width, height = (int(v) for v in args.size.split("x"))
    server = None
    base, run_id = args.server, args.run_id
    if args.workdir:
        server, base, run_id = start_mlflow(args.workdir)
    try:
        url, name = run_page(base.rstrip("/"), run_id)
        order = asyncio.run(capture(url, name, args.out, width, height, args.settle, args.timeout))
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    print(json.dumps({"url": url, "screenshot": str(args.out), **order}))
    if args.expect:
        expected = args.expect.split(",")
        if order["first_charts"][:len(expected)] != expected:
            sys.exit(f"the page's first charts are {order['first_charts'][:len(expected)]}, not {expected}")


if __name__ == "__main__":
    main()
