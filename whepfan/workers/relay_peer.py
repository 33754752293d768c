"""Unix datagram sockets between workers.

Each worker binds ``relay-<i>.sock`` in the pool's private directory and sends to every
other worker on its own connected datagram socket (:class:`RelayPeer`). An ``AF_UNIX``
datagram queue is bounded by ``net.unix.max_dgram_qlen`` datagrams (10 by default),
whatever SO_RCVBUF says, so a burst the receiving worker cannot take yet waits, in order,
in a bounded backlog on the sender's side instead of being dropped at the kernel's queue.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections import deque
from collections.abc import MutableMapping

log = logging.getLogger("whepfan.workers")


def relay_path(relay_dir: str, worker: int) -> str:
    return os.path.join(relay_dir, f"relay-{worker}.sock")


# Frames one peer may have waiting in this process while its relay socket is full: about
# two seconds of a 720p simulcast stream (~700 packets/s with audio). A peer further
# behind than that is stuck, and its viewers are better served by fresh packets later
# than by an ever-growing queue.
RELAY_BACKLOG_FRAMES = 1536


class RelayPeer:
    """The send side of the relay towards one other worker: a Unix datagram socket
    *connected* to that worker's relay socket, and a bounded backlog.

    Why connected, and why a backlog: Linux bounds an AF_UNIX datagram socket's receive
    queue by *datagrams*, ``net.unix.max_dgram_qlen`` (10 by default), not by SO_RCVBUF.
    A keyframe arrives from the publisher as a burst of tens of packets; when the other
    worker is busy for a millisecond (a DTLS handshake in a join storm) the eleventh
    packet of the burst would meet EAGAIN and be lost (measured: 12 packets in a
    50-viewer join, every viewer on that worker saw the gap). On a connected socket
    ``poll`` reports writable only when the peer's queue has room (the kernel's
    unix_dgram_poll peer-wake), so frames that meet EAGAIN wait here, in order, and go
    out as soon as the peer reads. Only a peer more than ``backlog_limit`` frames behind
    loses frames (``drop_relay_queue_full``)."""

    def __init__(
        self,
        *,
        path: str,
        loop: asyncio.AbstractEventLoop,
        counters: MutableMapping[str, int],
        backlog_limit: int = RELAY_BACKLOG_FRAMES,
    ) -> None:
        self.path = path
        self._loop = loop
        self._counters = counters
        self.backlog_limit = backlog_limit
        self.backlog: deque[bytes] = deque()
        self._sock: socket.socket | None = None
        self._writer_fd: int | None = None

    def send(self, frame: bytes) -> None:
        if self.backlog:
            self._queue(frame)  # behind what is waiting: the relay keeps packet order
            return
        sock = self._connected()
        if sock is None:
            self._counters["drop_relay_no_peer"] += 1
            return
        try:
            sock.send(frame)
        except BlockingIOError:
            self._queue(frame)
            self._wait_writable(sock)
        except OSError as exc:
            self._peer_gone(exc, lost=1)
        else:
            self._counters["relay_sent"] += 1

    def close(self) -> None:
        self._stop_waiting()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.backlog.clear()

    def _connected(self) -> socket.socket | None:
        """The socket, connected now if it was not (the peer may start after us, or have
        been replaced: a new process binds a new socket at the same path)."""
        if self._sock is not None:
            return self._sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()  # ENOENT/ECONNREFUSED: not (yet) there; try again next frame
            return None
        self._sock = sock
        return sock

    def _queue(self, frame: bytes) -> None:
        if len(self.backlog) >= self.backlog_limit:
            self._counters["drop_relay_queue_full"] += 1
            return
        self.backlog.append(frame)
        self._counters["relay_backlogged"] += 1

    def _wait_writable(self, sock: socket.socket) -> None:
        if self._writer_fd is None:
            self._writer_fd = sock.fileno()
            self._loop.add_writer(self._writer_fd, self._flush)

    def _stop_waiting(self) -> None:
        if self._writer_fd is not None:
            self._loop.remove_writer(self._writer_fd)
            self._writer_fd = None

    def _flush(self) -> None:
        sock = self._sock
        while self.backlog and sock is not None:
            try:
                sock.send(self.backlog[0])
            except BlockingIOError:
                return  # still full: the loop calls again when the peer has read
            except OSError as exc:
                self._peer_gone(exc, lost=0)
                return
            self.backlog.popleft()
            self._counters["relay_sent"] += 1
        self._stop_waiting()

    def _peer_gone(self, exc: OSError, *, lost: int) -> None:
        # ECONNREFUSED/ENOENT: that worker exited (its viewers are gone with it); a
        # replacement binds the path again and the next frame reconnects.
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTCONN):
            log.warning("relay to %s failed: %s", self.path, exc)
        self._counters["drop_relay_no_peer"] += lost + len(self.backlog)
        self.close()
