"""Server settings: one frozen dataclass, resolved from (highest first) command-line
options, ``WHEPFAN_*`` environment variables, a TOML file, and defaults.

Every option has the same name everywhere: ``--publish-token`` on the command line,
``WHEPFAN_PUBLISH_TOKEN`` in the environment, ``publish_token`` in the TOML file.
Repeatable options (``public_ip``, ``ice_server``, ``turn_url``, ``trusted_proxy``) are
lists in TOML (where the plural, ``trusted_proxies``, is accepted too) and comma-separated
in the environment; a value from a higher source replaces the whole list.

A bad value is reported as it was given, so the operator can find it:
``WHEPFAN_MAX_VIEWERS=many: not an integer``, ``--udp 1.2.3.4:70000: not HOST:PORT``,
``/etc/whepfan.toml: max_viewers: not an integer``.
"""

from __future__ import annotations

import ipaddress
import secrets
import shlex
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from whepfan.config import MediaConfig
from whepfan.errors import ParseError
from whepfan.http.clientaddr import ForwardedHeader, TrustedProxies, parse_networks
from whepfan.http.connections import ConnectionLimits
from whepfan.http.links import DEFAULT_CREDENTIAL_TTL, IceServer, turn_rest_servers
from whepfan.http.pending import DEFAULT_MAX_PENDING_PER_CLIENT, PendingLimit
from whepfan.http.placement_grants import DEFAULT_TTL as DEFAULT_PLACEMENT_GRANT_TTL
from whepfan.http.placement_grants import MAX_TTL as MAX_PLACEMENT_GRANT_TTL
from whepfan.http.placement_grants import PlacementGrants
from whepfan.http.ratelimit import RateLimit
from whepfan.http.routes import DEFAULT_COUNTER_OFFER_TTL, HttpOptions
from whepfan.http.tokens import DEFAULT_LEEWAY, JwtPolicy, JwtVerifier, KeyConfigError, secret_key
from whepfan.http.tombstones import DEFAULT_ENDED_SESSION_GRACE
from whepfan.workers.capacity import CapacityPolicy, default_max_pending

ENV_PREFIX = "WHEPFAN_"
# worker_packet_budget = "auto": measured by `whepfan serve` at start-up (whepfan calibrate's
# send loop, briefly) x the calibration headroom; "none": no packet budget at all.
AUTO_BUDGET: Literal["auto"] = "auto"
NO_BUDGET_WORDS = frozenset({"none", "unbounded", "off"})


class SettingsError(ValueError):
    """A setting is missing, malformed or inconsistent (the CLI exits with status 2).

    ``option`` names the setting at fault (``max_viewers``), if one is; ``reason`` says
    what is wrong with it. :meth:`Settings.resolve` restates the option as the operator
    gave it (``WHEPFAN_MAX_VIEWERS=many``, ``--max-viewers many``, ``FILE: max_viewers``).
    """

    def __init__(self, reason: str, *, option: str | None = None) -> None:
        super().__init__(f"{option}: {reason}" if option else reason)
        self.option = option
        self.reason = reason


def parse_host_port(value: str, *, what: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``:PORT`` (all interfaces)."""
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise SettingsError("not HOST:PORT (e.g. 127.0.0.1:8080, [::1]:8080, :8189)", option=what)
    return host or "0.0.0.0", int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    udp_host: str = "0.0.0.0"
    udp_port: int = 8189
    public_ips: tuple[str, ...] = ()
    publish_token: str | None = None
    view_token: str | None = None
    # Bearer token for GET /metrics; None leaves it open (the server warns off loopback).
    metrics_token: str | None = None
    # Scoped JWTs besides the static tokens (whepfan/http/tokens.py): an HS256 secret, a
    # PEM public key, a JWKS file; the aud and iss they must name; clock skew on exp/nbf.
    jwt_secret: str | None = None
    jwt_public_key: Path | None = None
    jwt_jwks: Path | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway: float = DEFAULT_LEEWAY
    ice_servers: tuple[IceServer, ...] = ()
    # A TURN deployment sharing a secret with us (coturn's use-auth-secret): each WHIP/WHEP
    # response carries fresh credentials for these URLs (draft-uberti-behave-turn-rest-00).
    turn_urls: tuple[str, ...] = ()
    turn_secret: str | None = field(default=None, repr=False)
    turn_credential_ttl: int = DEFAULT_CREDENTIAL_TTL
    tls_cert: Path | None = None
    tls_key: Path | None = None
    allow_insecure_http: bool = False
    strict_etag: bool = False
    publisher_takeover: bool = False
    max_viewers: int = MediaConfig().max_viewers
    counter_offer_ttl: float = DEFAULT_COUNTER_OFFER_TTL
    # A publisher with no media this long is stalled: "inactive", and a new WHIP POST
    # may replace it (media/liveness.py).
    media_timeout: float = MediaConfig().media_timeout
    # Admission that cannot be squatted (media/session.py, workers/capacity.py): a
    # session not connected (ICE + DTLS) this long after its POST is ended, freeing its
    # slot; viewers admitted and not connected yet at most (None: default_max_pending).
    session_connect_timeout: float = MediaConfig().connect_timeout
    max_pending_sessions: int | None = None
    # How long a DELETE of a session that ended on its own still answers 200 (RFC 9725 §4.3).
    ended_session_grace: float = DEFAULT_ENDED_SESSION_GRACE
    log_level: str = "info"
    # UDP GSO for the fan-out (media/gso.py): auto, on or off.
    gso: str = "auto"
    # Scale-out and capacity (DESIGN.md §2): worker processes (1 = in-process), budgets
    # (None = unbounded) and the SIGTERM drain.
    workers: int = 1
    # Packets/s per worker. The default measures this machine at start-up: a server that
    # admits past what its cores can send does not refuse, it falls behind, and every
    # viewer's latency grows (bench/capacity.py shows it). None: unbounded.
    worker_packet_budget: float | Literal["auto"] | None = AUTO_BUDGET
    egress_budget: float | None = None  # bits/s for the server (e.g. NIC rate x 0.8)
    stream_viewer_cap: int | None = None
    admit_lower_layer: bool = False
    drain_timeout: float = 30.0
    # HTTP connection hygiene (whepfan/http/connections.py): seconds to send a request
    # head, to send a body, to keep an idle keep-alive connection; the connection cap
    # (None: the file limit minus a reserve). POSTs per second and burst per client
    # address (whepfan/http/ratelimit.py; 0 turns the limit off; loopback is exempt).
    http_header_timeout: float = 10.0
    http_body_timeout: float = 10.0
    http_idle_timeout: float = 60.0
    http_max_connections: int | None = None
    post_rate_limit: float = 10.0
    post_burst: int = 50
    # Sessions (WHIP and WHEP) one client address may have answered and not connected
    # yet (whepfan/http/pending.py; 0: no cap; loopback is exempt). Reverse proxies
    # (CIDRs) whose forwarding header, X-Forwarded-For or Forwarded, names the client
    # (whepfan/http/clientaddr.py); every per-client limit uses that address.
    max_pending_per_client: int = DEFAULT_MAX_PENDING_PER_CLIENT
    trusted_proxies: tuple[str, ...] = ()
    forwarded_header: str = ForwardedHeader.X_FORWARDED_FOR.value
    # Beyond one box (whepfan/cluster/, DESIGN.md §7): a fixed WHEP origin to pull streams
    # from ("https://origin/whep/{stream}") and its token; or a Redis registry of nodes
    # (redis://HOST:PORT/DB), this node's public URL and the token nodes pull with; the
    # upstream sessions this node serves at most (None: unbounded); how long an upstream
    # stays after its last viewer; how long the placement grant a 307 carries for a
    # browser (which drops Authorization on the redirect) stays valid.
    upstream: str | None = None
    upstream_token: str | None = field(default=None, repr=False)
    cluster: str | None = None
    node_url: str | None = None
    cluster_token: str | None = field(default=None, repr=False)
    max_upstream_pulls: int | None = None
    upstream_grace: float = 30.0
    placement_grant_ttl: float = DEFAULT_PLACEMENT_GRANT_TTL
    # Set by with_generated_publish_token(); lets the server log the token it made.
    publish_token_generated: bool = field(default=False, compare=False)
    # Option -> how the operator gave it (``WHEPFAN_TLS_KEY=/etc/k.pem``), set by
    # resolve(), for errors found after resolving (a TLS file that cannot be read).
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            given = "tls_cert" if self.tls_key is None else "tls_key"
            raise SettingsError("--tls-cert and --tls-key go together", option=given)
        if (
            self.tls_cert is None
            and not self.allow_insecure_http
            and not _is_loopback(self.http_host)
        ):
            # WHEP draft-03 §5 / RFC 9725 §6: HTTPS SHALL be used; bearer tokens and
            # session URLs are credentials.
            raise SettingsError(
                f"plain HTTP on {self.http_host} would send tokens in clear text: give "
                "--tls-cert/--tls-key, bind to loopback, or pass --allow-insecure-http",
                option="http",
            )
        for address in self.public_ips:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise SettingsError(
                    f"{address!r} is not an IP address", option="public_ip"
                ) from None
        if self.max_viewers < 0:
            raise SettingsError("cannot be negative", option="max_viewers")
        if self.counter_offer_ttl <= 0:
            raise SettingsError("must be positive", option="counter_offer_ttl")
        if not self.media_timeout > 0:
            raise SettingsError("must be positive", option="media_timeout")
        if not self.session_connect_timeout > 0:
            raise SettingsError("must be positive", option="session_connect_timeout")
        if self.max_pending_sessions is not None and self.max_pending_sessions < 1:
            raise SettingsError("is at least 1", option="max_pending_sessions")
        if self.ended_session_grace < 0:
            raise SettingsError("cannot be negative", option="ended_session_grace")
        if self.workers < 1:
            raise SettingsError("is at least 1", option="workers")
        if self.gso not in ("auto", "on", "off"):
            raise SettingsError("is one of auto, on, off", option="gso")
        for name in ("worker_packet_budget", "egress_budget"):
            budget = getattr(self, name)
            if budget == AUTO_BUDGET and name == "worker_packet_budget":
                continue
            if budget is not None and (not isinstance(budget, int | float) or budget <= 0):
                raise SettingsError("must be positive", option=name)
        if self.stream_viewer_cap is not None and self.stream_viewer_cap < 0:
            raise SettingsError("cannot be negative", option="stream_viewer_cap")
        if self.drain_timeout < 0:
            raise SettingsError("cannot be negative", option="drain_timeout")
        for name in ("http_header_timeout", "http_body_timeout", "http_idle_timeout"):
            if not getattr(self, name) > 0:
                raise SettingsError("must be positive", option=name)
        if self.http_max_connections is not None and self.http_max_connections < 1:
            raise SettingsError("is at least 1", option="http_max_connections")
        if self.post_rate_limit < 0:
            raise SettingsError("cannot be negative (0 turns it off)", option="post_rate_limit")
        if self.post_burst < 1:
            raise SettingsError("is at least 1", option="post_burst")
        if self.max_pending_per_client < 0:
            raise SettingsError(
                "cannot be negative (0 turns it off)", option="max_pending_per_client"
            )
        try:
            parse_networks(self.trusted_proxies)
        except ValueError as exc:
            raise SettingsError(str(exc), option="trusted_proxy") from None
        headers = [header.value for header in ForwardedHeader]
        if self.forwarded_header.lower() not in headers:
            raise SettingsError(f"is one of {', '.join(headers)}", option="forwarded_header")
        try:
            JwtPolicy(leeway=self.jwt_leeway)
            if self.jwt_secret is not None:
                secret_key(self.jwt_secret)
        except KeyConfigError as exc:
            raise SettingsError(str(exc)) from None
        for name in ("publish_token", "view_token", "metrics_token"):
            token = getattr(self, name)
            if token is not None and (not token or any(c.isspace() for c in token)):
                raise SettingsError("tokens are non-empty and contain no whitespace", option=name)
        if bool(self.turn_urls) != (self.turn_secret is not None):
            raise SettingsError("--turn-url and --turn-secret go together")
        if self.turn_credential_ttl <= 0:
            raise SettingsError("turn_credential_ttl must be positive")
        try:
            self.turn_servers()
        except ParseError as exc:
            raise SettingsError(f"turn_url: {exc.detail}") from None
        self._check_cluster()
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise SettingsError(
                f"{self.log_level!r} is not debug/info/warning/error", option="log_level"
            )

    def _check_cluster(self) -> None:
        if self.upstream is not None and "{stream}" not in self.upstream:
            raise SettingsError(
                "a WHEP URL template with {stream}, e.g. https://origin/whep/{stream}",
                option="upstream",
            )
        if self.upstream is not None and self.cluster is not None:
            raise SettingsError("--upstream (a fixed origin) and --cluster exclude each other")
        if self.cluster is not None:
            if not self.cluster.startswith(("redis://", "rediss://", "unix://")):
                raise SettingsError("a Redis URL: redis://HOST:PORT/DB", option="cluster")
            if self.cluster_token is None:
                raise SettingsError("--cluster needs --cluster-token", option="cluster")
            if self.node_url is None:
                raise SettingsError("--cluster needs --node-url", option="cluster")
        if self.node_url is not None and not self.node_url.startswith(("http://", "https://")):
            raise SettingsError("this node's public http(s) URL", option="node_url")
        if self.max_upstream_pulls is not None and self.max_upstream_pulls < 0:
            raise SettingsError("cannot be negative", option="max_upstream_pulls")
        if self.upstream_grace < 0:
            raise SettingsError("cannot be negative", option="upstream_grace")
        if not 0 < self.placement_grant_ttl <= MAX_PLACEMENT_GRANT_TTL:
            raise SettingsError(
                f"more than 0 and at most {MAX_PLACEMENT_GRANT_TTL:g} seconds",
                option="placement_grant_ttl",
            )
        for name in ("upstream_token", "cluster_token"):
            token = getattr(self, name)
            if token is not None and (not token or any(c.isspace() for c in token)):
                raise SettingsError("tokens are non-empty and contain no whitespace", option=name)

    def given_as(self, option: str) -> str:
        """How ``option`` was given (``--tls-key k.pem``), or its name if by default.

        A file's path is always part of it: a config file's origin is only
        ``FILE: key``, and "whepfan.toml: tls_key: No such file or directory" would not
        say which file is missing."""
        origin = self.origins.get(option, option)
        value = getattr(self, option, None)
        if isinstance(value, Path) and str(value) not in origin:
            return f'{origin} = "{value}"'
        return origin

    @property
    def insecure_http(self) -> bool:
        """Plain HTTP off loopback (allowed only by --allow-insecure-http)."""
        return self.tls_cert is None and not _is_loopback(self.http_host)

    @property
    def open_metrics_off_loopback(self) -> bool:
        """``/metrics`` readable without a token by anyone who reaches the HTTP port."""
        return self.metrics_token is None and not _is_loopback(self.http_host)

    @property
    def jwt_configured(self) -> bool:
        """A JWT key is set: every role then needs a credential (whepfan/http/auth.py)."""
        return any(key is not None for key in (self.jwt_secret, self.jwt_public_key, self.jwt_jwks))

    def jwt_verifier(self) -> JwtVerifier | None:
        """The JWT verifier for the ``jwt_*`` settings (reads the key files), or None."""
        try:
            return JwtVerifier.from_settings(
                secret=self.jwt_secret,
                public_key=self.jwt_public_key,
                jwks=self.jwt_jwks,
                policy=JwtPolicy(
                    audience=self.jwt_audience, issuer=self.jwt_issuer, leeway=self.jwt_leeway
                ),
            )
        except KeyConfigError as exc:
            raise SettingsError(str(exc)) from None

    def with_generated_publish_token(self) -> Settings:
        """With no publish token configured, make one, so publishing is never open by
        accident; the caller logs it (``publish_token_generated``). Not with a JWT key:
        publishing then takes JWTs, and a static token nobody asked for would be one more
        credential, printed in the log."""
        if self.publish_token is not None or self.jwt_configured:
            return self
        return replace(self, publish_token=secrets.token_urlsafe(24), publish_token_generated=True)

    @property
    def binds_every_address(self) -> bool:
        """The media socket is bound to a wildcard (``0.0.0.0`` or ``::``)."""
        try:
            return ipaddress.ip_address(self.udp_host).is_unspecified
        except ValueError:
            return False  # a host name: bound to the one address it resolves to

    def advertised_ips(self) -> tuple[str, ...]:
        """The addresses answers offer as host candidates (RFC 8839 §5.1).

        ``public_ips`` when given. Otherwise a socket bound to one address is reachable
        at that address only, so that is the one candidate: advertising the machine's
        other addresses would send the peer's checks where nothing listens, and ICE
        would fail with no hint why. Empty for a wildcard bind: the transport then
        advertises every interface address (``transport.interface_addresses``).
        """
        if self.public_ips or self.binds_every_address:
            return self.public_ips
        try:
            return (str(ipaddress.ip_address(self.udp_host)),)
        except ValueError:
            pass
        # A host name: the address the media socket will bind, resolved as bind() does
        # (the transport opens an IPv4 socket for anything without a colon).
        try:
            infos = socket.getaddrinfo(self.udp_host, None, socket.AF_INET, socket.SOCK_DGRAM)
        except OSError as exc:
            raise SettingsError(
                f"cannot resolve {self.udp_host!r}: {exc.strerror or exc}", option="udp"
            ) from None
        return (str(infos[0][4][0]),)

    def media_config(self) -> MediaConfig:
        values: dict[str, Any] = {
            "udp_host": self.udp_host,
            "udp_port": self.udp_port,
            "public_ips": self.advertised_ips(),
            "max_viewers": self.max_viewers,
            "media_timeout": self.media_timeout,
            "connect_timeout": self.session_connect_timeout,
            "gso": self.gso,
        }
        if "counter_offer_ttl" in {f.name for f in fields(MediaConfig)}:
            values["counter_offer_ttl"] = self.counter_offer_ttl
        return MediaConfig(**values)

    def with_measured_budget(self, measure: Callable[[], float]) -> Settings:
        """With ``worker_packet_budget = "auto"``, the budget ``measure()`` gives (the
        server passes whepfan calibrate's); any other setting is kept as it is."""
        if self.worker_packet_budget != AUTO_BUDGET:
            return self
        return replace(self, worker_packet_budget=float(measure()))

    def capacity_policy(self) -> CapacityPolicy:
        budget = self.worker_packet_budget
        if isinstance(budget, str):
            raise ValueError("measure the automatic budget first (with_measured_budget)")
        return CapacityPolicy(
            worker_packet_budget=budget,
            egress_bit_budget=self.egress_budget,
            stream_viewer_cap=self.stream_viewer_cap,
            admit_lower_layer=self.admit_lower_layer,
            max_viewers=self.max_viewers,
            max_pending=self.max_pending,
            connect_timeout=self.session_connect_timeout,
        )

    @property
    def max_pending(self) -> int:
        """Viewers admitted and not connected yet at most (``max_pending_sessions``, or
        by default a quarter of ``max_viewers`` and at least 64: capacity.py says why)."""
        if self.max_pending_sessions is not None:
            return self.max_pending_sessions
        return default_max_pending(self.max_viewers)

    def turn_servers(self) -> tuple[IceServer, ...]:
        """The ``turn_urls`` with time-limited credentials from ``turn_secret``."""
        if self.turn_secret is None:
            return ()
        return turn_rest_servers(self.turn_urls, self.turn_secret, ttl=self.turn_credential_ttl)

    def http_options(self) -> HttpOptions:
        return HttpOptions(
            publish_token=self.publish_token,
            view_token=self.view_token,
            cluster_token=self.cluster_token,
            jwt=self.jwt_verifier(),
            ice_servers=(*self.ice_servers, *self.turn_servers()),
            strict_etag=self.strict_etag,
            publisher_takeover=self.publisher_takeover,
            # A counter-offer's session goes at its connect deadline if that comes first
            # (it runs from the POST): valid-until and Expires say when it really goes.
            counter_offer_ttl=min(self.counter_offer_ttl, self.session_connect_timeout),
            ended_session_grace=self.ended_session_grace,
            pending_limit=PendingLimit(
                max_per_client=self.max_pending_per_client,
                connect_timeout=self.session_connect_timeout,
            )
            if self.max_pending_per_client > 0
            else None,
            trusted_proxies=TrustedProxies(
                networks=parse_networks(self.trusted_proxies),
                header=ForwardedHeader(self.forwarded_header.lower()),
            ),
            limits=ConnectionLimits(
                header_timeout=self.http_header_timeout,
                body_timeout=self.http_body_timeout,
                idle_timeout=self.http_idle_timeout,
                max_connections=self.http_max_connections,
            ),
            post_rate_limit=RateLimit(rate=self.post_rate_limit, burst=self.post_burst)
            if self.post_rate_limit > 0
            else None,
            public_url=self.node_url,
            placement_grants=self.placement_grants(),
        )

    def placement_grants(self) -> PlacementGrants | None:
        """A cluster node's placement grants (whepfan/http/placement_grants.py), keyed by
        the cluster token; None off a cluster. Make one per server: it holds the replay
        cache and the counters, shared by the HTTP layer and the cluster node."""
        if self.cluster is None or self.cluster_token is None or self.node_url is None:
            return None
        return PlacementGrants(
            cluster_token=self.cluster_token,
            node_url=self.node_url,
            ttl=self.placement_grant_ttl,
            credential_leeway=self.jwt_leeway,
        )

    @classmethod
    def resolve(
        cls,
        *,
        cli: Mapping[str, Any],
        environ: Mapping[str, str],
        config_path: Path | None = None,
    ) -> Settings:
        """Merge the sources: ``cli`` holds only the options given on the command line
        (raw values as argparse produced them), ``environ`` is the process environment."""
        raw: dict[str, Any] = {}
        # Option -> how the operator wrote it, to name it in errors.
        origins: dict[str, str] = {}
        path = config_path
        if path is None and environ.get(ENV_PREFIX + "CONFIG"):
            path = Path(environ[ENV_PREFIX + "CONFIG"])
        if path is not None:
            for name, (key, value) in _from_toml(path).items():
                raw[name] = value
                origins[name] = f"{path}: {key}"
        for name, value in _from_environ(environ).items():
            raw[name] = value
            variable = ENV_PREFIX + name.upper()
            shown = name not in _CREDENTIALS
            origins[name] = f"{variable}={shlex.quote(environ[variable])}" if shown else variable
        for name, value in cli.items():
            if value is None:
                continue
            raw[name] = value
            flag = "--" + name.replace("_", "-")
            shown = isinstance(value, str) and name not in _CREDENTIALS
            origins[name] = f"{flag} {shlex.quote(value)}" if shown else flag
        try:
            return cls(**_convert(raw), origins=origins)
        except SettingsError as exc:
            if exc.option is None:
                raise
            origin = origins.get(exc.option, exc.option)
            raise SettingsError(f"{origin}: {exc.reason}") from None


# Option name -> kind; the name is also the TOML key and the env suffix (upper-cased).
_OPTIONS: dict[str, str] = {
    "http": "host_port",
    "udp": "host_port",
    "public_ip": "list",
    "publish_token": "str",
    "view_token": "str",
    "metrics_token": "str",
    "jwt_secret": "str",
    "jwt_public_key": "path",
    "jwt_jwks": "path",
    "jwt_audience": "str",
    "jwt_issuer": "str",
    "jwt_leeway": "float",
    "ice_server": "ice_list",
    "turn_url": "list",
    "turn_secret": "str",
    "turn_credential_ttl": "int",
    "tls_cert": "path",
    "tls_key": "path",
    "allow_insecure_http": "bool",
    "strict_etag": "bool",
    "publisher_takeover": "bool",
    "max_viewers": "int",
    "counter_offer_ttl": "float",
    "media_timeout": "float",
    "session_connect_timeout": "float",
    "max_pending_sessions": "int",
    "ended_session_grace": "float",
    "log_level": "str",
    "gso": "str",
    "workers": "int",
    "worker_packet_budget": "budget",
    "egress_budget": "float",
    "stream_viewer_cap": "int",
    "admit_lower_layer": "bool",
    "drain_timeout": "float",
    "http_header_timeout": "float",
    "http_body_timeout": "float",
    "http_idle_timeout": "float",
    "http_max_connections": "int",
    "post_rate_limit": "float",
    "post_burst": "int",
    "max_pending_per_client": "int",
    "trusted_proxy": "list",
    "forwarded_header": "str",
    "upstream": "str",
    "upstream_token": "str",
    "cluster": "str",
    "node_url": "str",
    "cluster_token": "str",
    "max_upstream_pulls": "int",
    "upstream_grace": "float",
    "placement_grant_ttl": "float",
}


def _from_toml(path: Path) -> dict[str, tuple[str, Any]]:
    """Option name -> (the key as written in the file, its value)."""
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except OSError as exc:
        raise SettingsError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: {exc}") from None
    # The TOML may use the plural spelling for the lists (ice_servers = [...]).
    aliases = {
        "public_ips": "public_ip",
        "ice_servers": "ice_server",
        "turn_urls": "turn_url",
        "trusted_proxies": "trusted_proxy",
    }
    values: dict[str, tuple[str, Any]] = {}
    for key, value in document.items():
        name = aliases.get(key, key).replace("-", "_")
        if name not in _OPTIONS:
            known = ", ".join(sorted(_OPTIONS))
            raise SettingsError(f"{path}: unknown setting {key!r} (settings: {known})")
        values[name] = (key, value)
    return values


def _from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, kind in _OPTIONS.items():
        value = environ.get(ENV_PREFIX + name.upper())
        if value is None or value == "":
            continue
        if kind in ("list", "ice_list"):
            values[name] = [item.strip() for item in value.split(",") if item.strip()]
        else:
            values[name] = value
    return values


# Settings whose values are secrets (tokens, TURN credentials): errors name them without
# repeating the value onto a terminal or into a log.
_CREDENTIALS = frozenset(
    {
        "publish_token",
        "view_token",
        "metrics_token",
        "ice_server",
        "jwt_secret",
        "upstream_token",
        "cluster_token",
    }
)

# "list" options -> their Settings field.
_LIST_FIELDS = {
    "public_ip": "public_ips",
    "turn_url": "turn_urls",
    "trusted_proxy": "trusted_proxies",
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Turn merged raw values (strings from env/CLI, typed values from TOML) into fields."""
    out: dict[str, Any] = {}
    for name, value in raw.items():
        kind = _OPTIONS[name]
        try:
            if kind == "host_port":
                host, port = parse_host_port(_expect(value, str, name), what=name)
                out[f"{name}_host"], out[f"{name}_port"] = host, port
            elif kind == "list":
                items = _as_list(value)
                out[_LIST_FIELDS[name]] = tuple(_expect(item, str, name) for item in items)
            elif kind == "ice_list":
                out["ice_servers"] = tuple(_ice_server(item) for item in _as_list(value))
            elif kind == "str":
                out[name] = _expect(value, str, name)
            elif kind == "path":
                out[name] = Path(_expect(value, str, name))
            elif kind == "bool":
                out[name] = _bool(value, name)
            elif kind == "int":
                out[name] = _number(value, int, name)
            elif kind == "float":
                out[name] = float(_number(value, float, name))
            elif kind == "budget":
                out[name] = _budget(value, name)
        except ParseError as exc:
            raise SettingsError(exc.detail, option=name) from None
    return out


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _expect(value: Any, kind: type, name: str) -> Any:
    if not isinstance(value, kind):
        raise SettingsError(f"expected {kind.__name__}, got {type(value).__name__}", option=name)
    return value


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise SettingsError("not a boolean (true/false)", option=name)


def _number(value: Any, kind: type[int] | type[float], name: str) -> int | float:
    if isinstance(value, bool):
        raise SettingsError("expected a number", option=name)
    if isinstance(value, int | float) and (kind is float or isinstance(value, int)):
        return value
    if isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            pass
    what = "an integer" if kind is int else "a number"
    raise SettingsError(f"not {what}", option=name)


def _budget(value: Any, name: str) -> float | str | None:
    """A number, "auto" or "none" (also "unbounded"/"off"), from any source."""
    if isinstance(value, str) and value.strip().lower() == AUTO_BUDGET:
        return AUTO_BUDGET
    if isinstance(value, str) and value.strip().lower() in NO_BUDGET_WORDS:
        return None
    try:
        return float(_number(value, float, name))
    except SettingsError:
        raise SettingsError("not a number, 'auto' or 'none'", option=name) from None


def _ice_server(value: Any) -> IceServer:
    if isinstance(value, str):
        return IceServer.parse(value)
    if isinstance(value, dict):
        return IceServer.from_mapping(value)
    raise SettingsError("entries are strings or tables", option="ice_server")
