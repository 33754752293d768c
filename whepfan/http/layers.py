"""The video layer selection extension of WHEP: a player picks the simulcast layer (or
temporal layer) it receives, or hands the choice back to the server.

Texts: "WebRTC-HTTP Egress Protocol Core Extensions" (EXT) §5, formerly
draft-ietf-wish-whep-02 §4.9.2 and draft-murillo-whep-02 §4.6.2 (spec notes §4.3).

::

    /whep/{stream}/{session}/layer      the Link target (201 of WHEP POST)
        POST application/json {...}  -> 200 + the viewer's layer state, or 400 problem+json
        DELETE                       -> 200: back to automatic choice (live777, medooze
                                        WHEPClient.unselectLayer)
        GET                          -> 200 + the viewer's layer state and the layers

POST body members (all optional; unknown members are ignored, EXT §5): ``mediaId`` (the
m-line index, default the first video), ``rid`` or its older name ``encodingId``,
``spatialLayerId``, ``temporalLayerId``, ``maxSpatialLayerId``, ``maxTemporalLayerId``,
``maxWidth``, ``maxHeight``. ``{}`` or ``{"mediaId": ...}`` alone returns the viewer to
automatic choice (M02 and W02 spellings of "unselect").

The WHEP POST itself may name the first layer, as some servers allow: ``?rid=h`` (or
``?encodingId=h``). An unknown layer there is a 400 and no session is left behind.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

import orjson
from aiohttp import web

from whepfan.errors import NotFound, ParseError, PeerError
from whepfan.http.auth import AccessControl
from whepfan.http.backend import SessionView
from whepfan.http.body import read_body
from whepfan.http.cors import add_preflight_headers
from whepfan.http.tokens import Role
from whepfan.media.layers import LayerRequest

LAYER_REL = "urn:ietf:params:whep:ext:core:layer"
LAYER_METHODS = "OPTIONS, GET, POST, DELETE"
JSON = "application/json"
_INTEGER_MEMBERS = (
    "spatialLayerId",
    "temporalLayerId",
    "maxSpatialLayerId",
    "maxTemporalLayerId",
    "maxWidth",
    "maxHeight",
)


@runtime_checkable
class LayerRouter(Protocol):
    """What the extension needs from ``whepfan.media.router.Router``."""

    def get_session(self, session_id: str) -> SessionView: ...

    def end_session(self, session_id: str, now: float, reason: str = "deleted") -> bool: ...

    def select_layer(
        self, session_id: str, request: LayerRequest, now: float
    ) -> dict[str, object]: ...

    def layer_status(self, session_id: str, now: float) -> dict[str, object]: ...


def parse_layer_request(body: bytes) -> LayerRequest:
    """A LayerRequest from a POST body; ParseError for anything that is not one."""
    try:
        document = orjson.loads(body) if body.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise ParseError(f"the body is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ParseError("the body is a JSON object (EXT §5)")
    media_id = document.get("mediaId")
    if media_id is not None:
        if isinstance(media_id, bool) or not isinstance(media_id, (str, int)):
            raise ParseError("mediaId is an m-line index (a string)")
        media_id = str(media_id)
    rid = document.get("rid", document.get("encodingId"))
    if rid is not None and (not isinstance(rid, str) or not rid):
        raise ParseError("rid (encodingId) is a non-empty string")
    numbers = {member: _non_negative(document, member) for member in _INTEGER_MEMBERS}
    return LayerRequest(
        media_id=media_id,
        rid=rid,
        spatial_layer=numbers["spatialLayerId"],
        temporal_layer=numbers["temporalLayerId"],
        max_spatial_layer=numbers["maxSpatialLayerId"],
        max_temporal_layer=numbers["maxTemporalLayerId"],
        max_width=numbers["maxWidth"],
        max_height=numbers["maxHeight"],
    )


def _non_negative(document: dict[str, object], member: str) -> int | None:
    value = document.get(member)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ParseError(f"{member} is a non-negative integer")
    return value


def initial_layer_request(query: Mapping[str, str]) -> LayerRequest | None:
    """``?rid=`` (or ``?encodingId=``) on the WHEP POST, or None."""
    rid = query.get("rid") or query.get("encodingId")
    return LayerRequest(rid=rid) if rid else None


class LayerSelection:
    """The layer resource of every WHEP session, bound to one router and its clock."""

    def __init__(
        self,
        *,
        router: LayerRouter,
        clock: Callable[[], float],
        access: AccessControl | None = None,
    ) -> None:
        self.router = router
        self.clock = clock
        # The view credential, bound to the session as for PATCH/DELETE (auth.py).
        self.access = access or AccessControl()

    def add_routes(
        self, app: web.Application, *, stream_pattern: str, session_pattern: str
    ) -> None:
        path = f"/whep/{{stream:{stream_pattern}}}/{{session:{session_pattern}}}/layer"
        app.router.add_route("POST", path, self.post)
        app.router.add_route("DELETE", path, self.delete)
        app.router.add_route("GET", path, self.get)
        app.router.add_route("OPTIONS", path, self.options)

    @staticmethod
    def link_value(session_url: str) -> str:
        """The 201's Link for the session at ``session_url`` (EXT §5: rel
        ``urn:ietf:params:whep:ext:core:layer``)."""
        return f'<{session_url}/layer>; rel="{LAYER_REL}"'

    def links_with(self, others: Callable[[str], list[str]] | None) -> Callable[[str], list[str]]:
        """A viewer-links hook giving ``others``' Links and then this extension's."""

        def links(session_url: str) -> list[str]:
            base = others(session_url) if others is not None else []
            return [*base, self.link_value(session_url)]

        return links

    def viewer_created(self, request: web.Request, session: SessionView, now: float) -> None:
        """Apply ``?rid=`` of a WHEP POST to the session it created; on a bad layer the
        session is ended again, so the 400 leaves nothing behind."""
        layer = initial_layer_request(request.query)
        if layer is None:
            return
        try:
            self.router.select_layer(session.id, layer, now)
        except PeerError:
            self.router.end_session(session.id, now, "bad-initial-layer")
            raise

    # ------------------------------------------------------------------ handlers

    async def post(self, request: web.Request) -> web.Response:
        session = self._session(request)
        layer = parse_layer_request(await read_body(request, accepted=(JSON,)))
        return self._json(self.router.select_layer(session.id, layer, self.clock()))

    async def delete(self, request: web.Request) -> web.Response:
        session = self._session(request)
        return self._json(self.router.select_layer(session.id, LayerRequest(), self.clock()))

    async def get(self, request: web.Request) -> web.Response:
        session = self._session(request)
        return self._json(self.router.layer_status(session.id, self.clock()))

    async def options(self, request: web.Request) -> web.Response:
        response = web.Response(status=200, headers={"Accept-Post": JSON})
        add_preflight_headers(response, LAYER_METHODS)
        return response

    # ------------------------------------------------------------------ helpers

    def _session(self, request: web.Request) -> SessionView:
        stream = request.match_info["stream"]
        grant = self.access.authorize(request.headers.get("Authorization"), Role.VIEW, stream)
        session = self.router.get_session(request.match_info["session"])
        if session.stream != stream or session.kind.value != "viewer":
            raise NotFound("no such session")
        self.access.check_bound(session, grant, stream=stream)
        return session

    @staticmethod
    def _json(document: dict[str, object]) -> web.Response:
        return web.Response(status=200, body=orjson.dumps(document), content_type=JSON)
