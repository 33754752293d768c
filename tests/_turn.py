"""The TURN tests' network (tests/test_turn.py, tests/browser/test_turn_browser.py): a
viewer that cannot send UDP to whepfan's media port and reaches it only through coturn.

Two network namespaces joined by a veth pair (198.18.1.0/24, RFC 2544 benchmarking
range: never routed; nothing in either namespace reaches the outside network)::

    server namespace  198.18.1.1                   viewer namespace  198.18.1.2
      whepfan  HTTP :8080, media UDP :8189  <-- HTTP --  viewer (aiortc or Chromium)
      coturn   :3478, relays 49152-49407    <-- TURN --  iptables: OUTPUT udp
      whepfan publish (the stream)                        dport 8189 DROP

The viewer's own checks to 198.18.1.1:8189 are dropped; its relayed candidate lives on
coturn (198.18.1.1:49152+), whose datagrams to whepfan stay inside the server namespace.
coturn runs Debian's /usr/bin/turnserver with deploy/coturn/turnserver.conf, overriding
only the addresses, ports, secret and state files on its command line.

Run as a script (``python tests/_turn.py VIEW_URL``) it is the aiortc viewer, started
inside the viewer namespace: it prints one JSON line with what it saw.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
COTURN_CONFIG = REPO_ROOT / "deploy" / "coturn" / "turnserver.conf"
TURNSERVER = "/usr/bin/turnserver"

SERVER_ADDRESS = "198.18.1.1"
VIEWER_ADDRESS = "198.18.1.2"
HTTP_PORT = 8080
MEDIA_PORT = 8189
TURN_PORT = 3478
RELAY_PORTS = (49152, 49407)
TURN_URL = f"turn:{SERVER_ADDRESS}:{TURN_PORT}?transport=udp"
TURN_SECRET = "turn-test-shared-secret"
TURN_REALM = "whepfan.test"
PUBLISH_TOKEN = "turn-publish-token"
STREAM = "turn"
START_TIMEOUT = 30.0
VIEWER_TIMEOUT = 60.0
FRAMES = 30
NEEDS = (
    "the TURN tests need root (ip netns, iptables) and Debian's coturn, iproute2 and "
    "iptables: apt-get install -y coturn iproute2 iptables"
)


def _run(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.fail(f"`{' '.join(argv)}` failed ({result.stderr.strip()}); {NEEDS}", pytrace=False)
    return result.stdout


@dataclass(frozen=True)
class Namespace:
    name: str

    def command(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]


@dataclass(frozen=True)
class TurnNetwork:
    """The two namespaces above; ``delete()`` removes both (and so every rule in them)."""

    server: Namespace
    viewer: Namespace

    @classmethod
    def create(cls, prefix: str) -> TurnNetwork:
        for tool in ("ip", "iptables"):
            if shutil.which(tool) is None:
                pytest.fail(f"`{tool}` is missing; {NEEDS}", pytrace=False)
        network = cls(Namespace(f"{prefix}-srv"), Namespace(f"{prefix}-view"))
        network.delete()
        for namespace in (network.server, network.viewer):
            _run(["ip", "netns", "add", namespace.name])
        server, viewer = network.server.name, network.viewer.name
        for command in (
            f"ip -n {server} link add vs type veth peer name vv netns {viewer}",
            f"ip -n {server} addr add {SERVER_ADDRESS}/24 dev vs",
            f"ip -n {viewer} addr add {VIEWER_ADDRESS}/24 dev vv",
            f"ip -n {server} link set vs up",
            f"ip -n {viewer} link set vv up",
            f"ip -n {server} link set lo up",
            f"ip -n {viewer} link set lo up",
        ):
            _run(command.split())
        # The firewall that makes TURN necessary: no UDP from the viewer to the media port
        # (UDP to coturn's port, and TCP to HTTP, still pass).
        _run(
            network.viewer.command(
                "iptables", "-A", "OUTPUT", "-p", "udp", "--dport", str(MEDIA_PORT), "-j", "DROP"
            )
        )
        return network

    def dropped_to_media_port(self) -> int:
        """Packets the viewer's DROP rule has discarded (its counter in iptables -vx)."""
        listing = _run(self.viewer.command("iptables", "-L", "OUTPUT", "-v", "-x", "-n"))
        for line in listing.splitlines():
            if "DROP" in line and f"dpt:{MEDIA_PORT}" in line:
                return int(line.split()[0])
        raise AssertionError(f"the DROP rule is gone:\n{listing}")

    def delete(self) -> None:
        for namespace in (self.server, self.viewer):
            subprocess.run(["ip", "netns", "del", namespace.name], capture_output=True, check=False)


class LoggedProcess:
    """A process in a namespace, its output (stdout and stderr) in ``output``; ``log()``
    reads ``log_path``, the output unless the process writes a log file of its own."""

    def __init__(self, argv: list[str], output: Path, log_path: Path | None = None) -> None:
        self.argv = argv
        self.log_path = log_path or output
        self._log = output.open("wb")
        self.process = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_output(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.log())
            if match:
                return match
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(
                    f"`{' '.join(self.argv)}` did not print /{pattern}/ (exit status "
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


def start_coturn(network: TurnNetwork, state: Path) -> LoggedProcess:
    """Debian's turnserver in the server namespace with the deploy config, in the
    foreground; its pid file and (unused) user database in ``state``, not /var."""
    if not os.access(TURNSERVER, os.X_OK):
        pytest.fail(f"{TURNSERVER} is missing; {NEEDS}", pytrace=False)
    # coturn lets the file's log-file beat the command line's, so that one line is
    # rewritten (coturn block-buffers a stdout that is not a terminal: a file it is).
    config, replaced = re.subn(
        r"^log-file=.*$", f"log-file={state / 'coturn.log'}", COTURN_CONFIG.read_text(), flags=re.M
    )
    assert replaced == 1, f"{COTURN_CONFIG} names one log file"
    (state / "turnserver.conf").write_text(config)
    turnserver = LoggedProcess(
        network.server.command(
            TURNSERVER,
            "-c",
            str(state / "turnserver.conf"),
            f"--listening-ip={SERVER_ADDRESS}",
            f"--listening-port={TURN_PORT}",
            f"--relay-ip={SERVER_ADDRESS}",
            f"--min-port={RELAY_PORTS[0]}",
            f"--max-port={RELAY_PORTS[1]}",
            # The config denies 198.18.0.0/15 as a peer (it is not a public address);
            # here it is whepfan's address, allowed as the config allows public_ips.
            f"--allowed-peer-ip={SERVER_ADDRESS}",
            f"--static-auth-secret={TURN_SECRET}",
            f"--realm={TURN_REALM}",
            "--no-tls",
            "--no-dtls",
            "--verbose",  # a line per request processed: the test reads the allocation
            f"--pidfile={state / 'turnserver.pid'}",
            f"--userdb={state / 'turndb'}",
        ),
        state / "turnserver.out",
        state / "coturn.log",
    )
    turnserver.wait_for_output(r"Relay ports initialization done")
    return turnserver


def start_whepfan(network: TurnNetwork, state: Path, *extra: str) -> LoggedProcess:
    """``whepfan serve`` in the server namespace with coturn's shared secret."""
    server = LoggedProcess(
        network.server.command(
            sys.executable,
            "-m",
            "whepfan.cli",
            "serve",
            "--http",
            f"{SERVER_ADDRESS}:{HTTP_PORT}",
            "--allow-insecure-http",  # a private namespace: no one else can listen
            "--udp",
            f"{SERVER_ADDRESS}:{MEDIA_PORT}",
            "--public-ip",
            SERVER_ADDRESS,
            "--publish-token",
            PUBLISH_TOKEN,
            "--turn-url",
            TURN_URL,
            "--turn-secret",
            TURN_SECRET,
            "--turn-credential-ttl",
            "600",
            *extra,
        ),
        state / "whepfan.log",
    )
    server.wait_for_output(r"WHEP on http://")
    return server


def start_publisher(network: TurnNetwork, state: Path) -> LoggedProcess:
    """``whepfan publish`` (moving pattern, VP8 + Opus) from the server namespace, so the
    stream is live whatever happens on the viewer's side."""
    publisher = LoggedProcess(
        network.server.command(
            sys.executable,
            "-m",
            "whepfan.cli",
            "publish",
            f"{server_url()}/whip/{STREAM}",
            "--token",
            PUBLISH_TOKEN,
            "--size",
            "320x240",
            "--keyframe-interval",
            "1",
        ),
        state / "publisher.log",
    )
    return publisher


def server_url() -> str:
    return f"http://{SERVER_ADDRESS}:{HTTP_PORT}"


# --- the aiortc viewer (run inside the viewer namespace) ---------------------------------

_LINK = re.compile(r"<([^>]*)>((?:\s*;\s*[a-zA-Z-]+=(?:\"(?:[^\"\\]|\\.)*\"|[^;,]*))*)")
_PARAM = re.compile(r";\s*([a-zA-Z-]+)=(\"(?:[^\"\\]|\\.)*\"|[^;,]*)")


def ice_server_links(fields: list[str]) -> list[dict[str, str]]:
    """The ``rel="ice-server"`` Link fields (RFC 9725 §4.6) as {url, username, ...}."""
    servers = []
    for field in fields:
        for match in _LINK.finditer(field):
            params = {"url": match.group(1)}
            for name, value in _PARAM.findall(match.group(2)):
                if value.startswith('"'):
                    value = re.sub(r"\\(.)", r"\1", value[1:-1])
                params[name.lower()] = value
            if params.get("rel") == "ice-server":
                servers.append(params)
    return servers


async def _view(url: str) -> dict[str, Any]:
    import aiohttp
    from _peers import DecodingViewer
    from aiortc import RTCConfiguration, RTCIceServer

    async with aiohttp.ClientSession() as http:
        # RFC 9725 §4.6: a client that cannot change its ICE servers once it has made its
        # offer (aiortc gathers in setLocalDescription) asks OPTIONS for them first.
        async with http.options(url) as response:
            assert response.status in (200, 204), response.status
            offered = ice_server_links(response.headers.getall("Link", []))
        turn = [server for server in offered if server["url"].startswith("turn")]
        configuration = RTCConfiguration(
            iceServers=[
                RTCIceServer(urls=s["url"], username=s["username"], credential=s["credential"])
                for s in turn
            ]
        )
        viewer = DecodingViewer(configuration)
        offer = await viewer.offer(["video", "audio"])
        async with http.post(
            url, data=offer, headers={"Content-Type": "application/sdp"}
        ) as response:
            assert response.status == 201, await response.text()
            answer = await response.text()
            answered_with = ice_server_links(response.headers.getall("Link", []))
        await viewer.accept(answer)
        try:
            await viewer.wait_frames(FRAMES, timeout=VIEWER_TIMEOUT / 2)
            transport = viewer.pc.getTransceivers()[0].receiver.transport.transport
            nominated = transport._connection._nominated[1]  # component 1: RTP (bundled)
            return {
                "offered": offered,
                "answered_with": answered_with,
                "local": [nominated.local_candidate.type, nominated.local_candidate.host],
                "remote": [nominated.remote_candidate.host, nominated.remote_candidate.port],
                "frames": len(viewer.video_frames),
                "size": [viewer.video_frames[-1].width, viewer.video_frames[-1].height],
            }
        finally:
            await viewer.close()


def view_through_turn(network: TurnNetwork) -> dict[str, Any]:
    """Run the aiortc viewer of STREAM in the viewer namespace; what it printed."""
    result = subprocess.run(
        network.viewer.command(
            sys.executable, str(Path(__file__)), f"{server_url()}/whep/{STREAM}"
        ),
        capture_output=True,
        text=True,
        timeout=VIEWER_TIMEOUT,
        cwd=REPO_ROOT,
        check=False,
    )
    assert result.returncode == 0, f"the viewer failed:\n{result.stderr[-4000:]}"
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


async def _allocate(username: str, password: str) -> dict[str, Any]:
    """One TURN allocation on coturn (RFC 8656 §7.2) with these credentials; its relayed
    address, or the error coturn answered (the 401 after the credentialed retry)."""
    import aioice.stun
    import aioice.turn

    try:
        transport, _ = await aioice.turn.create_turn_endpoint(
            asyncio.DatagramProtocol,
            server_addr=(SERVER_ADDRESS, TURN_PORT),
            username=username,
            password=password,
        )
    except aioice.stun.TransactionFailed as exc:
        code, reason = exc.response.attributes["ERROR-CODE"]
        return {"relayed": None, "error": [code, reason]}
    try:
        return {"relayed": list(transport.get_extra_info("sockname")), "error": None}
    finally:
        transport.close()


def allocate_from_viewer(network: TurnNetwork, username: str, password: str) -> dict[str, Any]:
    """:func:`_allocate` run in the viewer namespace."""
    result = subprocess.run(
        network.viewer.command(
            sys.executable, str(Path(__file__)), "--allocate", username, password
        ),
        capture_output=True,
        text=True,
        timeout=VIEWER_TIMEOUT,
        cwd=REPO_ROOT,
        check=False,
    )
    assert result.returncode == 0, f"the allocation failed to run:\n{result.stderr[-4000:]}"
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description="aiortc WHEP viewer through the Link TURN server")
    parser.add_argument("url", nargs="?", help="the WHEP endpoint to view")
    parser.add_argument(
        "--allocate", nargs=2, metavar=("USERNAME", "PASSWORD"), help="only allocate on coturn"
    )
    args = parser.parse_args()
    if args.allocate:
        print(json.dumps(asyncio.run(_allocate(*args.allocate))))
    else:
        print(json.dumps(asyncio.run(_view(args.url))))


if __name__ == "__main__":
    main()
