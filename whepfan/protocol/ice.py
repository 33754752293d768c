"""ICE for a media server: the lite answering side, and a minimal full controlling side.

Theory of operation
-------------------
whepfan is an ICE-lite agent (RFC 8445 §2.5): it advertises host candidates only,
never sends connectivity checks, and answers the checks a full agent (the browser)
sends to it. Every session of a worker shares that worker's single UDP port, so the
I/O driver routes STUN by the local ufrag (``stun_local_ufrag``) and everything else
by 5-tuple. A lite agent is always the controlled agent (RFC 8445 §6.1.1), so the
peer decides which pair is used by sending USE-CANDIDATE (RFC 8445 §8.2).

``IceLiteSession`` is sans-IO: ``receive_stun(data, addr, now, local)`` returns the
reply to send to ``addr`` from ``local`` (or None to drop), events come out of
``next_event()``, and the one timer (``get_timer``/``handle_timer``) is the RFC 7675
consent deadline.

A candidate pair is a local and a remote transport address (RFC 8445 §4, §6.1.2.2).
The remote one is the check's source; the local one is the address of ours the check
reached, which the driver learns per datagram on a wildcard-bound socket (every session
shares the worker's one port, so the IP names the local candidate). A driver whose
socket is bound to one address passes ``local=None``: there is then one local candidate
and pairs differ by remote address only. Nomination (RFC 8445 §7.3.1.5) and consent
(RFC 7675 §5.1) are both per pair, so a check reaching another of our addresses from the
same remote address is another pair.

``IceControllingChecker`` is the other end, used by tests and the load-test harness:
it sends Binding requests with aggressive nomination (USE-CANDIDATE on every check),
retransmits them on the RFC 8489 §6.2.1 schedule, and once connected keeps consent
alive with a check every ~5 s (RFC 7675 §5.1).

STUN encoding and decoding is aioice's (``aioice.stun``); this module validates the
framing itself first so that any garbage is dropped or answered, never raised.
"""

from __future__ import annotations

import enum
import random
import secrets
import struct
import zlib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aioice import stun

from whepfan.errors import ParseError

#: A transport address as asyncio reports it; IPv6 may carry flowinfo and scope id.
Address = tuple[Any, ...]
#: Our IP address a datagram reached (the port is the worker's one port), or None
#: when the driver cannot tell because its socket is bound to one address.
LocalAddress = str | None

_STUN_HEADER_LENGTH = 20
_STUN_MAGIC_COOKIE = 0x2112A442
_STUN_BINDING_REQUEST = 0x0001
_STUN_ATTRIBUTE_USERNAME = 0x0006
_STUN_ATTRIBUTE_FINGERPRINT = 0x8028
_FINGERPRINT_XOR = 0x5354554E

#: RFC 7675 §5.1: consent expires 30 s after the last verified check.
DEFAULT_CONSENT_TIMEOUT = 30.0
#: RFC 7675 §5.1: consent checks every 5 s, randomised over [0.8, 1.2] of that.
DEFAULT_CONSENT_INTERVAL = 5.0
#: RFC 8445 §14.2: Ta, the pacing of new checks, 50 ms by default.
CHECK_PACING = 0.050
#: RFC 8445 §14.3: RTO = max(500 ms, Ta * number of pairs checked).
MIN_RTO = 0.5
#: RFC 8489 §6.2.1: Rc transmissions of a request, then Rm * RTO of waiting.
MAX_TRANSMISSIONS = 7
LAST_WAIT_FACTOR = 16


# --- events -----------------------------------------------------------------------


@dataclass(frozen=True)
class IceNominated:
    """The peer nominated the pair (``local``, ``address``) (USE-CANDIDATE, RFC 8445
    §8.2): send media to ``address`` from ``local`` (None: from the socket's address)."""

    address: Address
    local: LocalAddress = None

    @property
    def pair(self) -> tuple[LocalAddress, Address]:
        return (self.local, self.address)


@dataclass(frozen=True)
class IceConsentExpired:
    """No verified check for the consent timeout: RFC 7675 §5.1 says cease transmission."""


@dataclass(frozen=True)
class IceConnected:
    """(Checker side) a nominated check to ``address`` succeeded."""

    address: Address


@dataclass(frozen=True)
class IceCheckFailed:
    """(Checker side) a check to ``address`` got an error response or timed out.

    ``error_code`` is the STUN error code, or None for a timeout (RFC 8489 §6.2.1).
    """

    address: Address
    error_code: int | None


IceEvent = IceNominated | IceConsentExpired | IceConnected | IceCheckFailed


# --- framing ------------------------------------------------------------------------


def _stun_attributes(data: bytes) -> list[tuple[int, int, int]] | None:
    """Walk the TLV attributes of a STUN message: [(type, value_offset, value_length)].

    Returns None unless the header is a valid STUN header (RFC 8489 §5: top two bits
    zero, magic cookie, body length a multiple of 4 matching the datagram) and the
    attributes, each padded to 4 bytes (RFC 8489 §14), exactly fill the body.
    """
    if len(data) < _STUN_HEADER_LENGTH or data[0] & 0xC0:
        return None
    body_length, cookie = struct.unpack_from("!HI", data, 2)
    if (
        cookie != _STUN_MAGIC_COOKIE
        or body_length % 4
        or body_length + _STUN_HEADER_LENGTH != len(data)
    ):
        return None
    attributes = []
    position = _STUN_HEADER_LENGTH
    while position < len(data):
        if position + 4 > len(data):
            return None
        attribute_type, value_length = struct.unpack_from("!HH", data, position)
        value_offset = position + 4
        position = value_offset + value_length + (-value_length % 4)
        if position > len(data):
            return None
        attributes.append((attribute_type, value_offset, value_length))
    return attributes


def stun_local_ufrag(data: bytes) -> str | None:
    """The local ufrag of a STUN Binding request, for demultiplexing by session.

    The USERNAME of a connectivity check is "RECEIVER-UFRAG:SENDER-UFRAG" (RFC 8445
    §7.2.2), so the part before the colon names our session. Returns None for
    anything that is not a well-framed Binding request with such a USERNAME; never
    raises, whatever the bytes.
    """
    attributes = _stun_attributes(data)
    if attributes is None or data[0:2] != b"\x00\x01":
        return None
    for attribute_type, value_offset, value_length in attributes:
        if attribute_type == _STUN_ATTRIBUTE_USERNAME:
            raw = data[value_offset : value_offset + value_length]
            local, colon, _ = raw.partition(b":")
            if not colon or not local:
                return None
            try:
                return local.decode("utf-8")
            except UnicodeDecodeError:
                return None
    return None


def _fingerprint_is_valid(data: bytes, attributes: list[tuple[int, int, int]]) -> bool:
    """RFC 8489 §14.7: FINGERPRINT, when present, must be the last attribute and equal
    the CRC-32 of the message up to it (length field covering it) XOR 0x5354554E."""
    for index, (attribute_type, value_offset, value_length) in enumerate(attributes):
        if attribute_type != _STUN_ATTRIBUTE_FINGERPRINT:
            continue
        if index != len(attributes) - 1 or value_length != 4:
            return False
        attribute_start = value_offset - 4
        covered = bytearray(data[:attribute_start])
        struct.pack_into("!H", covered, 2, attribute_start + 8 - _STUN_HEADER_LENGTH)
        expected = (zlib.crc32(covered) ^ _FINGERPRINT_XOR) & 0xFFFFFFFF
        return struct.unpack_from("!I", data, value_offset)[0] == expected
    return True


def parse_stun(data: bytes) -> stun.Message:
    """Parse a STUN message with aioice, after checking its framing and FINGERPRINT.

    Raises ParseError for anything that is not a STUN message (RFC 8489 §7.3: such
    datagrams are discarded); aioice's own errors are folded into ParseError too.
    """
    attributes = _stun_attributes(data)
    if attributes is None:
        raise ParseError("not a well-framed STUN message")
    if not _fingerprint_is_valid(data, attributes):
        raise ParseError("STUN FINGERPRINT does not match")
    try:
        return stun.parse_message(data)
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        raise ParseError(f"malformed STUN message: {exc}") from exc


def _transaction_id(data: bytes) -> bytes:
    return data[8:_STUN_HEADER_LENGTH]


def _error_response(transaction_id: bytes, code: int, reason: str) -> stun.Message:
    return stun.Message(
        message_method=stun.Method.BINDING,
        message_class=stun.Class.ERROR,
        transaction_id=transaction_id,
        attributes={"ERROR-CODE": (code, reason)},
    )


def _unauthenticated_error(transaction_id: bytes, code: int, reason: str) -> bytes:
    """400 and 401 answer requests we could not authenticate, so they carry no
    MESSAGE-INTEGRITY (RFC 8489 §9.1.3); FINGERPRINT still marks them as STUN for
    the peer's demultiplexer (RFC 8445 §7.3)."""
    response = _error_response(transaction_id, code, reason)
    response.add_fingerprint()
    return bytes(response)


# --- ICE-lite session ---------------------------------------------------------------


@dataclass
class _Credentials:
    local_ufrag: str
    local_pwd: str
    remote_ufrag: str | None
    remote_pwd: str | None


class IceLiteSession:
    """The lite (controlled, answering) side of one WHIP/WHEP session.

    Consent (RFC 7675): before any nomination, every verified check refreshes the
    deadline, so a peer that starts checks but never nominates is freed too; once a
    pair is nominated only verified checks on the selected pair (same remote address
    and same local address) refresh it, because consent is per candidate pair (RFC 7675
    §5.1): a check reaching another of our addresses says nothing about the path that
    media takes. Given ``now`` at creation, the deadline runs from then; without it, no
    deadline is armed until the first verified check. Expiry is final: afterwards every
    datagram is dropped and the caller frees the session.
    """

    def __init__(
        self,
        *,
        local_ufrag: str,
        local_pwd: str,
        remote_ufrag: str | None = None,
        remote_pwd: str | None = None,
        consent_timeout: float = DEFAULT_CONSENT_TIMEOUT,
        now: float | None = None,
    ) -> None:
        self._credentials = _Credentials(local_ufrag, local_pwd, remote_ufrag, remote_pwd)
        # RFC 8445 §9: after a restart the old credentials stay in use until a check
        # with the new ones verifies (WHEP §4.4.3 keeps the old session on failure).
        self._restart_credentials: _Credentials | None = None
        self._consent_timeout = consent_timeout
        # With a creation time the clock runs from creation, so a peer that never
        # sends a verified check is let go after one consent timeout as well.
        self._last_verified_at: float | None = now
        self._consent_expired = False
        self._events: deque[IceEvent] = deque()
        self.selected_address: Address | None = None
        self.selected_local: LocalAddress = None

    @property
    def selected_pair(self) -> tuple[LocalAddress, Address] | None:
        """The nominated pair (local address, remote address), None before nomination."""
        if self.selected_address is None:
            return None
        return (self.selected_local, self.selected_address)

    @property
    def local_ufrag(self) -> str:
        return self._credentials.local_ufrag

    @property
    def local_pwd(self) -> str:
        return self._credentials.local_pwd

    @property
    def remote_ufrag(self) -> str | None:
        return self._credentials.remote_ufrag

    @property
    def remote_pwd(self) -> str | None:
        return self._credentials.remote_pwd

    @property
    def local_ufrags(self) -> tuple[str, ...]:
        """Every ufrag that currently routes to this session (two during a restart)."""
        if self._restart_credentials is None:
            return (self._credentials.local_ufrag,)
        return (self._credentials.local_ufrag, self._restart_credentials.local_ufrag)

    @property
    def consent_expired(self) -> bool:
        return self._consent_expired

    def set_remote_credentials(self, ufrag: str, pwd: str) -> None:
        """Remote credentials arriving by trickle (RFC 8838 §4), for the pending
        restart generation if there is one. A lite agent only needs them for
        bookkeeping: it authenticates checks with its own password (RFC 8445 §7.3)."""
        target = self._restart_credentials or self._credentials
        target.remote_ufrag = ufrag
        target.remote_pwd = pwd

    def add_remote_candidate(self, address: Address) -> None:
        """Accepted and ignored: a lite agent never checks candidates (RFC 8445 §2.5);
        it learns the peer's address from the checks it answers (§7.3)."""

    def restart(
        self,
        *,
        local_ufrag: str,
        local_pwd: str,
        remote_ufrag: str | None,
        remote_pwd: str | None,
    ) -> None:
        """Begin an ICE restart (RFC 8445 §9) with new credentials on both sides.

        Checks with the old credentials are still answered (and still refresh
        consent) until one with the new credentials verifies; then the old ones are
        dropped. A second restart before that replaces the pending one.
        """
        self._restart_credentials = _Credentials(local_ufrag, local_pwd, remote_ufrag, remote_pwd)

    def receive_stun(
        self, data: bytes, addr: Address, now: float, local: LocalAddress = None
    ) -> bytes | None:
        """Answer one datagram from ``addr`` that reached our address ``local``: the
        reply to send back from ``local`` (RFC 8489 §6.3.3), or None to drop."""
        if self._consent_expired:
            return None
        try:
            request = parse_stun(data)
        except ParseError:
            attributes = _stun_attributes(data)
            if (
                attributes is not None
                and data[0:2] == b"\x00\x01"
                and _fingerprint_is_valid(data, attributes)
            ):
                # A Binding request whose attributes do not decode (bad UTF-8,
                # bad address family): RFC 8489 §6.3.1 answers 400.
                return _unauthenticated_error(_transaction_id(data), 400, "Bad Request")
            return None
        # Lite agents answer Binding requests only; indications (keep-alives, RFC
        # 8445 §11) and responses (we send no requests) are dropped.
        if (
            request.message_method != stun.Method.BINDING
            or request.message_class != stun.Class.REQUEST
        ):
            return None
        transaction_id = request.transaction_id
        username = request.attributes.get("USERNAME")
        if username is None or "MESSAGE-INTEGRITY" not in request.attributes:
            # RFC 8489 §9.1.3: short-term credential requests lacking USERNAME or
            # MESSAGE-INTEGRITY are rejected with 400.
            return _unauthenticated_error(transaction_id, 400, "Bad Request")
        local_ufrag, _, _ = username.partition(":")
        credentials = self._credentials_for(local_ufrag)
        if credentials is None or not request.check_message_integrity(
            credentials.local_pwd.encode("utf-8")
        ):
            # RFC 8489 §9.1.3: unknown username or failed integrity -> 401.
            return _unauthenticated_error(transaction_id, 401, "Unauthorized")
        key = credentials.local_pwd.encode("utf-8")

        if "ICE-CONTROLLED" in request.attributes:
            # RFC 8445 §7.3.1.1: both sides claim controlled. A lite agent cannot
            # take the controlling role (§6.1.1), so it always answers 487 and
            # lets the full agent switch. Authenticated, as it follows a verified
            # request (RFC 8489 §9.1.3).
            response = _error_response(transaction_id, 487, "Role Conflict")
            response.add_message_integrity(key)
            return bytes(response)

        if credentials is self._restart_credentials:
            self._credentials = credentials
            self._restart_credentials = None

        pair = (local, addr)
        selected = self.selected_pair
        if selected is None or pair == selected:
            self._last_verified_at = now
        if "USE-CANDIDATE" in request.attributes and pair != selected:
            # RFC 8445 §7.3.1.5: the controlling agent nominated this pair. A later
            # nomination of another pair moves media there, whether the remote address
            # changed (network change) or only ours did (an ICE restart, or a peer
            # checking two of our host candidates from one socket).
            self.selected_address = addr
            self.selected_local = local
            self._last_verified_at = now
            self._events.append(IceNominated(addr, local))

        response = stun.Message(
            message_method=stun.Method.BINDING,
            message_class=stun.Class.RESPONSE,
            transaction_id=transaction_id,
            # RFC 8445 §7.3.1.3 / RFC 8489 §14.2: the source address as we saw it.
            attributes={"XOR-MAPPED-ADDRESS": (addr[0], addr[1])},
        )
        # RFC 8489 §14.5/§14.7: MESSAGE-INTEGRITY with our password, then FINGERPRINT.
        response.add_message_integrity(key)
        return bytes(response)

    def _credentials_for(self, local_ufrag: str) -> _Credentials | None:
        for candidate in (self._credentials, self._restart_credentials):
            if candidate is not None and candidate.local_ufrag == local_ufrag:
                return candidate
        return None

    def next_event(self) -> IceEvent | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """The consent deadline: last verified check + consent timeout (RFC 7675 §5.1)."""
        if self._consent_expired or self._last_verified_at is None:
            return None
        return self._last_verified_at + self._consent_timeout

    def handle_timer(self, now: float) -> None:
        deadline = self.get_timer()
        if deadline is not None and now >= deadline:
            self._consent_expired = True
            self._events.append(IceConsentExpired())


# --- full controlling checker -------------------------------------------------------


class _PairState(enum.Enum):
    # RFC 8445 §6.1.2.6 pair states (Frozen is not needed: one component, one stream).
    WAITING = "waiting"
    IN_PROGRESS = "in-progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass
class _Transaction:
    address: Address
    request: bytes
    initial_rto: float
    is_consent_check: bool
    transmissions: int = 0
    next_transmission_at: float = 0.0
    interval: float = 0.0
    gives_up_at: float | None = None


@dataclass
class _CandidatePair:
    address: Address
    state: _PairState = _PairState.WAITING
    transactions: list[bytes] = field(default_factory=list)


def _host_priority(local_preference: int = 65535, component: int = 1) -> int:
    # RFC 8445 §5.1.2.1; the PRIORITY attribute of a check uses the peer-reflexive
    # type preference, 110 (§7.1.1).
    return (110 << 24) | (local_preference << 8) | (256 - component)


class IceControllingChecker:
    """Minimal full ICE agent in the controlling role, for one component.

    Every check carries USE-CANDIDATE (aggressive nomination): the first pair whose
    check succeeds is selected. Retransmissions follow RFC 8489 §6.2.1 with the RTO
    of RFC 8445 §14.3; new checks are paced one per Ta (§14.2). After connecting, a
    consent check goes to the selected address every ``consent_interval`` seconds
    (jittered by ±``consent_jitter``, RFC 7675 §5.1) and consent expires
    ``consent_timeout`` after the last authenticated response.

    Driving it: call ``next_request(now)`` until it returns None and send each
    datagram (the first call starts the checks), feed responses to
    ``receive_stun``, and call ``handle_timer`` at ``get_timer()``, then
    ``next_request`` again.
    """

    def __init__(
        self,
        *,
        local_ufrag: str,
        local_pwd: str,
        remote_ufrag: str,
        remote_pwd: str,
        remote_candidates: Iterable[Address] = (),
        tie_breaker: int | None = None,
        consent_interval: float = DEFAULT_CONSENT_INTERVAL,
        consent_jitter: float = 0.2,
        consent_timeout: float = DEFAULT_CONSENT_TIMEOUT,
        rng: random.Random | None = None,
    ) -> None:
        self._username = f"{remote_ufrag}:{local_ufrag}"
        self._remote_key = remote_pwd.encode("utf-8")
        self._tie_breaker = tie_breaker if tie_breaker is not None else secrets.randbits(64)
        self._consent_interval = consent_interval
        self._consent_jitter = consent_jitter
        self._consent_timeout = consent_timeout
        self._rng = rng or random.Random()
        self._pairs: dict[Address, _CandidatePair] = {}
        self._transactions: dict[bytes, _Transaction] = {}
        self._next_check_at: float | None = None
        self._next_consent_check_at: float | None = None
        self._last_response_at: float | None = None
        self._consent_expired = False
        self._events: deque[IceEvent] = deque()
        self.selected_address: Address | None = None
        for address in remote_candidates:
            self.add_remote_candidate(address)

    def add_remote_candidate(self, address: Address) -> None:
        if address not in self._pairs:
            self._pairs[address] = _CandidatePair(address)

    def next_event(self) -> IceEvent | None:
        return self._events.popleft() if self._events else None

    def _build_request(self, *, nominate: bool) -> tuple[bytes, bytes]:
        attributes: dict[str, Any] = {
            "USERNAME": self._username,
            "PRIORITY": _host_priority(),
            "ICE-CONTROLLING": self._tie_breaker,
        }
        if nominate:
            attributes["USE-CANDIDATE"] = None
        request = stun.Message(
            message_method=stun.Method.BINDING,
            message_class=stun.Class.REQUEST,
            attributes=attributes,
        )
        # RFC 8445 §7.2.2: checks are signed with the peer's password, then fingerprinted.
        request.add_message_integrity(self._remote_key)
        return request.transaction_id, bytes(request)

    def _start_transaction(self, address: Address, now: float, *, is_consent_check: bool) -> bytes:
        checked = sum(
            1
            for pair in self._pairs.values()
            if pair.state in (_PairState.WAITING, _PairState.IN_PROGRESS)
        )
        rto = max(MIN_RTO, CHECK_PACING * checked)
        transaction_id, request = self._build_request(nominate=not is_consent_check)
        transaction = _Transaction(
            address=address,
            request=request,
            initial_rto=rto,
            is_consent_check=is_consent_check,
            interval=rto,
        )
        self._transactions[transaction_id] = transaction
        self._pairs[address].transactions.append(transaction_id)
        return self._transmit(transaction, now)

    def _transmit(self, transaction: _Transaction, now: float) -> bytes:
        transaction.transmissions += 1
        if transaction.transmissions >= MAX_TRANSMISSIONS:
            transaction.next_transmission_at = float("inf")
            transaction.gives_up_at = now + LAST_WAIT_FACTOR * transaction.initial_rto
        else:
            transaction.next_transmission_at = now + transaction.interval
            transaction.interval *= 2
        return transaction.request

    def next_request(self, now: float) -> tuple[bytes, Address] | None:
        """The next datagram due at ``now`` and where to send it, or None."""
        if self._consent_expired:
            return None
        for transaction in self._transactions.values():
            if transaction.next_transmission_at <= now:
                return self._transmit(transaction, now), transaction.address
        if self.selected_address is None and (
            self._next_check_at is None or self._next_check_at <= now
        ):
            for pair in self._pairs.values():
                if pair.state is _PairState.WAITING:
                    pair.state = _PairState.IN_PROGRESS
                    self._next_check_at = now + CHECK_PACING
                    return (
                        self._start_transaction(pair.address, now, is_consent_check=False),
                        pair.address,
                    )
        if (
            self.selected_address is not None
            and self._next_consent_check_at is not None
            and self._next_consent_check_at <= now
        ):
            self._schedule_consent_check(now)
            address = self.selected_address
            return self._start_transaction(address, now, is_consent_check=True), address
        return None

    def _schedule_consent_check(self, now: float) -> None:
        jitter = self._rng.uniform(1.0 - self._consent_jitter, 1.0 + self._consent_jitter)
        self._next_consent_check_at = now + self._consent_interval * jitter

    def receive_stun(self, data: bytes, addr: Address, now: float) -> None:
        """Consume a response to one of our checks; anything else is dropped."""
        if self._consent_expired:
            return
        try:
            message = parse_stun(data)
        except ParseError:
            return
        transaction = self._transactions.get(message.transaction_id)
        if (
            transaction is None
            or message.message_method != stun.Method.BINDING
            or message.message_class not in (stun.Class.RESPONSE, stun.Class.ERROR)
        ):
            return
        error_code = message.error_code if message.message_class == stun.Class.ERROR else None
        # RFC 8489 §9.1.4: responses must verify with the password the request used,
        # except 400/401, which the server sends unauthenticated (§9.1.3).
        if error_code not in (400, 401) and not message.check_message_integrity(self._remote_key):
            return
        del self._transactions[message.transaction_id]
        pair = self._pairs[transaction.address]
        pair.transactions.remove(message.transaction_id)

        if error_code is not None:
            if not transaction.is_consent_check:
                # RFC 8445 §7.2.5.2.4: an error other than 487 fails the pair; we
                # never switch to controlled on 487 because a lite peer cannot
                # control, so that fails it as well.
                pair.state = _PairState.FAILED
                self._events.append(IceCheckFailed(transaction.address, error_code))
            return
        if addr != transaction.address:
            # RFC 8445 §7.2.5.2.1: a response from another address than the
            # request went to is not symmetric; the pair fails.
            pair.state = _PairState.FAILED
            self._events.append(IceCheckFailed(transaction.address, None))
            return
        self._last_response_at = now
        if transaction.is_consent_check:
            return
        pair.state = _PairState.SUCCEEDED
        if self.selected_address is None:
            self.selected_address = transaction.address
            self._schedule_consent_check(now)
            self._events.append(IceConnected(transaction.address))
            # RFC 8445 §8.1.2: with a pair nominated, checks on the others stop.
            for other_id, other in list(self._transactions.items()):
                if other.address != transaction.address:
                    del self._transactions[other_id]
                    self._pairs[other.address].transactions.remove(other_id)

    def get_timer(self) -> float | None:
        if self._consent_expired:
            return None
        deadlines = []
        for transaction in self._transactions.values():
            deadlines.append(transaction.next_transmission_at)
            if transaction.gives_up_at is not None:
                deadlines.append(transaction.gives_up_at)
        if self.selected_address is None:
            if self._next_check_at is not None and any(
                pair.state is _PairState.WAITING for pair in self._pairs.values()
            ):
                deadlines.append(self._next_check_at)
        else:
            if self._next_consent_check_at is not None:
                deadlines.append(self._next_consent_check_at)
            if self._last_response_at is not None:
                deadlines.append(self._last_response_at + self._consent_timeout)
        finite = [deadline for deadline in deadlines if deadline != float("inf")]
        return min(finite) if finite else None

    def handle_timer(self, now: float) -> None:
        """Expire transactions and consent; due (re)transmissions come from next_request."""
        if self._consent_expired:
            return
        for transaction_id, transaction in list(self._transactions.items()):
            if transaction.gives_up_at is not None and now >= transaction.gives_up_at:
                del self._transactions[transaction_id]
                pair = self._pairs[transaction.address]
                pair.transactions.remove(transaction_id)
                if not transaction.is_consent_check and pair.state is _PairState.IN_PROGRESS:
                    pair.state = _PairState.FAILED
                    self._events.append(IceCheckFailed(transaction.address, None))
        if (
            self.selected_address is not None
            and self._last_response_at is not None
            and now >= self._last_response_at + self._consent_timeout
        ):
            self._consent_expired = True
            self._transactions.clear()
            self._events.append(IceConsentExpired())
