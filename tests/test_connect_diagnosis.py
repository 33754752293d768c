"""A client that cannot connect says what it tried, and a server bound to one address
advertises that address (issue 13).

The transport's diagnosis is checked on virtual time against silent, refusing and
half-answering servers; the Publisher's error against a live ``whepfan serve`` whose
answer names an address nothing listens on; and a server bound to 127.0.0.1 with no
``--public-ip`` is published to over the one candidate it advertises.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import aiohttp
import pytest
from _server import LiveServer, settings_for
from aioice import stun

from whepfan.client.peer import (
    Address,
    ClientTransport,
    IceSelected,
    LocalParameters,
    TransportEvent,
    TransportFailed,
    host_candidate,
    new_ice_credentials,
    viewer_offer,
)
from whepfan.client.publisher import Publisher, PublisherOptions, PublishError
from whepfan.client.signalling import post_offer
from whepfan.protocol.dtls import DtlsCertificate
from whepfan.protocol.ice import IceLiteSession
from whepfan.protocol.negotiation import RemoteTransport, remote_transport
from whepfan.protocol.sdp import Candidate, SessionDescription

TOKEN = "diagnosis-token"
SERVER = ("192.0.2.1", 5000)
OTHER = ("198.51.100.9", 5000)
LOCAL = ("192.0.2.2", 6000)
TICK = 0.05


def _transport(
    *candidates: Candidate, remote_pwd: str = "p" * 22, remote_ufrag: str = "srv"
) -> ClientTransport:
    ufrag, pwd = new_ice_credentials()
    return ClientTransport(
        certificate=DtlsCertificate.generate(),
        local_ufrag=ufrag,
        local_pwd=pwd,
        remote=RemoteTransport(
            ice_ufrag=remote_ufrag,
            ice_pwd=remote_pwd,
            fingerprints=tuple(DtlsCertificate.generate().fingerprints),
            setup="passive",
            candidates=candidates,
        ),
        dtls_role="client",
        local_address=LOCAL,
    )


Answer = Callable[[bytes, Address, float], "bytes | None"]


def _run(
    client: ClientTransport, until: float, answer: Answer | None = None
) -> tuple[list[TransportEvent], list[tuple[bytes, Address]]]:
    """Drive ``client`` on virtual time to ``until``; ``answer(datagram, address, now)``
    returns the reply datagram for each one sent, or None."""
    now = 0.0
    events: list[TransportEvent] = []
    sent: list[tuple[bytes, Address]] = []
    client.start(now)
    while now <= until:
        for datagram, address in client.datagrams_to_send():
            sent.append((datagram, address))
            reply = answer(datagram, address, now) if answer is not None else None
            if reply is not None:
                client.receive(reply, address, now)
        while (event := client.next_event()) is not None:
            events.append(event)
        deadline = client.get_timer()
        now = max(now + TICK, deadline) if deadline is not None else now + TICK
        client.handle_timer(now)
    return events, sent


def test_a_silent_server_is_reported_with_every_candidate_and_the_checks_sent() -> None:
    tcp = Candidate(
        foundation="2",
        component=1,
        transport="tcp",
        priority=1,
        address="192.0.2.1",
        port=443,
        type="host",
    )
    client = _transport(host_candidate(*SERVER), host_candidate(*OTHER), tcp)
    _run(client, until=2.0)
    text = str(client.diagnosis())
    assert text.startswith(
        "ICE checking, DTLS new (as DTLS client); local candidate 192.0.2.2:6000"
    )
    assert re.search(r"192\.0\.2\.1:5000 \d+ checks sent, no answer yet", text)
    assert re.search(r"198\.51\.100\.9:5000 \d+ checks sent, no answer yet", text)
    assert "skipped: tcp 192.0.2.1:443 component 1" in text
    assert "nothing came back from any candidate" in text
    # RFC 8489 §6.2.1: after Rc transmissions and Rm x RTO the checks fail, and the
    # failure itself says no check was ever answered.
    events, sent = _run(_transport(host_candidate(*SERVER)), until=60.0)
    failed = [e for e in events if isinstance(e, TransportFailed)]
    assert failed and failed[0].reason == "ICE failed: every candidate pair failed"
    assert len(sent) == 7


def test_a_refused_check_is_reported_with_its_stun_error() -> None:
    def refuse(datagram: bytes, address: Address, now: float) -> bytes | None:
        request = stun.parse_message(datagram)
        # RFC 8489 §9.1.3: a 401 comes without MESSAGE-INTEGRITY (wrong credentials).
        return bytes(
            stun.Message(
                message_method=stun.Method.BINDING,
                message_class=stun.Class.ERROR,
                transaction_id=request.transaction_id,
                attributes={"ERROR-CODE": (401, "Unauthorized")},
            )
        )

    client = _transport(host_candidate(*SERVER))
    events, _ = _run(client, until=1.0, answer=refuse)
    assert any(isinstance(e, TransportFailed) for e in events)
    diagnosis = client.diagnosis()
    assert diagnosis.ice_state == "failed"
    assert str(diagnosis.candidates[0]) == (
        "192.0.2.1:5000 check failed with STUN error 401, 1 datagrams heard"
    )
    assert "nothing came back" not in str(diagnosis)


def test_ice_connected_but_dtls_unanswered_says_so() -> None:
    pwd = "q" * 22
    lite = IceLiteSession(local_ufrag="srv", local_pwd=pwd)

    def ice_only(datagram: bytes, address: Address, now: float) -> bytes | None:
        # STUN is answered, DTLS (first byte 20-63, RFC 7983 §7) goes nowhere.
        return lite.receive_stun(datagram, LOCAL, now) if datagram[0] < 4 else None

    client = _transport(host_candidate(*SERVER), remote_pwd=pwd)
    events, _ = _run(client, until=3.0, answer=ice_only)
    assert any(isinstance(e, IceSelected) for e in events)
    text = str(client.diagnosis())
    assert text.startswith("ICE connected, DTLS connecting (as DTLS client)")
    assert "192.0.2.1:5000 selected" in text


def test_an_answer_without_a_usable_candidate_names_what_it_had() -> None:
    rtcp = Candidate(
        foundation="1",
        component=2,
        transport="udp",
        priority=1,
        address="192.0.2.1",
        port=5001,
        type="host",
    )
    events, sent = _run(_transport(rtcp), until=0.1)
    assert not sent
    assert events == [
        TransportFailed(
            "the answer has no UDP candidate for component 1 "
            "(it has udp 192.0.2.1:5001 component 2)"
        )
    ]


# --- against a live server -----------------------------------------------------------------


@pytest.fixture(scope="module")
def unreachable_server() -> Iterator[LiveServer]:
    """Bound to 127.0.0.1, advertising 127.0.0.2 where nothing listens: the issue's
    "not connected within 10.0 s", reproduced without a second interface."""
    live = LiveServer(settings_for(token=TOKEN, public_ip=["127.0.0.2"]))
    yield live
    live.close()


async def test_a_publisher_that_cannot_connect_says_what_it_tried(
    unreachable_server: LiveServer,
) -> None:
    options = PublisherOptions(
        url=f"{unreachable_server.url}/whip/unreachable",
        token=TOKEN,
        audio=False,
        connect_timeout=1.0,
    )
    with pytest.raises(PublishError) as error:
        await Publisher(options).start()
    text = str(error.value)
    port = unreachable_server.info.udp_port if unreachable_server.info else 0
    assert text.startswith("not connected within 1 s: ICE checking, DTLS new (as DTLS ")
    assert re.search(r"local candidate 127\.0\.0\.1:\d+", text)
    assert re.search(rf"remote candidates from the answer: 127\.0\.0\.2:{port} \d+ checks", text)
    assert "is the server's media port reachable" in text


@pytest.fixture(scope="module")
def loopback_server() -> Iterator[LiveServer]:
    """``--udp 127.0.0.1:0`` and no ``--public-ip``."""
    live = LiveServer(settings_for(token=TOKEN, public_ip=None))
    yield live
    live.close()


async def test_a_server_bound_to_one_address_answers_with_that_candidate_only(
    loopback_server: LiveServer,
) -> None:
    assert loopback_server.settings.public_ips == ()
    local = LocalParameters(
        ice_ufrag="abcd",
        ice_pwd="e" * 22,
        fingerprints=DtlsCertificate.generate().fingerprints,
        candidate=host_candidate("127.0.0.1", 9),
    )
    options = PublisherOptions(
        url=f"{loopback_server.url}/whip/bound", token=TOKEN, audio=False, connect_timeout=10
    )
    async with Publisher(options) as publisher:
        assert publisher.location is not None
        async with aiohttp.ClientSession() as http:
            result = await post_offer(
                http, f"{loopback_server.url}/whep/bound", viewer_offer(local)
            )
        assert result.status == 201 and result.answer is not None
        candidates = remote_transport(SessionDescription.parse(result.answer)).candidates
        assert [(c.address, c.port) for c in candidates] == [
            ("127.0.0.1", loopback_server.info.udp_port if loopback_server.info else 0)
        ]


async def test_a_loadtest_viewer_that_cannot_connect_says_what_it_tried(
    unreachable_server: LiveServer,
) -> None:
    """The viewer side of the same: a WHEP viewer of ``whepfan loadtest`` answered with a
    candidate nothing listens at reports its ICE/DTLS state and the candidates it checked."""
    from _signalling import bearer, negotiate, placeholder_publisher

    from whepfan.client.loadtest import LoadTest, LoadTestOptions

    async with aiohttp.ClientSession(base_url=unreachable_server.url) as http:
        publisher = placeholder_publisher()  # live once answered, never connects
        await negotiate(http, publisher, "/whip/unreachable-viewers", bearer(TOKEN))
        try:
            options = LoadTestOptions(
                url=f"{unreachable_server.url}/whep/unreachable-viewers",
                viewers=1,
                duration=0.1,
                setup_timeout=1.0,
                token=TOKEN,
            )
            report = await LoadTest(options).run()
        finally:
            await publisher.close()
    [(error, count)] = report.summary["errors"].items()
    assert count == 1
    assert error.startswith("not connected within 1 s: ICE checking, DTLS new"), error
    assert "remote candidates from the answer: 127.0.0.2:" in error
    assert "is the server's media port reachable" in error
