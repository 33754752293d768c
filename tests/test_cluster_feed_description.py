"""The description of a pulled simulcast stream's feed (cluster/feed.py
``UpstreamFeed.description``): with ``--workers N`` the other workers' relay copies are
made from it (media/relay.py ``attach_relay``), so they must get the same tracks as the
feed's worker: one per layer, keyed ``video/<index>`` in the feed's track order, with
the layer's rid, and the audio. No sockets are used: two routers in one process stand
for the origin and the edge's two workers, and the upstream answers are the origin's
own answers to whepfan's WHEP client offers."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from _paths import SDP_FIXTURES

from whepfan._fastpath import Fanout
from whepfan.client.peer import LocalParameters, host_candidate, new_ice_credentials, viewer_offer
from whepfan.cluster.feed import UpstreamFeed
from whepfan.config import MediaConfig
from whepfan.media.relay import RelayCopies
from whepfan.media.router import Router
from whepfan.protocol import sdp
from whepfan.protocol.dtls import DtlsCertificate

SIMULCAST_OFFER = (SDP_FIXTURES / "chromium-156-whip-simulcast-offer.sdp").read_text()


@pytest.fixture
def routers() -> Iterator[list[Router]]:
    sockets: list[socket.socket] = []
    made: list[Router] = []
    for _ in range(3):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
        made.append(
            Router(
                config=MediaConfig(udp_host="127.0.0.1", udp_port=0),
                certificate=DtlsCertificate.generate(),
                fanout=Fanout(sock.fileno(), max_viewers=8),
                send=lambda data, addr: None,
                candidates=[sdp.Candidate.parse("1 1 udp 2130706431 127.0.0.1 40000 typ host")],
            )
        )
    yield made
    for sock in sockets:
        sock.close()


def upstream_answer(origin: Router, edge: Router, *, audio: bool) -> str:
    """The origin's answer to one of the edge's WHEP client sessions (upstream.py)."""
    ufrag, pwd = new_ice_credentials()
    local = LocalParameters(
        ice_ufrag=ufrag,
        ice_pwd=pwd,
        fingerprints=edge.certificate.fingerprints,
        candidate=host_candidate("127.0.0.1", 40001),
    )
    _, answer = origin.view("s", viewer_offer(local, audio=audio), 0.0)
    return answer


def tracks_of(router: Router) -> dict[str, tuple[str, str | None]]:
    """Track key -> (codec, rid) of stream "s" on ``router``."""
    stream = router.streams["s"]
    return {track.key: (track.codec_name, track.rid) for track in stream.all_tracks()}


def test_a_relay_copy_made_from_the_feed_description_has_the_feeds_tracks(
    routers: list[Router],
) -> None:
    origin, holder, other = routers
    origin.publish("s", SIMULCAST_OFFER, 0.0)
    feed = UpstreamFeed.of(holder, "s")
    # The first session, before the layers are known: one video track.
    first = feed.add_leg(None, upstream_answer(origin, holder, audio=True), 0.0, lambda _: None)
    single = feed.description()
    assert single is not None and "a=simulcast" not in single
    # The layers arrive: the first session is pinned to h, the others carry q and f.
    layers = ("q", "h", "f")
    feed.rename_leg(first, "h")
    feed.set_layers(layers, 0.1)
    for rid in ("q", "f"):
        answer = upstream_answer(origin, holder, audio=False)
        feed.add_leg(rid, answer, 0.2, lambda _: None, layers=layers)
    assert tracks_of(holder) == {
        "audio/0": ("opus", None),
        "video/0": ("VP8", "h"),  # the first session's track keeps its viewers' line
        "video/1": ("VP8", "q"),
        "video/2": ("VP8", "f"),
    }
    description = feed.description()
    assert description is not None
    video = next(m for m in sdp.SessionDescription.parse(description).media if m.kind == "video")
    assert [rid.id for rid in video.rids] == ["h", "q", "f"] and not video.ssrcs

    relays = RelayCopies(other, send_frame=lambda _: None, forward_keyframe_request=lambda *_: None)
    relays.attach_relay("s", single, 0, 0.0)
    assert tracks_of(other) == {"audio/0": ("opus", None), "video/0": ("VP8", None)}
    # Re-sent when the layers changed (WorkerPool.update_feed): the copy keeps its
    # track and has the feed's, key for key.
    kept = other.streams["s"].tracks["video"][0]
    relays.attach_relay("s", description, 0, 0.3)
    assert tracks_of(other) == tracks_of(holder)
    assert other.streams["s"].tracks["video"][0] is kept
