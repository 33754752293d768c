"""How datagrams leave (send / send_from / default source).

``local`` is the address of ours a datagram reached, known when the worker's socket is
bound to a wildcard address (IP_PKTINFO): a session remembers the one its selected pair
uses, and every reply, DTLS flight, RTCP packet and fan-out datagram to that peer leaves
from it, because peers accept only datagrams from the transport address they checked
(RFC 8445 §4, §7.2.5.2.1). The I/O driver (transport.py) supplies the three functions.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from whepfan.media.session import Address

SendDatagram = Callable[[bytes, Address], None]
# (datagram, peer address, our source address): send from that address of this host.
SendDatagramFrom = Callable[[bytes, Address, str], None]
# (peer address) -> the source address the kernel's routing would give a datagram to it.
DefaultSource = Callable[[Address], str | None]


class Sender:
    """Sends the worker's Python-side datagrams (STUN, DTLS, RTCP) and decides the
    source address the fan-out sets for each viewer."""

    def __init__(
        self,
        *,
        send: SendDatagram,
        send_from: SendDatagramFrom | None = None,
        default_source: DefaultSource | None = None,
    ) -> None:
        self.send = send
        self.send_from = send_from
        self.default_source = default_source

    def transmit(self, datagram: bytes, addr: Address, local: str | None) -> None:
        """Send ``datagram`` to ``addr`` from our address ``local`` when one is known."""
        if local is not None and self.send_from is not None:
            self.send_from(datagram, addr, local)
        else:
            self.send(datagram, addr)

    def fanout_source(self, local: str | None, peer: Address) -> str | None:
        """The source the fan-out must set on every datagram to ``peer``: ``local`` only
        when the kernel would choose another. A source costs the kernel a control message
        per datagram (~5 % of a send, measured); on a host with one address per route,
        which is most, the kernel's choice already is the address the viewer reached."""
        if local is None or self.default_source is None:
            return local
        chosen = self.default_source(peer)
        return None if chosen is not None and same_address(chosen, local) else local


def same_address(a: str, b: str) -> bool:
    """The same IP address, however written (``::ffff:127.0.0.1`` vs ``127.0.0.1`` are not:
    the socket family differs, so they are never compared here)."""
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b  # a scoped (link-local) address: compare as written
