"""The control channel as data: {op: handler}, codecs, errors.

The main process and each worker process talk over a ``SOCK_SEQPACKET`` Unix socket
pair (message boundaries kept by the kernel), one orjson object per message:

* a request ``{"op": OP, "id": N, "args": {...}}`` is answered ``{"id": N, "result": R}``
  or ``{"id": N, "error": {"class": ..., "detail": ..., "retry_after": ...}}``; the error
  class names a ``WhepfanError`` subclass, so the HTTP layer answers as in-process;
* a notification is a request without ``id`` (no answer);
* an event from a worker is ``{"event": EVENT, ...}``.

A handler answers at once, or returns an awaitable when the answer takes network round
trips (``UPSTREAM_OPEN``: an upstream WHEP POST): the worker goes on serving and replies
when it resolves; the main process awaits such replies (``WorkerPool.request_async``)
instead of blocking its loop.

The names below are the whole vocabulary: the worker node dispatches requests through a
table keyed by them, and the pool sends nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any

import orjson

from whepfan import errors
from whepfan.errors import ParseError, WhepfanError
from whepfan.media.layers import LayerRequest
from whepfan.media.session import MediaSession, SessionState
from whepfan.protocol import sdp

# Requests, main process -> worker.
PUBLISH = "publish"
VIEW = "view"
COUNTER_OFFER = "counter_offer"
ACCEPT_COUNTER_ANSWER = "accept_counter_answer"
TRICKLE = "trickle"
RESTART_ICE = "restart_ice"
END_SESSION = "end_session"
SELECT_LAYER = "select_layer"
CAP_LAYER = "cap_layer"
LAYER_STATUS = "layer_status"
ATTACH_RELAY = "attach_relay"
DETACH_RELAY = "detach_relay"
SHUTDOWN = "shutdown"
# An upstream pull's session in a worker (cluster/worker_upstreams.py, a worker
# extension): open answers once the upstream's WHEP answer is attached; close at once;
# arrange pins a simulcast pull's session to its layer and lays out the stream's tracks
# (answered once the upstream's layer POST is); measured answers once the pulled stream's
# layers have their picture sizes (a cold edge's first viewer then starts in the middle).
UPSTREAM_OPEN = "upstream_open"
UPSTREAM_CLOSE = "upstream_close"
UPSTREAM_ARRANGE = "upstream_arrange"
UPSTREAM_MEASURED = "upstream_measured"

# Events, worker -> main process.
READY = "ready"
STATS = "stats"
ENDED = "ended"
STREAM = "stream"
UPSTREAM_LOST = "upstream_lost"  # an upstream session's transport failed
UPSTREAM_REPORT = "upstream_report"  # once per stats interval: its state and counts

# A request handler: (args, now) -> the JSON result.
Handler = Callable[[dict[str, Any], float], Any]


def request(op: str, args: dict[str, Any], request_id: int | None = None) -> dict[str, Any]:
    """A request (or, without ``request_id``, a notification)."""
    message: dict[str, Any] = {"op": op, "args": args}
    if request_id is not None:
        message["id"] = request_id
    return message


def dispatch(handlers: dict[str, Handler], message: dict[str, Any], now: float) -> Any:
    """Run the handler ``message`` names; an unknown op is the peer's error."""
    op = str(message.get("op"))
    handler = handlers.get(op)
    if handler is None:
        raise errors.PeerError(f"unknown control operation {op!r}")
    return handler(message.get("args", {}), now)


def error_json(exc: WhepfanError) -> dict[str, Any]:
    """A WhepfanError as data: its class name (in ``whepfan.errors``), detail, Retry-After."""
    return {"class": type(exc).__name__, "detail": exc.detail, "retry_after": exc.retry_after}


def error_from_json(error: dict[str, Any]) -> WhepfanError:
    """The WhepfanError ``error_json`` described; RuntimeError for a class it does not name."""
    name = error.get("class")
    cls = getattr(errors, str(name), None)
    if isinstance(cls, type) and issubclass(cls, WhepfanError):
        return cls(str(error.get("detail", "")), retry_after=error.get("retry_after"))
    raise RuntimeError(f"media worker failed: {error.get('detail')}")


def error_reply(request_id: Any, exc: WhepfanError) -> dict[str, Any]:
    return {"id": request_id, "error": error_json(exc)}


def result_of(message: dict[str, Any]) -> Any:
    """The result of a reply, or its error raised as the WhepfanError it names."""
    error = message.get("error")
    if error is None:
        return message.get("result")
    raise error_from_json(error)


def session_json(session: MediaSession) -> dict[str, Any]:
    return {
        "id": session.id,
        "kind": session.kind.value,
        "stream": session.stream,
        "etag": session.etag,
        "remote_ufrag": session.ice.remote_ufrag,
        "closed": session.state is SessionState.CLOSED,
    }


def fragment_json(fragment: sdp.SdpFragment) -> Any:
    return orjson.loads(orjson.dumps(fragment))


def fragment_from_json(data: dict[str, Any]) -> sdp.SdpFragment:
    def candidates(items: list[dict[str, Any]]) -> list[sdp.Candidate]:
        return [
            sdp.Candidate(**{**c, "extensions": tuple(tuple(e) for e in c["extensions"])})
            for c in items
        ]

    media = [
        sdp.FragmentMedia(**{**m, "candidates": candidates(m["candidates"])}) for m in data["media"]
    ]
    return sdp.SdpFragment(**{**data, "candidates": candidates(data["candidates"]), "media": media})


def layer_request_json(request: LayerRequest) -> dict[str, Any]:
    return {item.name: getattr(request, item.name) for item in fields(LayerRequest)}


def layer_request_from_json(data: Any) -> LayerRequest:
    if not isinstance(data, dict):
        raise ParseError("a layer request is a JSON object")
    return LayerRequest(**{item.name: data.get(item.name) for item in fields(LayerRequest)})
