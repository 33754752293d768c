"""Capacity benchmark (issue 8): ``whepfan serve`` with 1 and with 2 workers, fed by
``whepfan publish`` (720p VP8 at 1.5 Mbit/s + Opus), loaded by ``whepfan loadtest`` with
growing viewer counts. For each step: loss, packets delivered, and the server's CPU
microseconds per delivered packet (user + system of the server and its worker processes,
from /proc), beside the same-run loopback limit of ``whepfan calibrate``.

    python bench/capacity.py                         # 1 and 2 workers, 50..400 viewers, 30 s
    python bench/capacity.py --viewers 25,50 --hold 8 --workers 1   # short run

The largest step with < 0.5 % loss over the hold is reported as "holding". Everything
(server, publisher, load generator) shares this machine, so the load generator's CPU
limits what can be shown; the CPU per delivered packet is the figure that carries over.
Not measured here yet: the naive aiortc SFU side by side, and the 1,000-viewer join storm.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass

# bench/ holds scripts: run from a checkout without installing (the server, publisher and
# load generator subprocesses get the same path through PYTHONPATH).
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPOSITORY not in sys.path:
    sys.path.insert(0, REPOSITORY)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [REPOSITORY, os.environ.get("PYTHONPATH")]))
from whepfan.calibrate import calibrate  # noqa: E402

TOKEN = "bench-capacity"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
LOSS_LIMIT_PERCENT = 0.5


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its live descendants (the worker processes)."""
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
            with open(f"/proc/{current}/task/{current}/children") as handle:
                pending.extend(int(child) for child in handle.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


@dataclass
class Step:
    workers: int
    viewers: int
    connected: int
    loss_percent: float
    packets: int
    server_cpu: float
    wall: float

    @property
    def cpu_us_per_packet(self) -> float:
        return self.server_cpu / self.packets * 1e6 if self.packets else float("nan")


class Server:
    def __init__(self, workers: int) -> None:
        self.http_port = _free_port(socket.SOCK_STREAM)
        udp_port = _free_port(socket.SOCK_DGRAM)
        cmd = [
            sys.executable, "-m", "whepfan.cli", "serve",
            "--http", f"127.0.0.1:{self.http_port}", "--udp", f"127.0.0.1:{udp_port}",
            "--public-ip", "127.0.0.1", "--publish-token", TOKEN,
            "--workers", str(workers), "--log-level", "warning",
        ]  # fmt: skip
        self.process = subprocess.Popen(cmd)
        self.url = f"http://127.0.0.1:{self.http_port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(self.url + "/metrics", timeout=1).read()
                return
            time.sleep(0.2)
        raise RuntimeError("server did not start")

    def close(self) -> None:
        self.process.terminate()  # SIGTERM: drain (no viewers left), then exit
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def run_step(server: Server, workers: int, viewers: int, hold: float) -> Step:
    with tempfile.NamedTemporaryFile(suffix=".json") as report_file:
        cpu_before, wall_before = _cpu_seconds(server.process.pid), time.monotonic()
        subprocess.run(
            [
                sys.executable, "-m", "whepfan.cli", "loadtest", "--viewers", str(viewers),
                "--ramp", "100", "--duration", str(hold), "--verify-every", "50", "--quiet",
                "--json", report_file.name, f"{server.url}/whep/live",
            ],
            check=False,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        cpu = _cpu_seconds(server.process.pid) - cpu_before
        wall = time.monotonic() - wall_before
        with open(report_file.name) as handle:
            report = json.load(handle)
    totals = report["summary"]["totals"]
    expected = totals["expected"] or 1
    return Step(
        workers=workers,
        viewers=viewers,
        connected=report["summary"]["connected"],
        loss_percent=100.0 * totals["lost"] / expected,
        packets=totals["packets"],
        server_cpu=cpu,
        wall=wall,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--viewers", default="50,100,200,400")
    parser.add_argument("--hold", type=float, default=30.0)
    args = parser.parse_args()
    limit = calibrate()
    print(
        f"loopback limit (whepfan calibrate): {limit.cpu_seconds_per_packet * 1e6:.2f} CPU µs "
        f"per packet, {limit.packets_per_cpu_second:,.0f} packets per CPU second"
    )
    steps: list[Step] = []
    for workers in (int(w) for w in args.workers.split(",")):
        server = Server(workers)
        publisher = subprocess.Popen(
            [
                sys.executable, "-m", "whepfan.cli", "publish", "--token", TOKEN,
                "--bitrate", "1500k", "--size", "1280x720", "--log-level", "warning",
                f"{server.url}/whip/live",
            ]
        )  # fmt: skip
        try:
            time.sleep(3)
            for viewers in (int(v) for v in args.viewers.split(",")):
                step = run_step(server, workers, viewers, args.hold)
                steps.append(step)
                print(
                    f"workers {workers}  viewers {viewers:5d}  connected {step.connected:5d}  "
                    f"loss {step.loss_percent:6.3f} %  packets {step.packets:9d}  "
                    f"server CPU {step.server_cpu:6.2f} s  "
                    f"{step.cpu_us_per_packet:6.2f} µs/packet  "
                    f"({step.cpu_us_per_packet / (limit.cpu_seconds_per_packet * 1e6):.2f}x "
                    "the loopback limit)",
                    flush=True,
                )
        finally:
            publisher.terminate()
            publisher.wait(10)
            server.close()
    for workers in sorted({s.workers for s in steps}):
        holding = [
            s.viewers
            for s in steps
            if s.workers == workers
            and s.connected == s.viewers
            and s.loss_percent < LOSS_LIMIT_PERCENT
        ]
        print(f"workers {workers}: largest step holding < 0.5 % loss: {max(holding, default=0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
