"""The ``whepfan`` command. ``whepfan serve`` runs the server (see ``whepfan serve --help``).

Every option can also come from a ``WHEPFAN_*`` environment variable or the TOML file
given by ``--config``; the command line wins, then the environment, then the file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

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
    # default=None everywhere: "not given" must not override the environment or the file.
    serve.add_argument("--config", type=Path, metavar="FILE", help="TOML settings file")
    serve.add_argument("--http", metavar="HOST:PORT", help="HTTP address (127.0.0.1:8080)")
    serve.add_argument("--udp", metavar="HOST:PORT", help="media UDP address (0.0.0.0:8189)")
    serve.add_argument(
        "--public-ip",
        dest="public_ip",
        action="append",
        metavar="ADDR",
        help="address advertised as ICE candidate (repeatable; default: every "
        "non-loopback interface address)",
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
        "--ice-server",
        dest="ice_server",
        action="append",
        metavar="URI",
        help="STUN/TURN server for clients (repeatable): URI[;username=U;credential=C] or "
        "URI;secret=S[;ttl=SECONDS] for TURN REST time-limited credentials",
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
        "--log-level", dest="log_level", choices=["debug", "info", "warning", "error"]
    )
    return parser


def settings_from_args(args: argparse.Namespace, environ: dict[str, str]) -> Settings:
    cli = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    return Settings.resolve(cli=cli, environ=environ, config_path=args.config)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args, dict(os.environ))
    except SettingsError as exc:
        parser.error(str(exc))  # exits with status 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from whepfan.server import serve  # the media stack loads only for "serve"

    try:
        serve(settings)
    except SettingsError as exc:
        print(f"whepfan: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # the HTTP or UDP address is taken or not ours
        print(f"whepfan: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
