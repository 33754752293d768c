"""The ``whepfan`` command. ``whepfan serve`` runs the server (see ``whepfan serve --help``).

Every option can also come from a ``WHEPFAN_*`` environment variable or the TOML file
given by ``--config``; the command line wins, then the environment, then the file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from whepfan import __version__
from whepfan.settings import Settings, SettingsError

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="whepfan", description="WebRTC fan-out server: WHIP ingest, WHEP playback."
    )
    parser.add_argument("--version", action="version", version=f"whepfan {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the server",
        description="Run the WHIP/WHEP server. Each option is also WHEPFAN_<NAME> in the "
        "environment (lists comma-separated) and <name> in the TOML file.",
    )
    # Errors found after parsing (settings, addresses) print this subcommand's usage.
    serve.set_defaults(subparser=serve)
    # default=None everywhere: "not given" must not override the environment or the file.
    serve.add_argument("--config", type=Path, metavar="FILE", help="TOML settings file")
    serve.add_argument("--http", metavar="HOST:PORT", help="HTTP address (127.0.0.1:8080)")
    serve.add_argument("--udp", metavar="HOST:PORT", help="media UDP address (0.0.0.0:8189)")
    serve.add_argument(
        "--public-ip",
        dest="public_ip",
        action="append",
        metavar="ADDR",
        help="address advertised as ICE candidate (repeatable; default: the --udp address, "
        "or every non-loopback interface address when --udp binds all of them)",
    )
    serve.add_argument(
        "--publish-token",
        dest="publish_token",
        metavar="TOKEN",
        help="bearer token for WHIP (default: generated and logged)",
    )
    serve.add_argument(
        "--view-token",
        dest="view_token",
        metavar="TOKEN",
        help="bearer token for WHEP (default: viewing is open)",
    )
    serve.add_argument(
        "--metrics-token",
        dest="metrics_token",
        metavar="TOKEN",
        help="bearer token for GET /metrics (default: open, with a warning off loopback)",
    )
    serve.add_argument(
        "--jwt-secret",
        dest="jwt_secret",
        metavar="SECRET",
        help="HS256 secret (32+ bytes) for scoped JWTs; prefer WHEPFAN_JWT_SECRET or the "
        "TOML file, since other users can read a command line. Any JWT key makes viewing "
        "need a credential too",
    )
    serve.add_argument(
        "--jwt-public-key",
        dest="jwt_public_key",
        metavar="PEM",
        help="public key or certificate that verifies JWTs (RSA: RS256, EC: ES256/384/512, "
        "Ed25519: EdDSA)",
    )
    serve.add_argument(
        "--jwt-jwks",
        dest="jwt_jwks",
        metavar="FILE",
        help="JWK Set of public keys, picked by the token's kid; re-read when it changes",
    )
    serve.add_argument("--jwt-audience", dest="jwt_audience", metavar="AUD", help="JWTs' aud")
    serve.add_argument("--jwt-issuer", dest="jwt_issuer", metavar="ISS", help="JWTs' iss")
    serve.add_argument(
        "--jwt-leeway",
        dest="jwt_leeway",
        metavar="SECONDS",
        help="clock skew allowed on a JWT's exp and nbf (default 30)",
    )
    serve.add_argument(
        "--ice-server",
        dest="ice_server",
        action="append",
        metavar="URI",
        help="STUN/TURN server for clients (repeatable): URI[;username=U;credential=C] or "
        "URI;secret=S[;ttl=SECONDS] for TURN REST time-limited credentials",
    )
    serve.add_argument(
        "--turn-url",
        dest="turn_url",
        action="append",
        metavar="URI",
        help="turn:/turns: URI of a TURN server that shares --turn-secret (repeatable)",
    )
    serve.add_argument(
        "--turn-secret",
        dest="turn_secret",
        metavar="SECRET",
        help="coturn's static-auth-secret: each response carries time-limited credentials",
    )
    serve.add_argument(
        "--turn-credential-ttl",
        dest="turn_credential_ttl",
        metavar="SECONDS",
        help="how long those TURN credentials stay valid (default 86400)",
    )
    serve.add_argument("--tls-cert", dest="tls_cert", metavar="PEM")
    serve.add_argument("--tls-key", dest="tls_key", metavar="PEM")
    serve.add_argument(
        "--allow-insecure-http",
        dest="allow_insecure_http",
        action="store_const",
        const=True,
        help="allow plain HTTP on a non-loopback address",
    )
    serve.add_argument(
        "--strict-etag",
        dest="strict_etag",
        action="store_const",
        const=True,
        help="answer 428 to a PATCH without If-Match",
    )
    serve.add_argument(
        "--publisher-takeover",
        dest="publisher_takeover",
        action="store_const",
        const=True,
        help="a new WHIP publisher replaces the live one instead of 409",
    )
    serve.add_argument(
        "--media-timeout",
        dest="media_timeout",
        metavar="SECONDS",
        help="a publisher that sent no media this long is stalled: viewers get SSE "
        "inactive and a new WHIP POST replaces it (default 3)",
    )
    serve.add_argument(
        "--gso",
        dest="gso",
        choices=("auto", "on", "off"),
        help="UDP GSO for the fan-out: one send entry per viewer's run of packets "
        "(default auto: where the start-up probe succeeds)",
    )
    serve.add_argument(
        "--max-viewers",
        dest="max_viewers",
        metavar="N",
        help="viewer capacity; beyond it WHEP answers 503",
    )
    serve.add_argument(
        "--counter-offer-ttl",
        dest="counter_offer_ttl",
        metavar="SECONDS",
        help="how long a WHEP 406 counter-offer waits for its answer",
    )
    serve.add_argument(
        "--session-connect-timeout",
        dest="session_connect_timeout",
        metavar="SECONDS",
        help="a WHIP/WHEP session not connected (ICE + DTLS) this long after its POST is "
        "ended, freeing its slot (default 10; not publish's --connect-timeout)",
    )
    serve.add_argument(
        "--max-pending-sessions",
        dest="max_pending_sessions",
        metavar="N",
        help="viewers admitted and not connected yet at most; beyond it WHEP answers 503 "
        "(default: max(64, max-viewers / 4))",
    )
    serve.add_argument(
        "--ended-session-grace",
        dest="ended_session_grace",
        metavar="SECONDS",
        help="how long a DELETE of a session that already ended still answers 200 (default 60)",
    )
    serve.add_argument(
        "--log-level", dest="log_level", choices=["debug", "info", "warning", "error"]
    )
    serve.add_argument(
        "--workers", metavar="N", help="media worker processes, one UDP port each (default 1)"
    )
    serve.add_argument(
        "--worker-packet-budget",
        dest="worker_packet_budget",
        metavar="PPS",
        help="packets/s one worker may send; beyond it WHEP answers 503. Default 'auto': "
        "measured at start-up (as 'whepfan calibrate' does) x 0.7; 'none': unbounded",
    )
    serve.add_argument(
        "--egress-budget",
        dest="egress_budget",
        metavar="BPS",
        help="egress bits/s for the server (e.g. NIC rate x 0.8)",
    )
    serve.add_argument(
        "--stream-viewer-cap", dest="stream_viewer_cap", metavar="N", help="viewers per stream"
    )
    serve.add_argument(
        "--admit-lower-layer",
        dest="admit_lower_layer",
        action="store_const",
        const=True,
        help="when full, admit new viewers on a lower simulcast layer before refusing",
    )
    # Beyond one box (whepfan/cluster/, docs/scaling.md).
    for flag, metavar, text in (
        (
            "--upstream",
            "URL",
            "pull streams from this WHEP origin, a template with {stream} "
            "(https://origin/whep/{stream}): this node is its edge",
        ),
        ("--upstream-token", "TOKEN", "bearer token for --upstream"),
        ("--cluster", "URL", "join the cluster registered in this Redis (redis://HOST:PORT/DB)"),
        ("--node-url", "URL", "this node's public HTTP(S) URL, as nodes and viewers reach it"),
        ("--cluster-token", "TOKEN", "the token nodes of the cluster pull from each other with"),
        ("--max-upstream-pulls", "N", "upstream sessions this node serves to other nodes"),
        ("--upstream-grace", "SECONDS", "keep an upstream this long after its last viewer (30)"),
        (
            "--placement-grant-ttl",
            "SECONDS",
            "a 307's placement grant (for browsers, which drop Authorization on a "
            "redirect to another node) is valid this long (30)",
        ),
    ):
        serve.add_argument(flag, dest=flag[2:].replace("-", "_"), metavar=metavar, help=text)
    serve.add_argument(
        "--drain-timeout",
        dest="drain_timeout",
        metavar="SECONDS",
        help="on SIGTERM, how long to wait for viewers to leave (default 30)",
    )
    # HTTP connection hygiene and the POST rate limit (whepfan/http/connections.py,
    # whepfan/http/ratelimit.py).
    for flag, metavar, text in (
        ("--http-header-timeout", "SECONDS", "time to send a request's headers (default 10)"),
        ("--http-body-timeout", "SECONDS", "time to send a request's body (default 10)"),
        ("--http-idle-timeout", "SECONDS", "idle keep-alive connections close (default 60)"),
        (
            "--http-max-connections",
            "N",
            "open HTTP connections at most; idle ones are closed first to make room "
            "(default: the file limit minus 64)",
        ),
        (
            "--post-rate-limit",
            "PER_SECOND",
            "POSTs per second per client address, 429 beyond (default 10; 0: off; "
            "loopback clients are exempt)",
        ),
        ("--post-burst", "N", "POSTs a client address may send at once (default 50)"),
        (
            "--max-pending-per-client",
            "N",
            "WHIP/WHEP sessions a client address may have answered and not connected "
            "(ICE + DTLS) yet; beyond it the POST gets 429 (default 16; 0: off; loopback "
            "clients are exempt)",
        ),
    ):
        serve.add_argument(flag, dest=flag[2:].replace("-", "_"), metavar=metavar, help=text)
    # Clients behind a reverse proxy (whepfan/http/clientaddr.py).
    serve.add_argument(
        "--trusted-proxy",
        dest="trusted_proxy",
        action="append",
        metavar="CIDR",
        help="a reverse proxy (address or network) whose --forwarded-header names the "
        "client; per-client limits then use that address (repeatable; default none)",
    )
    serve.add_argument(
        "--forwarded-header",
        dest="forwarded_header",
        choices=("x-forwarded-for", "forwarded"),
        help="the header the trusted proxies write the client into: X-Forwarded-For "
        "(default) or Forwarded (RFC 7239); the other is ignored",
    )
    add_publish_command(commands)
    add_loadtest_command(commands)
    add_demo_command(commands)
    add_calibrate_command(commands)
    return parser


# --- client tools: whepfan publish, whepfan loadtest (README "Load testing") -------------


def _bitrate(text: str) -> int:
    """ "800k", "2.5M" or "1500000" as bits per second."""
    factors = {"k": 1_000, "m": 1_000_000}
    factor = factors.get(text[-1:].lower(), 1)
    number = text[:-1] if factor != 1 else text
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a bitrate: {text!r} (e.g. 800k, 2M)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("the bitrate must be positive")
    return value


def _size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 640x360)")
    return int(width), int(height)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def add_publish_command(commands: argparse._SubParsersAction) -> None:
    publish = commands.add_parser(
        "publish",
        help="publish a synthetic test stream over WHIP",
        description="WHIP publisher of a moving test pattern with a burned-in clock and "
        "frame counter plus a tone, encoded once (libvpx/libx264, Opus) and sent until "
        "--duration passes or Ctrl-C. Answers PLI/FIR with a keyframe and NACK from history.",
    )
    publish.add_argument("url", metavar="URL", help="WHIP endpoint, e.g. http://host/whip/live")
    publish.add_argument("--token", metavar="T", help="bearer token")
    publish.add_argument("--codec", choices=["vp8", "h264"], default="vp8")
    publish.add_argument(
        "--simulcast", action="store_true", help="three encodings, rids q/h/f (RFC 8853)"
    )
    publish.add_argument(
        "--bitrate",
        type=_bitrate,
        default=1_000_000,
        metavar="BPS",
        help="video bitrate of the top encoding (800k, 2M; default 1M)",
    )
    publish.add_argument("--size", type=_size, default=(640, 360), metavar="WxH")
    publish.add_argument("--fps", type=int, default=30)
    publish.add_argument("--duration", type=_positive_float, metavar="S", help="stop after S s")
    publish.add_argument(
        "--keyframe-interval",
        dest="keyframe_interval",
        type=_positive_float,
        default=10.0,
        metavar="S",
        help="seconds between keyframes nobody asked for (default 10)",
    )
    publish.add_argument(
        "--connect-timeout",
        dest="connect_timeout",
        type=_positive_float,
        default=10.0,
        metavar="S",
        help="give up when ICE and DTLS have not connected after S s, saying what was "
        "tried (default 10)",
    )
    publish.add_argument("--no-audio", dest="audio", action="store_false")
    publish.add_argument("--no-video", dest="video", action="store_false")
    publish.add_argument(
        "--no-reconnect",
        dest="reconnect",
        action="store_false",
        help="exit when the session fails or ends instead of publishing again (with "
        "backoff 0.5 s to 8 s) until --duration passes",
    )
    publish.add_argument(
        "--log-level",
        dest="log_level",
        default="info",
        choices=["debug", "info", "warning", "error"],
    )


def run_publish(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from whepfan.client.publisher import (
        Publisher,
        PublisherOptions,
        PublishError,
        ReconnectingPublisher,
    )

    try:
        options = PublisherOptions(
            url=args.url,
            token=args.token,
            codec=args.codec,
            simulcast=args.simulcast,
            bitrate=args.bitrate,
            width=args.size[0],
            height=args.size[1],
            fps=args.fps,
            keyframe_interval=args.keyframe_interval,
            connect_timeout=args.connect_timeout,
            audio=args.audio,
            video=args.video,
        )
    except ValueError as exc:
        print(f"whepfan publish: {exc}", file=sys.stderr)
        return EXIT_USAGE

    async def publish_again() -> int:
        publisher = ReconnectingPublisher(options)
        await publisher.run(args.duration)
        print(f"whepfan publish: {publisher.stats}", file=sys.stderr)
        return 0

    async def publish() -> int:
        if args.reconnect:
            return await publish_again()
        async with Publisher(options) as publisher:
            await publisher.wait(args.duration)
            print(f"whepfan publish: {publisher.stats.as_dict()}", file=sys.stderr)
            if publisher.failure is not None:
                print(f"whepfan publish: {publisher.failure}", file=sys.stderr)
                return 1
        return 0

    async def publish_until_stopped() -> int:
        # SIGTERM (systemctl stop, docker stop) ends the run as Ctrl-C does: the main task
        # is cancelled and the session DELETEd on the way out (RFC 9725 §4.3), so a
        # replacement publisher is accepted at once instead of after the media timeout.
        main = asyncio.current_task()
        assert main is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
        return await publish()

    try:
        return asyncio.run(publish_until_stopped())
    except PublishError as exc:
        print(f"whepfan publish: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 0


def add_loadtest_command(commands: argparse._SubParsersAction) -> None:
    loadtest = commands.add_parser(
        "loadtest",
        help="load-test a WHEP endpoint with N real viewers",
        description="N WHEP viewers, each a real WebRTC session (full ICE as controlling "
        "agent, DTLS client or server, SRTP unprotected in the compiled core), with "
        "per-viewer join latencies, loss, duplicates, jitter, bitrate and stalls. Exit "
        "status 0 when every viewer connected, received media and never stalled; 3 "
        "otherwise; 4 when the server refused every viewer or none reached it (the run stops "
        "early).",
    )
    loadtest.add_argument("url", metavar="URL", help="WHEP endpoint, e.g. http://host/whep/live")
    loadtest.add_argument("--viewers", type=int, required=True, metavar="N")
    loadtest.add_argument(
        "--ramp",
        type=_positive_float,
        metavar="N_PER_S",
        help="start viewers at this rate (default: 50 per second)",
    )
    loadtest.add_argument(
        "--duration",
        type=_positive_float,
        default=10.0,
        metavar="S",
        help="seconds every viewer stays after the last one started (default 10)",
    )
    loadtest.add_argument("--token", metavar="T", help="bearer token")
    loadtest.add_argument("--json", type=Path, metavar="FILE", help="write the JSON report")
    loadtest.add_argument("--html", type=Path, metavar="FILE", help="write the HTML report")
    loadtest.add_argument(
        "--verify-every",
        dest="verify_every",
        type=int,
        default=1,
        metavar="K",
        help="decrypt every K-th packet after the first keyframe, count all (default 1)",
    )
    loadtest.add_argument(
        "--setup-timeout",
        dest="setup_timeout",
        type=_positive_float,
        default=10.0,
        metavar="S",
        help="give up on a viewer not connected after S s (default 10)",
    )
    loadtest.add_argument(
        "--poll-ms",
        dest="poll_ms",
        type=float,
        default=10.0,
        metavar="MS",
        help="read connected viewers' sockets every MS milliseconds instead of waking on "
        "each datagram, which on loopback the server pays for (default 10; 0 = wake)",
    )
    loadtest.add_argument(
        "--stall-gap",
        dest="stall_gap",
        type=_positive_float,
        default=2.0,
        metavar="S",
        help="a viewer that receives nothing for over S s has stalled; stalls fail the "
        "run (default 2)",
    )
    loadtest.add_argument(
        "--server-metrics",
        dest="server_metrics",
        metavar="URL",
        help="scrape the server's Prometheus /metrics once a second during the run, for "
        "the report's server CPU and receive-delay charts",
    )
    loadtest.add_argument(
        "--server-metrics-token",
        dest="server_metrics_token",
        metavar="T",
        help="bearer token for --server-metrics (the server's --metrics-token)",
    )
    loadtest.add_argument("--quiet", action="store_true", help="no live progress line")


def run_loadtest(args: argparse.Namespace) -> int:
    from whepfan.client.loadtest import LoadTestOptions, run_from_command_line

    try:
        options = LoadTestOptions(
            url=args.url,
            viewers=args.viewers,
            ramp=args.ramp or 50.0,
            duration=args.duration,
            token=args.token,
            verify_every=args.verify_every,
            setup_timeout=args.setup_timeout,
            poll_interval=args.poll_ms / 1000,
            stall_gap=args.stall_gap,
            server_metrics=args.server_metrics,
            server_metrics_token=args.server_metrics_token,
        )
    except ValueError as exc:
        print(f"whepfan loadtest: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return run_from_command_line(
        options, json_path=args.json, html_path=args.html, progress=not args.quiet
    )


# --- whepfan demo: serve and publish a built-in test stream (README "Quick start") ----

DEMO_STREAM = "demo"
DEMO_RETRY_SECONDS = 2.0


def add_demo_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = commands.add_parser(
        "demo",
        help="serve and publish a built-in test stream, print the URL that plays it",
        description="Run the server and publish a moving test pattern with a clock and "
        "a tone to it over WHIP, then print the page that plays it. The server options "
        "are those of `whepfan serve` (also from WHEPFAN_* variables).",
    )
    demo.set_defaults(subparser=demo)
    demo.add_argument("--http", metavar="HOST:PORT", help="HTTP address (127.0.0.1:8080)")
    demo.add_argument("--udp", metavar="HOST:PORT", help="media UDP address (0.0.0.0:8189)")
    demo.add_argument(
        "--public-ip",
        dest="public_ip",
        action="append",
        metavar="ADDR",
        help="address advertised as ICE candidate (repeatable; default: the --udp address, "
        "or every non-loopback interface address when --udp binds all of them)",
    )
    demo.add_argument("--stream", default=DEMO_STREAM, metavar="NAME", help="stream name")
    demo.add_argument("--codec", choices=["vp8", "h264"], default="vp8")
    demo.add_argument("--size", type=_size, default=(640, 360), metavar="WxH")
    demo.add_argument(
        "--log-level", dest="log_level", choices=["debug", "info", "warning", "error"]
    )


def run_demo(args: argparse.Namespace) -> int:
    import uvloop

    given = {"http": args.http, "udp": args.udp, "public_ip": args.public_ip}
    given["log_level"] = args.log_level or "warning"
    try:
        settings = Settings.resolve(cli=given, environ=dict(os.environ))
    except SettingsError as exc:
        args.subparser.error(str(exc))  # exits with status 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not settings.public_ips and settings.binds_every_address:
        from whepfan.media.transport import interface_addresses

        # The wildcard socket reaches every address, and the in-process publisher (which
        # sends from 127.0.0.1) needs a loopback candidate of its own; browsers skip
        # 127.x and use the others. A socket bound to one address advertises that one
        # (Settings.advertised_ips).
        addresses = dict.fromkeys([*interface_addresses(), "127.0.0.1"])
        settings = dataclasses.replace(settings, public_ips=tuple(addresses))
    try:
        return uvloop.run(_demo(settings, args))
    except SettingsError as exc:  # an address in use, a TLS file that cannot be read
        return usage_error(args.subparser, str(exc))
    except OSError as exc:
        print(f"whepfan demo: {exc}", file=sys.stderr)
        return 1


async def _demo(settings: Settings, args: argparse.Namespace) -> int:
    """The server, and the synthetic publisher posting to it, in one event loop."""
    import asyncio
    import signal

    from whepfan.client.publisher import Publisher, PublisherOptions, PublishError
    from whepfan.server import RunningServer, run

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    started: asyncio.Future[RunningServer] = loop.create_future()
    server = loop.create_task(run(settings, stop=stop, started=started.set_result))
    first: set[asyncio.Future[Any]] = {server, started}
    await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
    if not started.done():
        await server  # it ended before serving: raises why (address taken, bad TLS files)
        return 1
    info = started.result()
    stream = args.stream
    options = PublisherOptions(
        url=f"{info.http_url}/whip/{stream}",
        token=info.publish_token,
        codec=args.codec,
        width=args.size[0],
        height=args.size[1],
    )
    # The view token, when one is configured, rides in the fragment, never the query.
    fragment = f"#token={info.view_token}" if info.view_token else ""
    shown = False
    while not stop.is_set():
        try:
            async with Publisher(options) as publisher:
                if not shown:
                    shown = True
                    print(
                        f"whepfan demo: publishing a test pattern with a clock and a tone "
                        f"to {stream!r}\n"
                        f"  watch:   {info.http_url}/watch/{stream}{fragment}\n"
                        f"  WHEP:    {info.http_url}/whep/{stream}\n"
                        f"  streams: {info.http_url}/{fragment}\n"
                        f"  publish your own: {info.http_url}/publish/<name>#token="
                        f"{info.publish_token}\n"
                        "Press Ctrl+C to stop.",
                        flush=True,
                    )
                ended = loop.create_task(publisher.wait())
                stopped = loop.create_task(stop.wait())
                await asyncio.wait({ended, stopped}, return_when=asyncio.FIRST_COMPLETED)
                ended.cancel()
                stopped.cancel()
                failure = publisher.failure
        except PublishError as exc:
            failure = str(exc)
        if failure is not None and not stop.is_set():
            # The demo keeps serving: publish again shortly (the viewers resume).
            logging.getLogger("whepfan.demo").warning("demo publisher: %s; retrying", failure)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), DEMO_RETRY_SECONDS)
    await server
    return 0


def settings_from_args(args: argparse.Namespace, environ: dict[str, str]) -> Settings:
    cli = {k: v for k, v in vars(args).items() if k not in ("command", "config", "subparser")}
    return Settings.resolve(cli=cli, environ=environ, config_path=args.config)


def usage_error(parser: argparse.ArgumentParser, message: str) -> int:
    """What ``parser.error`` prints (the subcommand's usage, then the error), as a status
    to return: for errors found once the server starts (an address in use)."""
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


# --- whepfan calibrate: this machine's per-packet cost -> --worker-packet-budget -------


def add_calibrate_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    calibrate = commands.add_parser(
        "calibrate",
        help="measure this machine's per-packet send cost and suggest a worker packet budget",
        description="Protect and send packets to loopback sockets with the compiled send "
        "loop, report CPU microseconds per packet and the per-worker packet budget.",
    )
    calibrate.add_argument("--packet-size", dest="packet_size", type=int, default=1200)
    calibrate.add_argument("--packets", type=int, default=200_000)
    calibrate.add_argument("--destinations", type=int, default=200)
    calibrate.add_argument("--profile", choices=["gcm", "cm"], default="gcm")
    calibrate.add_argument("--headroom", type=_positive_float, default=0.7)


def run_calibrate(args: argparse.Namespace) -> int:
    from whepfan.workers.calibrate import calibrate, report

    try:
        result = calibrate(
            destinations=args.destinations,
            packet_size=args.packet_size,
            packets=args.packets,
            profile=args.profile,
            headroom=args.headroom,
        )
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"whepfan calibrate: {exc}", file=sys.stderr)
        return 1
    print(report(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        return run_demo(args)
    if args.command == "calibrate":
        return run_calibrate(args)
    if args.command in ("publish", "loadtest"):
        logging.basicConfig(
            level=getattr(args, "log_level", "warning").upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        return run_publish(args) if args.command == "publish" else run_loadtest(args)
    try:
        settings = settings_from_args(args, dict(os.environ))
    except SettingsError as exc:
        args.subparser.error(str(exc))  # `whepfan serve` usage, exit status 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from whepfan.server import serve  # the media stack loads only for "serve"

    try:
        serve(settings)
    except SettingsError as exc:  # server.BindError (an address in use), TLS files
        return usage_error(args.subparser, str(exc))
    except OSError as exc:
        print(f"whepfan serve: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
