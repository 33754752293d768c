"""The browser tests' environment: a private network namespace, whepfan in it, headless
Chromium in it (fixtures in conftest.py).

Chromium never gathers 127.x ICE candidates (reference/clients.md), and in a namespace
with only ``lo`` it gathers none. So each test module gets its own network namespace
with a veth pair, 198.18.0.1/24 on one end (RFC 2544 benchmarking range: never routed).
The server runs inside it (HTTP on 127.0.0.1, media candidates on 198.18.0.1), and so
does Chromium, through a generated wrapper script that execs it under ``ip netns exec``;
Playwright drives it from outside over a pipe, which crosses namespaces. Nothing in the
namespace can reach the outside network.

Needs root (for ``ip netns``), Debian's ``/usr/bin/chromium`` and Playwright for Python
(never ``playwright install``), and ``npm ci --prefix tests/browser`` for the medooze and
Eyevinn clients (and esbuild, which turns Eyevinn's CommonJS build into one ES module).
When any of it is missing the tests FAIL and say what to install: they are never skipped.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

BROWSER_DIR = Path(__file__).resolve().parent
REPO_ROOT = BROWSER_DIR.parent.parent
CHROMIUM = "/usr/bin/chromium"
MEDOOZE_DIR = BROWSER_DIR / "node_modules" / "whip-whep"
EYEVINN_DIR = BROWSER_DIR / "node_modules" / "@eyevinn" / "webrtc-player"
ESBUILD = BROWSER_DIR / "node_modules" / ".bin" / "esbuild"
NAMESPACE_ADDRESS = "198.18.0.1"
HTTP_PORT = 8080  # the namespace is private: fixed ports cannot collide
PUBLISH_TOKEN = "browser-publish-token"
VIEW_TOKEN = "browser-view-token"

# The medooze whip-whep reference client (reference/clients.md) as a WHEP viewer: audio and
# video recvonly, played in a muted autoplay <video>; window.viewer = {pc, client}.
MEDOOZE_VIEW = """async ({endpoint, token}) => {
  const { WHEPClient } = await import("/medooze/whep.js");
  const pc = new RTCPeerConnection({ bundlePolicy: "max-bundle", iceServers: [] });
  pc.addTransceiver("audio", { direction: "recvonly" });
  pc.addTransceiver("video", { direction: "recvonly" });
  const video = document.createElement("video");
  video.autoplay = true;
  video.muted = true;
  document.body.append(video);
  pc.ontrack = (event) => { video.srcObject = event.streams[0] || new MediaStream([event.track]); };
  const client = new WHEPClient();
  await client.view(pc, endpoint, token);
  window.viewer = { pc, client };
}"""
# Eyevinn's @eyevinn/webrtc-player with its WHEP adapter as a viewer, in a muted autoplay
# <video>; no STUN server (the namespace has no way out; its default is Google's). Its
# authorization is sent verbatim, so the "Bearer " is ours. The adapter creates its peer
# connection in load() and POSTs once ICE gathering completes (at most 2 s), so the
# promise settles before the POST; window.eyevinn.player.peer is the connection.
EYEVINN_VIEW = """async ({endpoint, token}) => {
  const { WebRTCPlayer } = await import("/eyevinn/webrtc-player.js");
  const video = document.createElement("video");
  video.autoplay = true;
  video.muted = true;
  document.body.append(video);
  const player = new WebRTCPlayer({ video, type: "whep", iceServers: [] });
  await player.load(new URL(endpoint), token ? `Bearer ${token}` : undefined);
  window.eyevinn = { player, video };
}"""
SERVER_START_TIMEOUT = 30.0
# reference/clients.md: without the background-networking flags Chromium floods the
# closed network with refused connections; the fake devices stand in for camera and mic.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
]
INSTALL_HINT = (
    "install the browser test dependencies: README quick start, command 2 (Debian's "
    "chromium, iproute2, iptables; .venv with '.[test]'; npm ci --prefix tests/browser); "
    "never `playwright install`"
)


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.fail(
            f"`{' '.join(argv)}` failed ({result.stderr.strip()}); the browser tests need "
            "root to create a network namespace",
            pytrace=False,
        )


@dataclass(frozen=True)
class NetworkNamespace:
    name: str

    @classmethod
    def create(cls, name: str) -> NetworkNamespace:
        if shutil.which("ip") is None:
            pytest.fail("`ip` (iproute2) is missing; the browser tests need it", pytrace=False)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        _run(["ip", "netns", "add", name])
        namespace = cls(name)
        for command in (
            "ip link set lo up",
            "ip link add v0 type veth peer name v1",
            f"ip addr add {NAMESPACE_ADDRESS}/24 dev v0",
            "ip link set v1 up",
            "ip link set v0 up",
        ):
            _run(namespace.command(*command.split()))
        return namespace

    def command(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)


def linked_namespace(server: NetworkNamespace, name: str, subnet: int) -> NetworkNamespace:
    """A client namespace joined to ``server``'s by its own veth pair: ``c0`` here at
    198.18.``subnet``.2, ``s<subnet>`` in ``server`` at .1, the default route through it.
    Traffic to the server's 198.18.0.1 crosses this link (in one namespace it would go
    over ``lo``), so ``shape``/``drop_randomly`` on its two ends set what the client's
    link does in each direction."""
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    _run(["ip", "netns", "add", name])
    client = NetworkNamespace(name)
    _run(client.command("ip", "link", "set", "lo", "up"))
    peer = f"s{subnet}"
    _run(client.command("ip", "link", "add", "c0", "type", "veth", "peer", "name", peer))
    _run(client.command("ip", "link", "set", peer, "netns", server.name))
    for namespace, command in (
        (client, f"ip addr add 198.18.{subnet}.2/24 dev c0"),
        (client, "ip link set c0 up"),
        (client, f"ip route add default via 198.18.{subnet}.1"),
        (server, f"ip addr add 198.18.{subnet}.1/24 dev {peer}"),
        (server, f"ip link set {peer} up"),
    ):
        _run(namespace.command(*command.split()))
    return client


def shape(namespace: NetworkNamespace, device: str, rate: str) -> None:
    """A token-bucket rate limit on what ``device`` sends (tbf; this kernel has no netem):
    a 32 kbit burst and 50 ms of queue before tail drop, like a modest access link."""
    _run(
        namespace.command(
            *f"tc qdisc replace dev {device} root tbf rate {rate} burst 32kbit latency 50ms".split()
        )
    )


def drop_randomly(namespace: NetworkNamespace, probability: float) -> None:
    """Drop each UDP datagram arriving in ``namespace`` with ``probability``, independently
    (iptables' ``statistic`` match in random mode); HTTP over TCP is left alone."""
    _run(
        namespace.command(
            *f"iptables -A INPUT -p udp -m statistic --mode random --probability {probability} "
            "-j DROP".split()
        )
    )


class WhepfanProcess:
    """``python -m whepfan.cli ARGS`` inside the namespace, its output in a log file."""

    def __init__(self, namespace: NetworkNamespace, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            namespace.command(sys.executable, "-m", "whepfan.cli", *args),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=env,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, pattern: str, timeout: float = SERVER_START_TIMEOUT) -> re.Match[str]:
        """The first match of ``pattern`` in the output, once it appears."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.log())
            if match:
                return match
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(
                    f"whepfan did not print /{pattern}/ (exit status "
                    f"{self.process.returncode}); its output:\n{self.log()[-4000:]}",
                    pytrace=False,
                )
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def wait_until(page: Any, predicate: str, arg: Any = None, timeout: float = 20.0) -> None:
    """Evaluate the (async) in-page ``predicate`` every 100 ms until it is truthy; fail
    after ``timeout`` seconds. Not ``page.wait_for_function``: that does not await what
    its predicate returns, so a pending promise (truthy) ends it after one call."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(predicate, arg):
        if time.monotonic() > deadline:
            pytest.fail(f"did not hold within {timeout:.0f} s: {predicate}", pytrace=False)
        page.wait_for_timeout(100)


@functools.cache
def eyevinn_module() -> bytes:
    """@eyevinn/webrtc-player as one ES module. The package ships only a CommonJS build
    (``dist/main.js``, which ``require``s ``events`` and two more Eyevinn packages), which
    a page cannot import; esbuild, pinned in package.json, bundles it from node_modules
    (tens of milliseconds, once per run) with nothing fetched."""
    if not (EYEVINN_DIR / "package.json").is_file() or not ESBUILD.is_file():
        pytest.fail(
            f"the Eyevinn webrtc-player client or esbuild is missing; {INSTALL_HINT}",
            pytrace=False,
        )
    result = subprocess.run(
        [
            str(ESBUILD),
            "--bundle",
            "--format=esm",
            "--platform=browser",
            "--log-level=warning",
            "--sourcefile=eyevinn-webrtc-player.js",
        ],
        input=b'export { WebRTCPlayer } from "@eyevinn/webrtc-player";\n',
        capture_output=True,
        cwd=BROWSER_DIR,  # where esbuild resolves the package from
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"esbuild could not bundle @eyevinn/webrtc-player: {result.stderr!r}")
    return result.stdout


def open_context(browser: Any) -> Any:
    """A browser context with the in-page checks (checks.js) on every page, the medooze
    client served at /medooze/*.js and Eyevinn's at /eyevinn/webrtc-player.js on every
    origin."""
    if not (MEDOOZE_DIR / "whep.js").is_file():
        pytest.fail(f"the medooze whip-whep client is missing; {INSTALL_HINT}", pytrace=False)
    eyevinn = eyevinn_module()
    context = browser.new_context(viewport={"width": 1000, "height": 800})
    context.add_init_script(path=str(BROWSER_DIR / "checks.js"))

    def serve_medooze(route: Any) -> None:
        name = route.request.url.rsplit("/", 1)[-1]
        if name in ("whep.js", "whip.js"):
            route.fulfill(path=str(MEDOOZE_DIR / name), content_type="text/javascript")
        else:
            route.fulfill(status=404)

    context.route("**/medooze/*", serve_medooze)
    context.route(
        "**/eyevinn/webrtc-player.js",
        lambda route: route.fulfill(body=eyevinn, content_type="text/javascript"),
    )
    return context
