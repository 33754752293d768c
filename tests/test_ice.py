"""ICE-lite session against the controlling checker, in memory on virtual time."""

from __future__ import annotations

import struct

import aioice
import pytest
from aioice import stun
from aioice.ice import CandidatePair
from hypothesis import given
from hypothesis import strategies as st

from whepfan.errors import ParseError
from whepfan.protocol.ice import (
    CHECK_PACING,
    DEFAULT_CONSENT_TIMEOUT,
    IceCheckFailed,
    IceConnected,
    IceConsentExpired,
    IceControllingChecker,
    IceLiteSession,
    IceNominated,
    parse_stun,
    stun_local_ufrag,
)

SERVER_ADDRESS = ("192.0.2.1", 40000)
CLIENT_ADDRESS = ("198.51.100.7", 51000)
CLIENT_ADDRESS_V6 = ("2001:db8::7", 51001)

# RFC 5769 §2.1: sample request, password "VOkJxbRl1RmTxUk/WvJxBt", USERNAME
# "evtj:h6vY", SOFTWARE "STUN test client", PRIORITY, ICE-CONTROLLED, MESSAGE-INTEGRITY,
# FINGERPRINT.
RFC5769_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae"
    "802200105354554e207465737420636c69656e74"
    "002400046e0001ff"
    "80290008932ff9b151263b36"
    "000600096576746a3a68367659202020"
    "000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2"
    "80280004e57a3bcf"
)
RFC5769_PASSWORD = "VOkJxbRl1RmTxUk/WvJxBt"
# RFC 5769 §2.2: the XOR-MAPPED-ADDRESS attribute of the sample IPv4 response, mapped
# address 192.0.2.1:32853, for the same transaction id as the request.
RFC5769_XOR_MAPPED_ADDRESS_IPV4 = bytes.fromhex("002000080001a147e112a643")


def make_lite(**overrides: object) -> IceLiteSession:
    arguments: dict = {
        "local_ufrag": "srv1",
        "local_pwd": "server-password-0123456789",
        "remote_ufrag": "cli1",
        "remote_pwd": "client-password-0123456789",
    }
    arguments.update(overrides)
    return IceLiteSession(**arguments)


def make_checker(lite: IceLiteSession, **overrides: object) -> IceControllingChecker:
    arguments: dict = {
        "local_ufrag": lite.remote_ufrag,
        "local_pwd": lite.remote_pwd,
        "remote_ufrag": lite.local_ufrag,
        "remote_pwd": lite.local_pwd,
        "remote_candidates": [SERVER_ADDRESS],
        "tie_breaker": 0x1122334455667788,
        "consent_jitter": 0.0,
    }
    arguments.update(overrides)
    return IceControllingChecker(**arguments)


def exchange(
    checker: IceControllingChecker,
    lite: IceLiteSession,
    now: float,
    client_address: tuple = CLIENT_ADDRESS,
) -> int:
    """Deliver every due check to the lite session and its answers back; count them."""
    delivered = 0
    while (outgoing := checker.next_request(now)) is not None:
        request, destination = outgoing
        assert destination == SERVER_ADDRESS
        response = lite.receive_stun(request, client_address, now)
        if response is not None:
            checker.receive_stun(response, SERVER_ADDRESS, now)
        delivered += 1
    return delivered


def drain(endpoint: IceLiteSession | IceControllingChecker) -> list:
    events = []
    while (event := endpoint.next_event()) is not None:
        events.append(event)
    return events


def binding_request(
    *, username: str | None, key: bytes | None, extra: dict | None = None
) -> stun.Message:
    attributes: dict = {}
    if username is not None:
        attributes["USERNAME"] = username
    attributes.update(extra or {})
    message = stun.Message(
        message_method=stun.Method.BINDING,
        message_class=stun.Class.REQUEST,
        attributes=attributes,
    )
    if key is not None:
        message.add_message_integrity(key)
    else:
        message.add_fingerprint()
    return message


def test_rfc5769_sample_request_parses_and_verifies() -> None:
    message = parse_stun(RFC5769_REQUEST)
    assert message.attributes["USERNAME"] == "evtj:h6vY"
    assert message.check_message_integrity(RFC5769_PASSWORD.encode())
    assert stun_local_ufrag(RFC5769_REQUEST) == "evtj"


def test_rfc5769_sample_request_with_ice_controlled_gets_487() -> None:
    # The RFC 5769 §2.1 request carries ICE-CONTROLLED: a role conflict for a lite agent.
    lite = make_lite(local_ufrag="evtj", local_pwd=RFC5769_PASSWORD)
    response = lite.receive_stun(RFC5769_REQUEST, CLIENT_ADDRESS, now=0.0)
    assert response is not None
    message = parse_stun(response)
    assert message.message_class == stun.Class.ERROR
    assert message.error_code == 487
    assert message.transaction_id == RFC5769_REQUEST[8:20]
    assert message.check_message_integrity(RFC5769_PASSWORD.encode())
    assert lite.selected_address is None


def test_checker_connects_to_lite_session() -> None:
    lite = make_lite()
    checker = make_checker(lite)
    now = 0.0
    assert exchange(checker, lite, now) == 1
    assert drain(lite) == [IceNominated(CLIENT_ADDRESS)]
    assert drain(checker) == [IceConnected(SERVER_ADDRESS)]
    assert lite.selected_address == CLIENT_ADDRESS
    assert checker.selected_address == SERVER_ADDRESS
    assert lite.get_timer() == 30.0


def test_success_response_xor_mapped_address_matches_rfc5769() -> None:
    lite = make_lite(local_ufrag="evtj", local_pwd=RFC5769_PASSWORD)
    request = parse_stun(RFC5769_REQUEST)
    del request.attributes["ICE-CONTROLLED"]
    del request.attributes["MESSAGE-INTEGRITY"]
    request.add_message_integrity(RFC5769_PASSWORD.encode())
    response = lite.receive_stun(bytes(request), ("192.0.2.1", 32853), now=0.0)
    assert response is not None
    assert response[8:20] == RFC5769_REQUEST[8:20]
    assert response[20:32] == RFC5769_XOR_MAPPED_ADDRESS_IPV4


def test_success_response_carries_xor_mapped_address_ipv4_and_ipv6() -> None:
    lite = make_lite()
    key = lite.local_pwd.encode()
    for address in (CLIENT_ADDRESS, CLIENT_ADDRESS_V6, ("2001:db8::9", 9, 0, 0)):
        request = binding_request(username="srv1:cli1", key=key)
        response = lite.receive_stun(bytes(request), address, now=1.0)
        assert response is not None
        message = parse_stun(response)
        assert message.message_class == stun.Class.RESPONSE
        assert message.transaction_id == request.transaction_id
        assert message.attributes["XOR-MAPPED-ADDRESS"] == (address[0], address[1])
        assert message.check_message_integrity(key)
        assert "FINGERPRINT" in message.attributes


def test_consent_expires_exactly_at_deadline_after_silence() -> None:
    lite = make_lite()
    checker = make_checker(lite)
    now = 2.5
    exchange(checker, lite, now)
    drain(lite)
    deadline = lite.get_timer()
    assert deadline == 32.5
    lite.handle_timer(32.499)
    assert drain(lite) == []
    lite.handle_timer(deadline)
    assert drain(lite) == [IceConsentExpired()]
    assert lite.consent_expired
    assert lite.get_timer() is None
    # Once: a later timer call does not repeat the event, and checks are dropped.
    lite.handle_timer(100.0)
    assert drain(lite) == []
    request = binding_request(username="srv1:cli1", key=lite.local_pwd.encode())
    assert lite.receive_stun(bytes(request), CLIENT_ADDRESS, 101.0) is None


def test_consent_checks_keep_the_session_alive() -> None:
    lite = make_lite()
    checker = make_checker(lite)
    now = 0.0
    exchange(checker, lite, now)
    assert drain(checker) == [IceConnected(SERVER_ADDRESS)]
    # The checker's next deadline is its first consent check, 5 s later.
    assert checker.get_timer() == 5.0
    consent_checks = 0
    while now < 120.0:
        timer = min(t for t in (checker.get_timer(), lite.get_timer()) if t is not None)
        now = timer
        checker.handle_timer(now)
        lite.handle_timer(now)
        consent_checks += exchange(checker, lite, now)
        assert lite.get_timer() == now + 30.0
    assert consent_checks == 24
    assert drain(lite) == [IceNominated(CLIENT_ADDRESS)]
    assert drain(checker) == []


def test_consent_clock_runs_from_creation_when_given_now() -> None:
    lite = make_lite(now=100.0)
    assert lite.get_timer() == 130.0
    lite.handle_timer(130.0)
    assert drain(lite) == [IceConsentExpired()]


def test_checks_from_another_address_do_not_refresh_consent() -> None:
    lite = make_lite()
    checker = make_checker(lite)
    exchange(checker, lite, 0.0)
    key = lite.local_pwd.encode()
    request = binding_request(username="srv1:cli1", key=key)
    assert lite.receive_stun(bytes(request), ("203.0.113.5", 1), 10.0) is not None
    assert lite.get_timer() == 30.0


def test_checker_consent_expires_when_server_goes_silent() -> None:
    lite = make_lite()
    checker = make_checker(lite)
    exchange(checker, lite, 0.0)
    drain(checker)
    now = 0.0
    while (timer := checker.get_timer()) is not None:
        now = timer
        checker.handle_timer(now)
        while checker.next_request(now) is not None:
            pass  # the server never answers
    assert now == 30.0
    assert drain(checker) == [IceConsentExpired()]


def test_wrong_password_gets_401_and_no_nomination() -> None:
    lite = make_lite()
    checker = make_checker(lite, remote_pwd="not-the-server-password")
    exchange(checker, lite, 0.0)
    assert drain(lite) == []
    assert lite.selected_address is None
    assert drain(checker) == [IceCheckFailed(SERVER_ADDRESS, 401)]
    assert lite.get_timer() is None


def test_unknown_ufrag_gets_unauthenticated_401() -> None:
    lite = make_lite()
    request = binding_request(username="other:cli1", key=lite.local_pwd.encode())
    response = lite.receive_stun(bytes(request), CLIENT_ADDRESS, 0.0)
    assert response is not None
    message = parse_stun(response)
    assert message.error_code == 401
    assert "MESSAGE-INTEGRITY" not in message.attributes
    assert "FINGERPRINT" in message.attributes


@pytest.mark.parametrize(
    ("username", "key"),
    [(None, b"server-password-0123456789"), ("srv1:cli1", None)],
    ids=["no-username", "no-message-integrity"],
)
def test_missing_username_or_integrity_gets_400(username: str | None, key: bytes | None) -> None:
    lite = make_lite()
    request = binding_request(username=username, key=key)
    response = lite.receive_stun(bytes(request), CLIENT_ADDRESS, 0.0)
    assert response is not None
    message = parse_stun(response)
    assert message.error_code == 400
    assert message.transaction_id == request.transaction_id


def test_undecodable_attribute_in_binding_request_gets_400() -> None:
    lite = make_lite()
    # A PRIORITY of 2 bytes instead of 4: well framed, but does not decode.
    body = struct.pack("!HH", 0x0024, 2) + b"\x00\x01\x00\x00"
    data = struct.pack("!HHI", 0x0001, len(body), 0x2112A442) + b"T" * 12 + body
    response = lite.receive_stun(data, CLIENT_ADDRESS, 0.0)
    assert response is not None
    assert parse_stun(response).error_code == 400


def test_ice_controlled_gets_487() -> None:
    lite = make_lite()
    key = lite.local_pwd.encode()
    request = binding_request(
        username="srv1:cli1",
        key=key,
        extra={"ICE-CONTROLLED": 7, "USE-CANDIDATE": None},
    )
    response = lite.receive_stun(bytes(request), CLIENT_ADDRESS, 0.0)
    assert response is not None
    message = parse_stun(response)
    assert message.error_code == 487
    assert message.check_message_integrity(key)
    assert drain(lite) == []


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x01",
        b"\x16\xfe\xfd" + bytes(30),  # a DTLS record
        b"\x80\x60" + bytes(30),  # an RTP packet
    ],
)
def test_garbage_is_dropped(data: bytes) -> None:
    lite = make_lite()
    assert lite.receive_stun(data, CLIENT_ADDRESS, 0.0) is None
    assert stun_local_ufrag(data) is None


def test_responses_and_indications_are_dropped() -> None:
    lite = make_lite()
    key = lite.local_pwd.encode()
    for message_class in (stun.Class.INDICATION, stun.Class.RESPONSE, stun.Class.ERROR):
        message = stun.Message(
            message_method=stun.Method.BINDING,
            message_class=message_class,
            attributes={"USERNAME": "srv1:cli1"},
        )
        message.add_message_integrity(key)
        assert lite.receive_stun(bytes(message), CLIENT_ADDRESS, 0.0) is None


def test_bad_fingerprint_is_dropped() -> None:
    lite = make_lite()
    data = bytearray(bytes(binding_request(username="srv1:cli1", key=lite.local_pwd.encode())))
    data[-1] ^= 0xFF
    assert lite.receive_stun(bytes(data), CLIENT_ADDRESS, 0.0) is None


def test_renomination_of_another_address_emits_new_event() -> None:
    lite = make_lite()
    checker = make_checker(lite)
    exchange(checker, lite, 0.0)
    other = make_checker(lite)
    exchange(other, lite, 3.0, client_address=CLIENT_ADDRESS_V6)
    assert drain(lite) == [IceNominated(CLIENT_ADDRESS), IceNominated(CLIENT_ADDRESS_V6)]
    assert lite.selected_address == CLIENT_ADDRESS_V6
    assert lite.get_timer() == 33.0


def test_restart_keeps_old_credentials_until_new_ones_verify() -> None:
    lite = make_lite()
    old_checker = make_checker(lite)
    exchange(old_checker, lite, 0.0)
    lite.restart(
        local_ufrag="srv2",
        local_pwd="server-password-second",
        remote_ufrag="cli2",
        remote_pwd="client-password-second",
    )
    assert lite.local_ufrags == ("srv1", "srv2")
    # Old credentials still answer and still refresh consent.
    old_request = binding_request(username="srv1:cli1", key=b"server-password-0123456789")
    response = lite.receive_stun(bytes(old_request), CLIENT_ADDRESS, 10.0)
    assert response is not None and parse_stun(response).message_class == stun.Class.RESPONSE
    assert lite.get_timer() == 40.0
    assert lite.local_ufrag == "srv1"

    new_checker = IceControllingChecker(
        local_ufrag="cli2",
        local_pwd="client-password-second",
        remote_ufrag="srv2",
        remote_pwd="server-password-second",
        remote_candidates=[SERVER_ADDRESS],
        consent_jitter=0.0,
    )
    exchange(new_checker, lite, 11.0)
    assert drain(new_checker) == [IceConnected(SERVER_ADDRESS)]
    assert lite.local_ufrag == "srv2"
    assert lite.remote_ufrag == "cli2"
    assert lite.local_ufrags == ("srv2",)
    # Now the old credentials are gone.
    response = lite.receive_stun(bytes(old_request), CLIENT_ADDRESS, 12.0)
    assert response is not None and parse_stun(response).error_code == 401


def test_failed_restart_leaves_the_old_session_working() -> None:
    lite = make_lite()
    exchange(make_checker(lite), lite, 0.0)
    lite.restart(
        local_ufrag="srv2", local_pwd="pw2-pw2-pw2-pw2-pw2-pw2", remote_ufrag=None, remote_pwd=None
    )
    lite.set_remote_credentials("cli2", "client-pw2-client-pw2")
    bad = binding_request(username="srv2:cli2", key=b"wrong")
    assert parse_stun(lite.receive_stun(bytes(bad), CLIENT_ADDRESS, 1.0) or b"").error_code == 401
    assert lite.local_ufrag == "srv1"
    assert lite.remote_ufrag == "cli1"
    assert lite.local_ufrags == ("srv1", "srv2")


def test_checker_paces_new_checks_and_retransmits_on_rto() -> None:
    lite = make_lite()
    addresses = [("192.0.2.1", 40000), ("192.0.2.2", 40000), ("192.0.2.3", 40000)]
    checker = make_checker(lite, remote_candidates=addresses)
    sent: list[tuple[float, tuple]] = []
    now = 0.0
    while True:
        while (outgoing := checker.next_request(now)) is not None:
            sent.append((now, outgoing[1]))
        timer = checker.get_timer()
        if timer is None:
            break
        now = timer
        checker.handle_timer(now)
    first_sends = {address: min(t for t, a in sent if a == address) for address in addresses}
    # RFC 8445 §14.2: one new check per Ta.
    assert first_sends == pytest.approx(
        {addresses[0]: 0.0, addresses[1]: CHECK_PACING, addresses[2]: 2 * CHECK_PACING}
    )
    first = [t for t, a in sent if a == addresses[0]]
    # RFC 8489 §6.2.1: 7 transmissions, intervals doubling from RTO = 500 ms.
    assert first == pytest.approx([0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5])
    failures = drain(checker)
    assert [event.address for event in failures] == addresses
    assert all(isinstance(event, IceCheckFailed) and event.error_code is None for event in failures)
    # The last transaction gives up Rm * RTO = 8 s after its 7th transmission.
    assert now == pytest.approx(2 * CHECK_PACING + 31.5 + 8.0)


def test_checker_stops_other_checks_once_connected() -> None:
    lite = make_lite()
    silent = ("192.0.2.9", 40000)
    checker = make_checker(lite, remote_candidates=[silent, SERVER_ADDRESS])
    first = checker.next_request(0.0)
    assert first is not None and first[1] == silent  # never answered
    now = CHECK_PACING
    request, destination = checker.next_request(now) or (b"", None)
    assert destination == SERVER_ADDRESS
    response = lite.receive_stun(request, CLIENT_ADDRESS, now)
    assert response is not None
    checker.receive_stun(response, SERVER_ADDRESS, now)
    assert drain(checker) == [IceConnected(SERVER_ADDRESS)]
    # No retransmission to the silent candidate any more: next is the consent check.
    assert checker.get_timer() == pytest.approx(now + 5.0)


def test_stun_local_ufrag_extracts_first_half() -> None:
    request = binding_request(username="abcd:efgh", key=b"k")
    assert stun_local_ufrag(bytes(request)) == "abcd"
    assert stun_local_ufrag(bytes(binding_request(username="nocolon", key=b"k"))) is None
    assert stun_local_ufrag(bytes(binding_request(username=None, key=b"k"))) is None


@given(st.binary(max_size=300))
def test_fuzz_lite_receive_stun_never_raises(data: bytes) -> None:
    lite = make_lite()
    response = lite.receive_stun(data, CLIENT_ADDRESS, 0.0)
    assert response is None or isinstance(response, bytes)
    assert stun_local_ufrag(data) is None or isinstance(stun_local_ufrag(data), str)
    try:
        message = parse_stun(data)
    except ParseError:
        return
    assert isinstance(message, stun.Message)


stun_header = st.builds(
    lambda type_, tid, body: struct.pack("!HHI", type_, len(body), 0x2112A442) + tid + body,
    st.sampled_from([0x0001, 0x0101, 0x0111, 0x0011, 0x0003]),
    st.binary(min_size=12, max_size=12),
    st.lists(
        st.builds(
            lambda t, v: struct.pack("!HH", t, len(v)) + v + bytes(-len(v) % 4),
            st.sampled_from([0x0006, 0x0008, 0x0020, 0x0024, 0x0025, 0x8028, 0x8029, 0x802A, 0x9]),
            st.binary(max_size=24),
        ),
        max_size=6,
    ).map(b"".join),
)


@given(stun_header)
def test_fuzz_well_framed_stun_never_raises(data: bytes) -> None:
    lite = make_lite()
    lite.receive_stun(data, CLIENT_ADDRESS, 0.0)
    stun_local_ufrag(data)
    checker = make_checker(lite)
    checker.receive_stun(data, SERVER_ADDRESS, 0.0)


async def test_aioice_controlling_agent_nominates_lite_session() -> None:
    """aioice's own full agent, controlling and told its peer is lite, runs a check
    and a regular nomination (RFC 8445 §8.1.1) against the lite session; the STUN
    transport is an in-memory stand-in for aioice's StunProtocol."""
    connection = aioice.Connection(ice_controlling=True, components=1)
    lite = make_lite(remote_ufrag=connection.local_username, remote_pwd=connection.local_password)
    connection.remote_username = lite.local_ufrag
    connection.remote_password = lite.local_pwd
    connection.remote_is_lite = True

    class InMemoryStunProtocol:
        local_candidate = aioice.Candidate(
            foundation="1",
            component=1,
            transport="udp",
            priority=2130706431,
            host=CLIENT_ADDRESS[0],
            port=CLIENT_ADDRESS[1],
            type="host",
        )

        async def request(
            self,
            request: stun.Message,
            addr: tuple,
            integrity_key: bytes | None = None,
            retransmissions: int | None = None,
        ) -> tuple[stun.Message, tuple]:
            if integrity_key is not None:
                request.add_message_integrity(integrity_key)
            response = lite.receive_stun(bytes(request), CLIENT_ADDRESS, 0.0)
            assert response is not None
            message = stun.parse_message(response)
            assert integrity_key is not None
            assert message.check_message_integrity(integrity_key)
            if message.message_class != stun.Class.RESPONSE:
                raise stun.TransactionFailed(message)
            return message, addr

    remote = aioice.Candidate(
        foundation="1",
        component=1,
        transport="udp",
        priority=2130706431,
        host=SERVER_ADDRESS[0],
        port=SERVER_ADDRESS[1],
        type="host",
    )
    pair = CandidatePair(InMemoryStunProtocol(), remote)  # type: ignore[arg-type]
    connection._check_list = [pair]
    await connection.check_start(pair)
    assert pair.state == CandidatePair.State.SUCCEEDED
    assert pair.nominated
    assert drain(lite) == [IceNominated(CLIENT_ADDRESS)]


# --- pairs keyed by (local address, remote address) ---------------------------------------

# Two of our host candidates on a multi-homed server (RFC 5737 documentation ranges): the
# worker's one wildcard-bound port, reached at either address.
LOCAL_PRIMARY = "192.0.2.1"
LOCAL_SECONDARY = "203.0.113.1"


def check(
    lite: IceLiteSession,
    now: float,
    *,
    local: str | None,
    address: tuple = CLIENT_ADDRESS,
    nominate: bool = False,
) -> stun.Message:
    """One verified connectivity check from the peer (RFC 8445 §7.2.2) reaching ``local``."""
    extra: dict = {"ICE-CONTROLLING": 1, "PRIORITY": 1853824767}
    if nominate:
        extra["USE-CANDIDATE"] = None
    request = binding_request(username="srv1:cli1", key=lite.local_pwd.encode(), extra=extra)
    response = lite.receive_stun(bytes(request), address, now, local)
    assert response is not None
    message = parse_stun(response)
    assert message.message_class == stun.Class.RESPONSE
    return message


def test_nomination_of_the_same_remote_address_on_another_local_address_moves_the_pair() -> None:
    # RFC 8445 §7.3.1.5: (L2, R) is another pair than (L1, R), so its nomination selects it.
    lite = make_lite()
    check(lite, 1.0, local=LOCAL_PRIMARY, nominate=True)
    check(lite, 2.0, local=LOCAL_SECONDARY, nominate=True)
    assert drain(lite) == [
        IceNominated(CLIENT_ADDRESS, LOCAL_PRIMARY),
        IceNominated(CLIENT_ADDRESS, LOCAL_SECONDARY),
    ]
    assert lite.selected_pair == (LOCAL_SECONDARY, CLIENT_ADDRESS)
    assert lite.selected_address == CLIENT_ADDRESS
    assert lite.selected_local == LOCAL_SECONDARY
    assert lite.get_timer() == 32.0
    # Nominating the selected pair again is no change (aggressive nomination repeats it).
    check(lite, 3.0, local=LOCAL_SECONDARY, nominate=True)
    assert drain(lite) == []
    assert lite.get_timer() == 33.0


def test_nominated_event_names_the_pair() -> None:
    event = IceNominated(CLIENT_ADDRESS, LOCAL_SECONDARY)
    assert event.pair == (LOCAL_SECONDARY, CLIENT_ADDRESS)
    assert IceNominated(CLIENT_ADDRESS).pair == (None, CLIENT_ADDRESS)
    assert make_lite().selected_pair is None


def test_checks_on_a_non_selected_local_address_do_not_keep_consent() -> None:
    # RFC 7675 §5.1: consent is per pair. The peer keeps checking (L2, R) every 5 s, which
    # it never nominated; the selected pair (L1, R) is silent after t=1, so consent
    # expires exactly 30 s after its last verified check, checks elsewhere or not.
    lite = make_lite(now=0.0)
    check(lite, 1.0, local=LOCAL_PRIMARY, nominate=True)
    drain(lite)
    now = 1.0
    while now + 5.0 < 31.0:
        now += 5.0
        check(lite, now, local=LOCAL_SECONDARY)
        assert lite.get_timer() == 31.0
    lite.handle_timer(30.999)
    assert drain(lite) == []
    lite.handle_timer(31.0)
    assert drain(lite) == [IceConsentExpired()]
    assert lite.consent_expired
    request = binding_request(username="srv1:cli1", key=lite.local_pwd.encode())
    assert lite.receive_stun(bytes(request), CLIENT_ADDRESS, 31.5, LOCAL_PRIMARY) is None


def test_checks_on_the_selected_pair_keep_consent() -> None:
    lite = make_lite(now=0.0)
    check(lite, 1.0, local=LOCAL_PRIMARY, nominate=True)
    check(lite, 6.0, local=LOCAL_PRIMARY)
    assert lite.get_timer() == 36.0
    check(lite, 7.0, local=LOCAL_SECONDARY)
    check(lite, 8.0, local=None)  # a driver that cannot tell is not the selected pair either
    assert lite.get_timer() == 36.0


def test_before_nomination_a_check_on_any_local_address_refreshes_consent() -> None:
    # As with remote addresses: a peer that checks but never nominates is freed after
    # one timeout from its last verified check, whichever of our addresses it reached.
    lite = make_lite(now=0.0)
    check(lite, 4.0, local=LOCAL_PRIMARY)
    check(lite, 9.0, local=LOCAL_SECONDARY)
    assert lite.get_timer() == 39.0
    assert drain(lite) == []
    assert lite.selected_pair is None


def test_checker_against_lite_with_a_local_address_selects_that_pair() -> None:
    lite = make_lite()
    checker = make_checker(lite)
    while (outgoing := checker.next_request(0.0)) is not None:
        request, destination = outgoing
        response = lite.receive_stun(request, CLIENT_ADDRESS, 0.0, destination[0])
        assert response is not None
        checker.receive_stun(response, destination, 0.0)
    assert drain(checker) == [IceConnected(SERVER_ADDRESS)]
    assert drain(lite) == [IceNominated(CLIENT_ADDRESS, SERVER_ADDRESS[0])]
    assert lite.selected_pair == (SERVER_ADDRESS[0], CLIENT_ADDRESS)


def pair_checks(locals_: list[str | None]) -> st.SearchStrategy[list]:
    return st.lists(
        st.tuples(
            st.sampled_from(locals_),
            st.sampled_from([CLIENT_ADDRESS, CLIENT_ADDRESS_V6]),
            st.booleans(),  # USE-CANDIDATE
            st.floats(min_value=0.0, max_value=40.0, allow_nan=False),  # time since last check
        ),
        max_size=30,
    )


def replay_against_pair_model(checks: list) -> None:
    """Feed ``checks`` to a lite session and compare it with the rules, stated per pair:
    the selected pair is the last nominated one, an event is raised exactly when it
    changes (RFC 8445 §7.3.1.5), and the consent deadline runs from the last verified
    check on it, or on any pair before the first nomination (RFC 7675 §5.1)."""
    lite = make_lite(now=0.0)
    now = 0.0
    last_nominated = None
    last_refreshed_at = 0.0
    expected_events: list[IceNominated] = []
    for local, address, nominate, elapsed in checks:
        now += elapsed
        if now >= last_refreshed_at + DEFAULT_CONSENT_TIMEOUT:
            lite.handle_timer(now)
            assert drain(lite) == [*expected_events, IceConsentExpired()]
            return
        pair = (local, address)
        check(lite, now, local=local, address=address, nominate=nominate)
        if last_nominated is None or pair == last_nominated:
            last_refreshed_at = now
        if nominate:
            if pair != last_nominated:
                expected_events.append(IceNominated(address, local))
            last_nominated = pair
            last_refreshed_at = now
        assert lite.selected_pair == last_nominated
        assert lite.get_timer() == last_refreshed_at + DEFAULT_CONSENT_TIMEOUT
    assert drain(lite) == expected_events


@given(pair_checks([LOCAL_PRIMARY, LOCAL_SECONDARY]))
def test_selected_pair_is_always_the_last_nominated_one(checks: list) -> None:
    replay_against_pair_model(checks)


@given(pair_checks([None]))
def test_without_local_addresses_pairs_are_remote_addresses_as_before(checks: list) -> None:
    # A socket bound to one address: one local candidate, so the same rules keyed by
    # the remote address alone, and events equal to the ones raised before pairs had a
    # local half (IceNominated(address)).
    replay_against_pair_model(checks)
