"""WHIP/WHEP signalling for the client tools: one POST with the offer, one DELETE at the
end (RFC 9725 §4.2, §4.3; draft-ietf-wish-whep-03 §4.2, §4.3), plus the local address
a client advertises as its ICE candidate."""

from __future__ import annotations

import socket
import urllib.parse
from dataclasses import dataclass

import aiohttp


@dataclass(frozen=True, slots=True, kw_only=True)
class OfferResult:
    """The server's answer to an offer POST. ``answer`` is set only for a 201."""

    status: int
    answer: str | None = None
    location: str | None = None  # absolute URL of the session resource
    retry_after: str | None = None
    detail: str = ""
    # The endpoint that answered, after following ``redirects`` 307/308s (a cluster's
    # placement, RFC 9725 §4.5).
    endpoint: str = ""
    redirects: int = 0
    # The 201's Link header values (RFC 8288 §3): ice-server, and WHEP extensions such as
    # server-sent events and layer selection (EXT §4, §5). Relative to ``endpoint``.
    links: tuple[str, ...] = ()


def _headers(token: str | None, content_type: str | None = None) -> dict[str, str]:
    headers = {}
    if content_type is not None:
        headers["Content-Type"] = content_type
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


# Redirects followed at most per POST (a cluster places a viewer in one hop).
MAX_REDIRECTS = 5


async def post_offer(
    http: aiohttp.ClientSession, url: str, offer: str, *, token: str | None = None
) -> OfferResult:
    """POST an SDP offer; any status is a result (failures are reported, not raised),
    network errors raise ``aiohttp.ClientError`` / ``OSError``.

    A 307 or 308 is followed with the same body and the same token (RFC 9110 §15.4.8:
    the method and content are kept). aiohttp, like fetch, would drop Authorization on a
    redirect to another origin; a WHIP/WHEP load balancer redirects to another node of
    the same service, which accepts the same token (RFC 9725 §4.5), so it is resent."""
    endpoint = url
    for redirects in range(MAX_REDIRECTS + 1):
        async with http.post(
            endpoint,
            data=offer.encode(),
            headers=_headers(token, "application/sdp"),
            allow_redirects=False,
        ) as response:
            body = await response.text(errors="replace")
            target = response.headers.get("Location")
            if response.status in (307, 308) and target and redirects < MAX_REDIRECTS:
                endpoint = urllib.parse.urljoin(endpoint, target)
                continue
            if response.status != 201:
                return OfferResult(
                    status=response.status,
                    retry_after=response.headers.get("Retry-After"),
                    detail=body[:300],
                    endpoint=endpoint,
                    redirects=redirects,
                )
            # RFC 9725 §4.2: Location may be relative to the endpoint URL.
            absolute = urllib.parse.urljoin(endpoint, target) if target else None
            return OfferResult(
                status=201,
                answer=body,
                location=absolute,
                endpoint=endpoint,
                redirects=redirects,
                links=tuple(response.headers.getall("Link", [])),
            )
    raise AssertionError("unreachable: the last iteration returns")


async def delete_session(
    http: aiohttp.ClientSession, location: str, *, token: str | None = None
) -> int:
    """End a session (RFC 9725 §4.3); the status, or 0 if the server was unreachable."""
    try:
        async with http.delete(location, headers=_headers(token)) as response:
            return response.status
    except (aiohttp.ClientError, OSError):
        return 0


def local_address_towards(url: str) -> str:
    """The local IP address the kernel routes to the URL's host from: the one to offer
    as host candidate. A connected UDP socket sends nothing; it only picks the route."""
    host = urllib.parse.urlsplit(url).hostname or "127.0.0.1"
    infos = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(address)
        return str(probe.getsockname()[0])
