"""Session URLs that ended a moment ago, so that the client's DELETE still answers 200.

Why: a client that closes its peer connection before it DELETEs (aiortc's and the
browsers' ``pc.close()``, then the WHIP/WHEP client's DELETE) sends DTLS close_notify
first (RFC 5246 §7.2.1), and the media plane ends the session on it at once. Without
a memory of it, the DELETE that follows a few milliseconds later finds nothing and
answers 404, which clients report as a failed teardown (OBS logs a warning on anything
but 200). The same holds for a session that lost ICE consent (RFC 7675 §5.1), failed
DTLS, or whose publisher was replaced by ``--publisher-takeover``: the client did
nothing wrong by DELETEing the URL it was given (RFC 9725 §4.3, WHEP draft-03 §4.3).

Theory of operation (sans-IO: every method takes ``now``):

- ``issue`` records each session URL the HTTP layer hands out (201 or 406 Location);
- ``sweep(now, is_alive)``, which the HTTP layer runs about once a second, moves the
  records whose session is gone to the tombstones, ended at ``now`` (so an end is
  dated to within one sweep interval); ``end`` does it at once where the HTTP layer
  ends a session itself (a takeover);
- ``take(session_id, now, ...)``, for a DELETE that finds no session, returns and removes
  the tombstone (a record still listed as issued ended since the last sweep, so it is
  ended now). A DELETE answers 200 once: a second DELETE of the same URL, like any
  DELETE after the one that ended the session, finds nothing and answers 404.
- ``forget`` drops the record of a session the client DELETEd itself.

Memory is bounded: records live as long as their session; tombstones expire ``grace``
seconds after the end (oldest first, since ends are dated with a non-decreasing
``now``), checked lazily on every call, and at most ``capacity`` are kept (the oldest
goes first), whatever the rate at which sessions end.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

#: How long the URL of an ended session still answers its DELETE with 200 (seconds).
DEFAULT_ENDED_SESSION_GRACE = 60.0
#: Tombstones kept at most: a burst of ends (a worker restart) cannot grow memory beyond.
DEFAULT_CAPACITY = 100_000


@dataclass(frozen=True, eq=False)
class IssuedSession:
    """A session URL the HTTP layer handed out: ``/{endpoint}/{stream}/{session_id}``.

    Compared by identity: it is also the key the session's credential binding is kept
    under (auth.AccessControl), once the session object itself is gone.
    """

    session_id: str
    endpoint: str  # "whip" or "whep"
    stream: str


class SessionTombstones:
    """Issued session URLs and the recently ended ones (see the module docstring)."""

    def __init__(
        self, *, grace: float = DEFAULT_ENDED_SESSION_GRACE, capacity: int = DEFAULT_CAPACITY
    ) -> None:
        if grace < 0:
            raise ValueError("the grace period cannot be negative")
        if capacity < 1:
            raise ValueError("at least one tombstone must fit")
        self.grace = grace
        self.capacity = capacity
        self._issued: dict[str, IssuedSession] = {}
        # session id -> (record, ended at), in the order of the ends.
        self._ended: OrderedDict[str, tuple[IssuedSession, float]] = OrderedDict()

    @property
    def issued(self) -> int:
        return len(self._issued)

    @property
    def tombstones(self) -> int:
        return len(self._ended)

    def issue(self, record: IssuedSession) -> None:
        self._issued[record.session_id] = record

    def forget(self, session_id: str) -> None:
        """The client DELETEd the session: nothing to remember."""
        self._issued.pop(session_id, None)

    def end(self, session_id: str, now: float) -> None:
        """The session ended at ``now`` without its client's DELETE."""
        record = self._issued.pop(session_id, None)
        if record is None:
            return
        self._ended[session_id] = (record, now)
        while len(self._ended) > self.capacity:
            self._ended.popitem(last=False)
        self._expire(now)

    def sweep(self, now: float, is_alive: Callable[[str], bool]) -> int:
        """Tombstone every issued session that ``is_alive`` says is gone; how many."""
        gone = [session_id for session_id in self._issued if not is_alive(session_id)]
        for session_id in gone:
            self.end(session_id, now)
        self._expire(now)
        return len(gone)

    def take(
        self, session_id: str, now: float, *, endpoint: str, stream: str
    ) -> IssuedSession | None:
        """For a DELETE of ``/{endpoint}/{stream}/{session_id}`` that found no session:
        its record if it ended within ``grace`` (and it is then removed: the next DELETE
        answers 404), else None. A DELETE of the id under another URL takes nothing."""
        if session_id in self._issued:
            self.end(session_id, now)  # ended since the last sweep
        self._expire(now)
        entry = self._ended.get(session_id)
        if entry is None or (entry[0].endpoint, entry[0].stream) != (endpoint, stream):
            return None
        del self._ended[session_id]
        return entry[0]

    def _expire(self, now: float) -> None:
        while self._ended:
            _, ended_at = next(iter(self._ended.values()))
            if now - ended_at < self.grace:
                return
            self._ended.popitem(last=False)
