"""Run by tests/test_dashboard.py in its own process: Ray with its dashboard,
two services with traffic, then headless Chromium on the Actors page and a
scrape of the node's Prometheus endpoint. Prints one JSON line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import ray
from _ports import free_port

from sage_ray_comm import BaseService, FunctionClient, get_communication_bus, sage_service, service_function
from sage_ray_comm.cli import scrape_metrics


@sage_service(name="calculator", replicas=2, num_cpus=0.1)
class Calculator(BaseService):
    @service_function
    def add(self, a: int, b: int) -> int:
        return a + b


@sage_service(name="formatter", num_cpus=0.1)
class Formatter(BaseService):
    @service_function
    def fmt(self, x) -> str:
        return f"<{x}>"

    @service_function
    def chars(self, s: str):
        yield from s

    @service_function
    def frame(self):
        out = self.buffer((1 << 17,), "float64")  # 1 MiB in the replica's arena
        out[:] = 1.0
        return out


@sage_service(name="one_thread", max_concurrency=1, num_cpus=0.1)
class OneThread(BaseService):
    @service_function
    def nap(self, seconds: float) -> float:
        time.sleep(seconds)  # holds the one thread while calls queue behind it
        return seconds


def chromium(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        raise SystemExit("no chromium on PATH (.ci/run installs Debian's chromium package)")
    base = [
        exe,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--virtual-time-budget=20000",
        "--run-all-compositor-stages-before-draw",
    ]
    return subprocess.run(base + list(args), capture_output=True, text=True, timeout=timeout)


def main() -> int:
    out_dir = sys.argv[1]
    dash, metrics_port = free_port(), free_port()
    ray.init(
        num_cpus=4,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dash,
        _metrics_export_port=metrics_port,
        log_to_driver=False,
    )
    bus = get_communication_bus("dashboard_bus").start()
    Calculator.deploy(bus=bus.name)
    Formatter.deploy(bus=bus.name)
    client = FunctionClient(bus=bus.name)
    for i in range(300):
        assert client.call("calculator", "add", i, 1) == i + 1
        client.call("formatter", "fmt", i)
    # A stream left open, and calls cancelled before they started, for their metrics.
    stream = client.stream("formatter", "chars", "abcdef", window=2)
    assert next(stream) == "a"
    frame = client.call("formatter", "frame")  # held here: the replica's arena has a slot in use
    assert frame.sum() == 1 << 17
    OneThread.deploy(bus=bus.name)
    held = client.call_async("one_thread", "nap", 1.0)
    found_cancelled = sum(client.call_async("one_thread", "nap", 0.0).cancel() for _ in range(20))
    held.result(timeout=60)
    url = f"http://127.0.0.1:{dash}/#/actors"
    found: dict = {"dashboard": url, "cancelled": found_cancelled}
    names = [
        "sage:dashboard_bus:calculator#1",
        "sage:dashboard_bus:calculator#2",
        "sage:dashboard_bus:formatter#1",
        "sage:dashboard_bus:router",
    ]
    deadline = time.monotonic() + 120
    dom = ""
    while time.monotonic() < deadline:  # the dashboard needs a few seconds to list new actors
        dom = chromium("--dump-dom", url).stdout
        if all(n in dom for n in names):
            break
        time.sleep(2)
    found["names_on_page"] = {n: n in dom for n in names}
    shot = os.path.join(out_dir, "dashboard_actors.png")
    chromium(f"--screenshot={shot}", "--window-size=1600,1000", url)
    found["screenshot"] = shot if os.path.exists(shot) else None
    found["screenshot_bytes"] = os.path.getsize(shot) if os.path.exists(shot) else 0
    lines: list = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # metrics reach the exporter every few seconds
        client.call("calculator", "add", 1, 1)
        lines = scrape_metrics("dashboard_bus")
        if (
            any(line.startswith("ray_sage_calls_total") and 'service="calculator"' in line for line in lines)
            and any(line.startswith("ray_sage_call_latency_seconds_bucket") for line in lines)
            and any(line.startswith("ray_sage_replica_in_flight") for line in lines)
            and any(line.startswith("ray_sage_streams_active") and line.endswith(" 1.0") for line in lines)
            and any(line.startswith("ray_sage_stream_items_total") for line in lines)
            and any(line.startswith("ray_sage_calls_cancelled_total") for line in lines)
            and any(line.startswith("ray_sage_arena_fill_ratio") for line in lines)
        ):
            break
        time.sleep(2)
    found["metric_lines"] = lines
    gcs = ray.get_runtime_context().gcs_address
    cli = subprocess.run(
        ["sage-comm", "metrics", "--bus", "dashboard_bus", "--address", gcs],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found["cli_metrics"] = cli.stdout
    stream.close()
    client.close()
    bus.shutdown()
    ray.shutdown()
    print("RESULT " + json.dumps(found), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
