"""Real parts for the cluster tests: a ``redis-server`` on a free port (Debian's
/usr/bin/redis-server, no persistence) and ``whepfan serve`` processes on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson

REDIS_SERVER = "/usr/bin/redis-server"
CLUSTER_TOKEN = "cluster-test-token"
PUBLISH_TOKEN = "cluster-publish-token"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """``redis-server --port P --save '' --appendonly no``; ``stop``/``start`` again on
    the same port (the fault tests stop it and bring it back)."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.log = log_dir / f"redis-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    REDIS_SERVER,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn,
            ):
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start (see {self.log})")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None


class Node:
    """One ``whepfan serve`` process of the cluster (its own HTTP and UDP ports)."""

    def __init__(self, name: str, log_dir: Path, *args: str) -> None:
        self.name = name
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.log = log_dir / f"{name}.log"
        self.args = [
            "--http",
            f"127.0.0.1:{self.http_port}",
            "--udp",
            f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
            "--public-ip",
            "127.0.0.1",
            "--publish-token",
            PUBLISH_TOKEN,
            "--worker-packet-budget",
            "none",
            *args,
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "whepfan.cli", "serve", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                self.cluster()
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not start: {self.log.read_text()[-2000:]}")

    def cluster(self) -> dict[str, object]:
        with urllib.request.urlopen(f"{self.url}/api/cluster", timeout=2) as response:
            document: dict[str, object] = orjson.loads(response.read())
            return document

    def node_ids(self) -> set[str]:
        nodes = self.cluster().get("nodes") or []
        assert isinstance(nodes, list)
        return {str(node["id"]) for node in nodes}

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


def cluster_node(name: str, log_dir: Path, redis: RedisServer, *args: str) -> Node:
    node = Node(name, log_dir, "--cluster", redis.url, "--cluster-token", CLUSTER_TOKEN, *args)
    node.args += ["--node-url", node.url]
    return node


def wait_for(predicate: object, timeout: float = 10.0, interval: float = 0.1) -> bool:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, urllib.error.URLError, AssertionError, KeyError):
            if predicate():
                return True
        time.sleep(interval)
    return bool(predicate())
