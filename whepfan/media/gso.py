"""UDP GSO (udp(7) UDP_SEGMENT, Linux 4.18) for the fan-out: detected once at start-up.

With GSO, one ``sendmmsg`` entry carries a viewer's whole run of equal-size packets and
the kernel walks its UDP/IP stack once for the run instead of once per datagram
(``Fanout.push_batch``, DESIGN.md §4). Whether a worker's socket can use it is a property
of the kernel and of the socket's options, so it is checked on the worker's own socket:

1. ``setsockopt(SOL_UDP, UDP_SEGMENT)``: the kernel knows the option (else ENOPROTOOPT);
2. a probe: the socket sends one two-segment GSO datagram to a throwaway socket on the
   loopback address of its family, which must receive two datagrams of the segment size.

A path that still refuses GSO later (a NIC without checksum offload answers EIO; an
IPsec route too) is caught by the Fanout itself, which re-sends that entry one datagram
per entry and turns GSO off (``Fanout.gso_error``); the worker logs it once.

``--gso on|off|auto``: ``auto`` (default) uses GSO where the probe succeeds and logs once
where it does not; ``on`` makes a failing probe a start-up error; ``off`` never uses it.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct

from whepfan.settings import SettingsError

log = logging.getLogger("whepfan.media.gso")

SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)  # <netinet/udp.h>; Python 3.11 lacks it
UDP_GRO = getattr(socket, "UDP_GRO", 104)
MODES = ("auto", "on", "off")
PROBE_SEGMENT = 64
PROBE_TIMEOUT = 1.0  # loopback delivery happens within the send call; this is slack


class GsoUnavailable(SettingsError):
    """``--gso on`` on a socket whose kernel or options refuse UDP GSO (the CLI prints it
    with the usage, as for any setting that cannot be honoured)."""


def kernel_supports_gso() -> bool:
    """The running kernel knows UDP_SEGMENT (checked on a fresh, unbound UDP socket)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.setsockopt(SOL_UDP, UDP_SEGMENT, 0)
        except OSError:
            return False
    return True


def probe(sock: socket.socket) -> str | None:
    """None if ``sock`` (a bound UDP socket) can send UDP GSO datagrams, else why not."""
    try:
        sock.setsockopt(SOL_UDP, UDP_SEGMENT, 0)  # 0: no socket-wide default segment size
    except OSError as exc:
        return f"setsockopt(UDP_SEGMENT): {os.strerror(exc.errno or errno.ENOPROTOOPT)}"
    family = sock.family
    loopback = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    with socket.socket(family, socket.SOCK_DGRAM) as receiver:
        try:
            receiver.bind((loopback, 0))
        except OSError as exc:
            return f"no loopback {loopback} to probe with: {exc.strerror}"
        receiver.settimeout(PROBE_TIMEOUT)
        destination = receiver.getsockname()[:2]
        control = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", PROBE_SEGMENT))]
        try:
            sent = sock.sendmsg([b"\x00" * (2 * PROBE_SEGMENT)], control, 0, destination)
        except BlockingIOError:
            return "probe send found the socket buffer full"
        except OSError as exc:
            return f"probe send refused: {os.strerror(exc.errno or errno.EIO)}"
        if sent != 2 * PROBE_SEGMENT:
            return f"probe send took {sent} of {2 * PROBE_SEGMENT} bytes"
        sizes = []
        try:
            for _ in range(2):
                sizes.append(len(receiver.recv(4 * PROBE_SEGMENT)))
        except OSError:
            pass
        if sizes != [PROBE_SEGMENT, PROBE_SEGMENT]:
            return f"probe arrived as datagrams of {sizes} bytes, not 2 x {PROBE_SEGMENT}"
    return None


def resolve(mode: str, sock: socket.socket) -> bool:
    """Whether the fan-out on ``sock`` uses GSO under ``--gso mode``."""
    if mode not in MODES:
        raise ValueError(f"--gso is one of {', '.join(MODES)}, not {mode!r}")
    if mode == "off":
        return False
    reason = probe(sock)
    if reason is None:
        return True
    if mode == "on":
        raise GsoUnavailable(
            f"UDP GSO is unavailable on this socket: {reason}; use --gso auto or off",
            option="gso",
        )
    log.warning("UDP GSO unavailable (%s): the fan-out sends one datagram per entry", reason)
    return False


def send_path(gso_enabled: bool) -> str:
    """The metric label for a worker's send path."""
    return "gso" if gso_enabled else "sendmmsg"
