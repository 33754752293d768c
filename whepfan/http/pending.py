"""A per-client cap on pending sessions: WHIP publishers and WHEP viewers that have been
answered (201, or 406 with a counter-offer) and have not connected (ICE + DTLS) yet.

Why: the server-wide cap on pending viewers (``max_pending_sessions``, workers/capacity.py)
bounds what squatters hold together, but one client posting within its rate limit
(ratelimit.py: a burst of 50, then 10/s) holds burst + rate x connect timeout, about 150
pending sessions at the defaults: a small server's whole cap (64), so one address could
lock every other viewer out with 503 ``pending_full``. With at most ``max_per_client``
each, filling the cap takes cap / max_per_client addresses (IPv6: /64s, ratelimit.py).

A session stops counting when the backend says it connected or ended (failed, expired,
taken over), when its DELETE arrives, or at its connect deadline, ``connect_timeout``
after its POST, whichever comes first. The deadline is the media plane's own
(media/session.py ends the session then), so the table is bounded by the POST rate
whatever the backend reports: a session lost between two of the backend's reports still
leaves on time. Beyond the cap a POST gets 429 (RFC 6585 §4) with Retry-After, the
seconds until the client's oldest pending session reaches its deadline: the latest one of
its places frees.

:class:`PendingSessions` is sans-IO (``now`` is a parameter) and tested on virtual time.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass

# A player makes one session and it is pending for one connection setup (well under a
# second on a LAN, a few seconds through TURN); a page of players (a multiview wall of
# 3 x 3 or 4 x 4) posts them all at once; an office or carrier NAT shares one address
# among many people. The backend reports connections about once a second, so an honest
# client's count is what it posted within its setup time plus that second. 16 covers a
# 4 x 4 wall and is a tenth of the ~150 one address can hold without it.
DEFAULT_MAX_PENDING_PER_CLIENT = 16


@dataclass(frozen=True, slots=True, kw_only=True)
class PendingLimit:
    max_per_client: int = DEFAULT_MAX_PENDING_PER_CLIENT
    # When a pending session is connected or gone at the latest (MediaConfig.connect_timeout).
    connect_timeout: float = 10.0
    # As the POST rate limit's (ratelimit.RateLimit): tools on this host are not limited.
    exempt_loopback: bool = True

    def __post_init__(self) -> None:
        if self.max_per_client < 1:
            raise ValueError("max_per_client is at least 1 (no cap: no PendingLimit)")
        if not self.connect_timeout > 0:
            raise ValueError("the connect timeout is positive")


class PendingSessions:
    """Each client's pending sessions and their connect deadlines."""

    def __init__(self, limit: PendingLimit) -> None:
        self.limit = limit
        self._by_client: dict[str, dict[str, float]] = {}  # client -> {session: deadline}
        self._client_of: dict[str, str] = {}  # session -> client
        # (deadline, session), a heap; entries of released sessions stay until popped or
        # compacted away (:meth:`_compact`), so it is at most about twice the live ones.
        self._deadlines: list[tuple[float, str]] = []

    def __len__(self) -> int:
        """Clients with a pending session."""
        return len(self._by_client)

    @property
    def sessions(self) -> int:
        """Pending sessions, all clients."""
        return len(self._client_of)

    def pending(self, client: str) -> int:
        return len(self._by_client.get(client, ()))

    def check(
        self, client: str, now: float, still_pending: Callable[[str], bool] | None = None
    ) -> int | None:
        """None if ``client`` may make one more session now, else the Retry-After
        seconds. At the cap, its sessions are first checked with ``still_pending`` (the
        backend's view), so one that connected since the last settle does not count."""
        self.expire(now)
        sessions = self._by_client.get(client)
        cap = self.limit.max_per_client
        if sessions is None or len(sessions) < cap:
            return None
        if still_pending is not None:
            for session_id in [s for s in sessions if not still_pending(s)]:
                self.release(session_id)
            sessions = self._by_client.get(client)
            if sessions is None or len(sessions) < cap:
                return None
        wait = min(sessions.values()) - now
        return max(1, min(math.ceil(self.limit.connect_timeout), math.ceil(wait)))

    def add(self, client: str, session_id: str, now: float) -> None:
        """``client``'s new session ``session_id``, answered at ``now``."""
        self.release(session_id)
        deadline = now + self.limit.connect_timeout
        self._by_client.setdefault(client, {})[session_id] = deadline
        self._client_of[session_id] = client
        heapq.heappush(self._deadlines, (deadline, session_id))

    def release(self, session_id: str) -> bool:
        """The session left pending (connected, ended, DELETEd); False if not pending."""
        forgotten = self._forget(session_id)
        self._compact()
        return forgotten

    def _forget(self, session_id: str) -> bool:
        client = self._client_of.pop(session_id, None)
        if client is None:
            return False
        sessions = self._by_client[client]
        del sessions[session_id]
        if not sessions:
            del self._by_client[client]
        return True

    def expire(self, now: float) -> int:
        """Forget the sessions whose connect deadline has passed; how many."""
        expired = 0
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            deadline, session_id = heapq.heappop(heap)
            client = self._client_of.get(session_id)
            if client is not None and self._by_client[client].get(session_id) == deadline:
                self._forget(session_id)
                expired += 1
        self._compact()
        return expired

    def settle(self, now: float, still_pending: Callable[[str], bool]) -> int:
        """Forget sessions past their deadline or no longer pending in the backend's
        view (the HTTP layer's once-a-second sweep); how many."""
        released = self.expire(now)
        for session_id in [s for s in self._client_of if not still_pending(s)]:
            released += self.release(session_id)
        return released

    def _compact(self) -> None:
        if len(self._deadlines) > 2 * len(self._client_of) + 64:
            self._deadlines = [
                (deadline, session_id)
                for sessions in self._by_client.values()
                for session_id, deadline in sessions.items()
            ]
            heapq.heapify(self._deadlines)
