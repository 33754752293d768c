"""``Link: <uri>; rel="ice-server"`` headers (RFC 9725 §4.6, used by WHEP draft-03 §4.7).

One Link field per STUN/TURN server, in the form every client parser read accepts (spec
notes §1.10): quoted values, ``"; "`` separators, ``username``, ``credential``,
``credential-type`` in that order (MediaMTX's reader needs exactly this order).

TURN servers may use time-limited credentials from a shared secret, the "TURN REST API"
scheme (draft-uberti-behave-turn-rest-00 §2.2, implemented by coturn's
``use-auth-secret``): username = ``<expiry unix time>:<user>``, password =
base64(HMAC-SHA1(secret, username)).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from whepfan.errors import ParseError

# RFC 7064 §3.1 (stun/stuns) and RFC 7065 §3.1 (turn/turns) schemes.
ICE_SERVER_SCHEMES = ("stun", "stuns", "turn", "turns")
_URI = re.compile(r"(stuns?|turns?):[^\s<>\";,]+", re.IGNORECASE)
_OPTION = re.compile(r"([a-z-]+)=(.*)", re.DOTALL)
DEFAULT_CREDENTIAL_TTL = 86_400  # draft-uberti-behave-turn-rest-00 §2.2 suggests one day
TURN_REST_USER = "whepfan"


def turn_rest_credentials(
    secret: str, *, expiry: int, user: str = TURN_REST_USER
) -> tuple[str, str]:
    """(username, password) valid until ``expiry`` (Unix time) on a TURN server that shares
    ``secret``: username ``<expiry>:<user>``, password base64(HMAC-SHA1(secret,
    username)) (draft-uberti-behave-turn-rest-00 §2.2). coturn's ``use-auth-secret``
    reads the number as the expiry time and refuses the allocation after it."""
    username = f"{expiry}:{user}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")


def _quoted(value: str) -> str:
    """An RFC 9110 §5.6.4 quoted-string."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True, slots=True, kw_only=True)
class IceServer:
    """A STUN or TURN server offered to clients, with static or time-limited credentials."""

    url: str
    username: str | None = None
    # Kept out of repr (and so out of logged settings): they are credentials.
    credential: str | None = field(default=None, repr=False)
    shared_secret: str | None = field(default=None, repr=False)
    credential_ttl: int = DEFAULT_CREDENTIAL_TTL

    def __post_init__(self) -> None:
        if not _URI.fullmatch(self.url):
            raise ParseError(
                f"ICE server {self.url[:60]!r} is not a stun:, stuns:, turn: or turns: URI"
            )
        is_turn = self.url.lower().startswith("turn")
        has_static = self.username is not None or self.credential is not None
        if has_static and (self.username is None or self.credential is None):
            raise ParseError(f"ICE server {self.url}: username and credential go together")
        if self.shared_secret is not None and has_static:
            raise ParseError(f"ICE server {self.url}: give a shared secret or a password, not both")
        if not is_turn and (has_static or self.shared_secret is not None):
            raise ParseError(f"ICE server {self.url}: credentials are for turn:/turns: servers")
        if is_turn and not has_static and self.shared_secret is None:
            # RFC 8656 §9.2: TURN allocations are always authenticated.
            raise ParseError(f"TURN server {self.url} needs username/credential or secret")
        if self.credential_ttl <= 0:
            raise ParseError(f"ICE server {self.url}: ttl must be positive")
        for value in (self.username, self.credential, self.shared_secret):
            if value is not None and any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
                raise ParseError(f"ICE server {self.url}: control characters in a credential")

    @classmethod
    def parse(cls, spec: str) -> IceServer:
        """``URI[;username=U;credential=C]`` or ``URI;secret=S[;ttl=SECONDS]`` (CLI and
        environment form; the TOML file may also use a table with the same keys)."""
        url, *options = spec.strip().split(";")
        fields: dict[str, str] = {}
        for option in options:
            match = _OPTION.fullmatch(option.strip())
            if match is None or match.group(1) in fields:
                raise ParseError(f"ICE server option {option.strip()[:40]!r} is not key=value")
            fields[match.group(1)] = match.group(2)
        return cls.from_mapping({"url": url.strip(), **fields})

    @classmethod
    def from_mapping(cls, table: dict[str, object]) -> IceServer:
        known = {"url", "urls", "username", "credential", "secret", "ttl"}
        unknown = set(table) - known
        if unknown:
            raise ParseError(f"unknown ICE server keys: {', '.join(sorted(unknown))}")
        url = table.get("url", table.get("urls"))
        strings = {k: v for k, v in table.items() if k != "ttl"}
        if not isinstance(url, str) or not all(isinstance(v, str) for v in strings.values()):
            raise ParseError("ICE server url, username, credential and secret are strings")
        ttl = table.get("ttl", DEFAULT_CREDENTIAL_TTL)
        if isinstance(ttl, str):
            if not ttl.isdigit():
                raise ParseError(f"ICE server ttl {ttl[:20]!r} is not a number of seconds")
            ttl = int(ttl)
        if not isinstance(ttl, int) or isinstance(ttl, bool):
            raise ParseError("ICE server ttl is a number of seconds")
        return cls(
            url=url,
            username=table.get("username"),  # type: ignore[arg-type]
            credential=table.get("credential"),  # type: ignore[arg-type]
            shared_secret=table.get("secret"),  # type: ignore[arg-type]
            credential_ttl=ttl,
        )

    def credentials(self, unix_now: float) -> tuple[str, str] | None:
        """(username, password) to hand out now, or None for a STUN server."""
        if self.shared_secret is not None:
            return turn_rest_credentials(
                self.shared_secret, expiry=int(unix_now) + self.credential_ttl
            )
        if self.username is not None and self.credential is not None:
            return self.username, self.credential
        return None

    def link_value(self, unix_now: float) -> str:
        """The ``Link`` field value for this server (RFC 9725 §4.6)."""
        parts = [f"<{self.url}>", 'rel="ice-server"']
        credentials = self.credentials(unix_now)
        if credentials is not None:
            username, password = credentials
            parts += [
                f"username={_quoted(username)}",
                f"credential={_quoted(password)}",
                'credential-type="password"',
            ]
        return "; ".join(parts)


def turn_rest_servers(
    urls: Iterable[str], secret: str, *, ttl: int = DEFAULT_CREDENTIAL_TTL
) -> tuple[IceServer, ...]:
    """One time-limited-credential :class:`IceServer` per ``turn:``/``turns:`` URL of a
    TURN deployment that shares ``secret`` (``--turn-url`` / ``--turn-secret`` /
    ``--turn-credential-ttl``); a ``stun:`` URL raises :class:`ParseError`."""
    return tuple(IceServer(url=url, shared_secret=secret, credential_ttl=ttl) for url in urls)
