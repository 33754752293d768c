# Receiver: the load-test receive side (whepfan loadtest, issue 7).
#
# Theory of operation
# -------------------
# Each simulated viewer owns one UDP socket, as a browser's peer connection does: the
# server sends each viewer's media to the address that viewer's ICE checks came from,
# and a server like whepfan sends every viewer's media from one port, so the socket is
# what tells viewers apart. A socket is read in one of two ways:
#
# - watched: registered in one epoll set; asyncio watches the epoll fd, and drain()
#   empties every ready socket. Used while ICE and DTLS run, where a few milliseconds
#   of waiting would show in the join latencies measured.
# - polled (set_polled, once a viewer is connected): out of the epoll set; poll(), called
#   on a timer, sweeps every polled socket. On loopback the kernel delivers each datagram
#   in the *sender's* context, and a socket with a waiter (an epoll entry) makes that
#   sender run the wake-up too (sock_def_readable -> ep_poll_callback -> try_to_wake_up).
#   Profiling whepfan serving 800 watched viewers put 13 % of the server's CPU there, a
#   cost no real viewer across a network imposes on a server. A polled socket has no
#   waiter, so the server pays only the delivery itself, as the loopback limit
#   (whepfan calibrate) does.
#
# Either way, every datagram's arrival time is the kernel's receive timestamp
# (socket(7) SO_TIMESTAMPNS), not the time we got round to reading it, so jitter and
# first-frame times do not depend on the poll interval; and the socket's drop count
# (SO_RXQ_OVFL) tells loss in our own receive buffer apart from loss upstream.
# Each socket is emptied with batched recvmmsg(2) in one nogil loop:
#
#   first byte (RFC 7983 §7)    what happens
#   128..191, RTCP PT (RFC 5761 §4)   counted and dropped (whepfan's viewers only listen)
#   128..191, RTP               counted from the clear header: per-SSRC extended sequence
#                               numbers (RFC 3550 §A.1), a 64-packet duplicate window,
#                               interarrival jitter (RFC 3550 §6.4.1); then SRTP-unprotected
#                               in place: every packet until the first keyframe, then one
#                               in verify_every (all when 1). Failures are counters.
#   anything else (STUN, DTLS)  copied out and returned to Python, which runs ICE and DTLS
#
# Per viewer everything is one C struct (SRTP context by value, payload-type table,
# streams, counters); nothing is allocated per packet and no Python object is made for
# media. Not thread-safe: one event loop thread calls every method.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, timespec
from posix.uio cimport iovec

from whepfan.includes.system cimport (
    AF_INET,
    AF_INET6,
    CMSG_DATA,
    CMSG_FIRSTHDR,
    CMSG_NXTHDR,
    MSG_DONTWAIT,
    cmsghdr,
    errno,
    mmsghdr,
    sockaddr_in,
    sockaddr_in6,
)
from whepfan.includes.system cimport SOL_SOCKET, SOL_UDP, UDP_GRO
from whepfan.includes.recv cimport (
    SCM_TIMESTAMPNS,
    SO_RXQ_OVFL,
    SO_TIMESTAMPNS,
    setsockopt,
    EPOLL_CLOEXEC,
    EPOLL_CTL_ADD,
    EPOLL_CTL_DEL,
    EPOLLIN,
    INET6_ADDRSTRLEN,
    epoll_create1,
    epoll_ctl,
    epoll_event,
    epoll_wait,
    inet_ntop,
    ntohs,
    recvmmsg,
)
from whepfan.includes.recv cimport close as close_fd


cdef enum RxKind:
    RX_KIND_UNKNOWN = 0
    RX_KIND_AUDIO = 1
    RX_KIND_VP8 = 2
    RX_KIND_H264 = 3
    RX_KIND_VIDEO = 4                # another video codec: counted, no keyframe inspection


cdef inline double rx_monotonic() noexcept nogil:
    # CLOCK_MONOTONIC is Python's time.monotonic() on Linux: Python compares against it.
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    return now.tv_sec + now.tv_nsec * 1e-9


cdef inline double rx_realtime_to_monotonic() noexcept nogil:
    # SO_TIMESTAMPNS stamps CLOCK_REALTIME; the counters are kept on CLOCK_MONOTONIC.
    # The offset is read once per drain/poll: a step of the wall clock in between moves
    # the stamps of one batch, nothing more.
    cdef timespec real, monotonic
    clock_gettime(CLOCK_REALTIME, &real)
    clock_gettime(CLOCK_MONOTONIC, &monotonic)
    return (monotonic.tv_sec - real.tv_sec) + (monotonic.tv_nsec - real.tv_nsec) * 1e-9


cdef inline uint16_t rx_load16(const uint8_t* p) noexcept nogil:
    return (<uint16_t>p[0] << 8) | p[1]


cdef inline uint32_t rx_load32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef int rx_payload_offset(const uint8_t* packet, int length) noexcept nogil:
    """Start of the RTP payload (RFC 3550 §5.1 CSRCs, §5.3.1 extension), or -1."""
    cdef int offset = 12 + 4 * (packet[0] & 0x0F)
    if offset > length:
        return -1
    if packet[0] & 0x10:
        if offset + 4 > length:
            return -1
        offset += 4 + 4 * rx_load16(packet + offset + 2)
        if offset > length:
            return -1
    return offset


cdef int rx_vp8_keyframe(const uint8_t* payload, int length) noexcept nogil:
    """RFC 7741 §4.2/§4.3: S=1, PID=0, then the VP8 frame tag's P bit clear (RFC 6386 §9.1)."""
    cdef int offset = 1
    cdef uint8_t extension
    if length < 1 or not (payload[0] & 0x10) or (payload[0] & 0x07):
        return 0
    if payload[0] & 0x80:
        if length < 2:
            return 0
        extension = payload[1]
        offset = 2
        if extension & 0x80:
            if offset >= length:
                return 0
            offset += 2 if payload[offset] & 0x80 else 1
        if extension & 0x40:
            offset += 1
        if extension & 0x30:
            offset += 1
    return offset < length and not (payload[offset] & 0x01)


cdef inline int rx_h264_key_nal(uint8_t nal_type) noexcept nogil:
    # IDR slice (5) or SPS (7): where a decoder can start (RFC 6184 §8.4 / H.264 §7.4.1.2).
    return nal_type == 5 or nal_type == 7


cdef int rx_h264_keyframe(const uint8_t* payload, int length) noexcept nogil:
    """RFC 6184: a key NAL unit alone (§5.6), in a STAP-A (§5.7.1) or starting an FU-A (§5.8)."""
    cdef uint8_t nal_type
    cdef int offset, size
    if length < 1:
        return 0
    nal_type = payload[0] & 0x1F
    if nal_type == 24:
        offset = 1
        while offset + 3 <= length:
            size = rx_load16(payload + offset)
            if rx_h264_key_nal(payload[offset + 2] & 0x1F):
                return 1
            offset += 2 + size
        return 0
    if nal_type == 28:
        return length >= 2 and (payload[1] & 0x80) != 0 and rx_h264_key_nal(payload[1] & 0x1F)
    return rx_h264_key_nal(nal_type)


cdef RxStream* rx_stream(RxViewer* viewer, uint32_t ssrc, uint8_t payload_type) noexcept nogil:
    cdef int index
    cdef RxStream* stream
    for index in range(RX_MAX_STREAMS):
        if viewer.streams[index].in_use and viewer.streams[index].ssrc == ssrc:
            return &viewer.streams[index]
    for index in range(RX_MAX_STREAMS):
        stream = &viewer.streams[index]
        if not stream.in_use:
            memset(stream, 0, sizeof(RxStream))
            stream.in_use = 1
            stream.ssrc = ssrc
            stream.kind = viewer.pt_kind[payload_type]
            stream.clock_rate = viewer.pt_clock[payload_type] or 90000
            return stream
    return NULL


cdef int rx_count(RxStream* stream, uint16_t seq, uint32_t timestamp, double now) noexcept nogil:
    """Sequence bookkeeping (RFC 3550 §A.1, with a duplicate window); 1 for a duplicate."""
    cdef int64_t extended
    cdef int delta, back
    cdef uint32_t transit
    cdef int32_t difference
    if stream.packets == 0 and stream.duplicates == 0:
        stream.base_seq = stream.highest_seq = seq
        stream.window = 1
        stream.packets = 1
    else:
        delta = <int16_t>(<uint16_t>(seq - <uint16_t>(stream.highest_seq & 0xFFFF)))
        if delta == 0:
            stream.duplicates += 1
            return 1
        if delta > 0:
            stream.window = 1 if delta >= RX_DUPLICATE_WINDOW else (stream.window << delta) | 1
            stream.highest_seq += delta
            stream.packets += 1
        else:
            back = -delta
            if back >= RX_DUPLICATE_WINDOW:
                stream.late += 1
                stream.packets += 1
            elif stream.window & (<uint64_t>1 << back):
                stream.duplicates += 1
                return 1
            else:
                stream.window |= <uint64_t>1 << back
                stream.packets += 1
            if stream.highest_seq - back < stream.base_seq:
                stream.base_seq = stream.highest_seq - back
            return 0
    # RFC 3550 §6.4.1: D = (Rj - Ri) - (Sj - Si) in timestamp units, J += (|D| - J) / 16;
    # transit times are taken modulo 2^32 so the RTP timestamp may wrap.
    transit = <uint32_t>(<int64_t>(now * stream.clock_rate)) - timestamp
    if stream.has_transit:
        difference = <int32_t>(transit - stream.last_transit)
        if difference < 0:
            difference = -difference
        stream.jitter += (difference - stream.jitter) / 16.0
    stream.last_transit = transit
    stream.has_transit = 1
    return 0


cdef class Receiver:
    """Batched receive path for many load-test viewers; see the theory of operation above.

    ``verify_every`` K: after a viewer's first keyframe, only every K-th RTP packet is
    SRTP-unprotected (all are counted). The sockets stay the caller's: the Receiver
    never closes them (it does turn on SO_TIMESTAMPNS and SO_RXQ_OVFL on them).
    """

    cdef int epfd
    cdef int max_viewers
    cdef int batch_size
    cdef int verify_every
    cdef RxViewer* viewers
    cdef uint8_t* buffers
    cdef mmsghdr* messages
    cdef iovec* vectors
    cdef sockaddr_in6* sources
    cdef uint8_t* ancillary
    cdef epoll_event* events
    cdef uint8_t* control_data
    cdef int* control_length
    cdef int* control_viewer
    cdef sockaddr_in6* control_source
    cdef int control_count
    cdef uint64_t recv_calls
    cdef uint64_t drains
    cdef uint64_t polls
    cdef int sweep_next              # the polled sweep resumes here after a full stop
    cdef bint gro                    # ask each socket for UDP_GRO (udp(7))
    cdef int slot_size               # receive buffer per message: one datagram or a GRO run
    cdef int gro_sockets             # sockets that accepted UDP_GRO
    cdef double clock_offset         # CLOCK_MONOTONIC - CLOCK_REALTIME, this drain/poll

    def __cinit__(self, *, int max_viewers=4096, int batch_size=64, int verify_every=1,
                  bint gro=False):
        cdef int index
        self.epfd = -1
        if max_viewers < 1 or not 1 <= batch_size <= 1024 or verify_every < 1:
            raise ValueError("max_viewers >= 1, batch_size 1..1024 and verify_every >= 1")
        self.max_viewers = max_viewers
        self.batch_size = batch_size
        self.verify_every = verify_every
        self.gro = gro
        self.slot_size = RX_GRO_SLOT_SIZE if gro else RX_SLOT_SIZE
        self.viewers = <RxViewer*>calloc(max_viewers, sizeof(RxViewer))
        self.buffers = <uint8_t*>malloc(<size_t>batch_size * self.slot_size)
        self.messages = <mmsghdr*>calloc(batch_size, sizeof(mmsghdr))
        self.vectors = <iovec*>calloc(batch_size, sizeof(iovec))
        self.sources = <sockaddr_in6*>calloc(batch_size, sizeof(sockaddr_in6))
        self.ancillary = <uint8_t*>calloc(batch_size, RX_ANCILLARY_SIZE)
        self.events = <epoll_event*>calloc(RX_MAX_EVENTS, sizeof(epoll_event))
        self.control_data = <uint8_t*>malloc(RX_CONTROL_SLOTS * RX_SLOT_SIZE)
        self.control_length = <int*>calloc(RX_CONTROL_SLOTS, sizeof(int))
        self.control_viewer = <int*>calloc(RX_CONTROL_SLOTS, sizeof(int))
        self.control_source = <sockaddr_in6*>calloc(RX_CONTROL_SLOTS, sizeof(sockaddr_in6))
        if (self.viewers == NULL or self.buffers == NULL or self.messages == NULL
                or self.vectors == NULL or self.sources == NULL or self.ancillary == NULL
                or self.events == NULL
                or self.control_data == NULL or self.control_length == NULL
                or self.control_viewer == NULL or self.control_source == NULL):
            raise MemoryError()
        for index in range(batch_size):
            self.vectors[index].iov_base = self.buffers + <size_t>index * self.slot_size
            self.vectors[index].iov_len = self.slot_size
            self.messages[index].msg_hdr.msg_iov = &self.vectors[index]
            self.messages[index].msg_hdr.msg_iovlen = 1
            self.messages[index].msg_hdr.msg_name = &self.sources[index]
            self.messages[index].msg_hdr.msg_control = self.ancillary + index * RX_ANCILLARY_SIZE
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, "epoll_create1 failed")

    def __dealloc__(self):
        cdef int index
        if self.viewers != NULL:
            for index in range(self.max_viewers):
                if self.viewers[index].in_use:
                    srtp_ctx_clear(&self.viewers[index].srtp)
            free(self.viewers)
        free(self.buffers)
        free(self.messages)
        free(self.vectors)
        free(self.sources)
        free(self.ancillary)
        free(self.events)
        free(self.control_data)
        free(self.control_length)
        free(self.control_viewer)
        free(self.control_source)
        if self.epfd >= 0:
            close_fd(self.epfd)

    cdef RxViewer* _viewer(self, int viewer) except NULL:
        if not 0 <= viewer < self.max_viewers or not self.viewers[viewer].in_use:
            raise KeyError(f"no viewer {viewer}")
        return &self.viewers[viewer]

    def fileno(self) -> int:
        """The epoll fd: readable when any viewer socket is (for ``loop.add_reader``)."""
        return self.epfd

    def add_viewer(self, int fd) -> int:
        """Watch a bound, non-blocking UDP socket; returns the viewer id."""
        cdef int index, enable = 1
        cdef epoll_event event
        for index in range(self.max_viewers):
            if not self.viewers[index].in_use:
                break
        else:
            raise ValueError(f"all {self.max_viewers} viewer slots in use")
        memset(&event, 0, sizeof(epoll_event))
        event.events = EPOLLIN
        event.data.u32 = index
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &event) != 0:
            raise OSError(errno, "epoll_ctl(ADD) failed")
        # Without these (not Linux, or refused) arrival times fall back to the time of
        # reading and socket_drops stays 0.
        setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &enable, sizeof(int))
        setsockopt(fd, SOL_SOCKET, SO_RXQ_OVFL, &enable, sizeof(int))
        # udp(7) UDP_GRO (Linux 5.0): a run of datagrams of one sender (a GSO entry on
        # loopback, a NIC's GRO otherwise) arrives as one read with its segment size in a
        # control message; counted per datagram all the same (_read_socket splits it).
        if self.gro and setsockopt(fd, SOL_UDP, UDP_GRO, &enable, sizeof(int)) == 0:
            self.gro_sockets += 1
        memset(&self.viewers[index], 0, sizeof(RxViewer))
        self.viewers[index].fd = fd
        self.viewers[index].in_use = 1
        return index

    def remove_viewer(self, int viewer) -> None:
        cdef RxViewer* slot = self._viewer(viewer)
        if not slot.polled:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, slot.fd, NULL)
        srtp_ctx_clear(&slot.srtp)
        slot.in_use = 0
        slot.polled = 0

    def set_polled(self, int viewer, bint polled) -> None:
        """Polled: out of the epoll set, read only by ``poll()`` (see the theory of
        operation); not polled: watched through the epoll fd again."""
        cdef RxViewer* slot = self._viewer(viewer)
        cdef epoll_event event
        if polled == slot.polled:
            return
        if polled:
            if epoll_ctl(self.epfd, EPOLL_CTL_DEL, slot.fd, NULL) != 0:
                raise OSError(errno, "epoll_ctl(DEL) failed")
        else:
            memset(&event, 0, sizeof(epoll_event))
            event.events = EPOLLIN
            event.data.u32 = viewer
            if epoll_ctl(self.epfd, EPOLL_CTL_ADD, slot.fd, &event) != 0:
                raise OSError(errno, "epoll_ctl(ADD) failed")
        slot.polled = polled

    def set_payload_type(self, int viewer, int payload_type, *, str kind, int clock_rate) -> None:
        """What ``payload_type`` carries for this viewer: kind "audio", "vp8", "h264" or
        "video" (another video codec), and its RTP clock rate (for jitter)."""
        cdef RxViewer* slot = self._viewer(viewer)
        kinds = {"audio": RX_KIND_AUDIO, "vp8": RX_KIND_VP8, "h264": RX_KIND_H264,
                 "video": RX_KIND_VIDEO}
        if not 0 <= payload_type < 128 or kind not in kinds or clock_rate <= 0:
            raise ValueError("payload type 0..127, kind audio/vp8/h264/video, clock rate > 0")
        slot.pt_kind[payload_type] = kinds[kind]
        slot.pt_clock[payload_type] = clock_rate
        if kind != "audio":
            slot.has_video = 1

    def set_keys(self, int viewer, *, int profile, bytes key not None, bytes salt not None) -> None:
        """The server's SRTP master key and salt (RFC 5764 §4.2): decryption starts."""
        cdef RxViewer* slot = self._viewer(viewer)
        cdef int key_len, salt_len
        key_len, salt_len = profile_key_lengths(profile)
        if len(key) != key_len or len(salt) != salt_len:
            raise ValueError("key or salt length does not match the profile")
        srtp_ctx_clear(&slot.srtp)
        if srtp_ctx_init(&slot.srtp, profile, <const uint8_t*>PyBytes_AS_STRING(key), key_len,
                         <const uint8_t*>PyBytes_AS_STRING(salt), salt_len) != 0:
            raise SrtpError("crypto")
        slot.keyed = 1

    cdef void _media(self, RxViewer* viewer, uint8_t* packet, int length,
                     double now) noexcept nogil:
        cdef uint8_t payload_type
        cdef RxStream* stream
        cdef int rc, offset, kind
        if length >= 2 and 64 <= (packet[1] & 0x7F) <= 95:
            viewer.rtcp_packets += 1
            return
        if length < 12 or (packet[0] >> 6) != 2:
            viewer.malformed += 1
            return
        viewer.packets += 1
        viewer.bytes += length
        if viewer.first_rtp_at == 0:
            viewer.first_rtp_at = now
        viewer.last_rtp_at = now
        payload_type = packet[1] & 0x7F
        stream = rx_stream(viewer, rx_load32(packet + 8), payload_type)
        if stream == NULL:
            viewer.other_streams += 1
        elif rx_count(stream, rx_load16(packet + 2), rx_load32(packet + 4), now):
            return   # a duplicate would only fail the SRTP replay check
        if not viewer.keyed:
            viewer.unkeyed += 1
            return
        if viewer.first_keyframe_at != 0 or not viewer.has_video:
            viewer.sample_counter += 1
            if viewer.sample_counter % self.verify_every:
                return
        rc = srtp_unprotect_rtp(&viewer.srtp, packet, length)
        if rc == SRTP_ERR_REPLAY:
            viewer.replayed += 1
            return
        if rc < 0:
            viewer.decrypt_failures += 1
            return
        viewer.decrypted += 1
        if viewer.first_keyframe_at == 0:
            kind = viewer.pt_kind[payload_type]
            if kind == RX_KIND_VP8 or kind == RX_KIND_H264:
                offset = rx_payload_offset(packet, rc)
                if offset >= 0 and (
                    rx_vp8_keyframe(packet + offset, rc - offset) if kind == RX_KIND_VP8
                    else rx_h264_keyframe(packet + offset, rc - offset)
                ):
                    viewer.first_keyframe_at = now

    cdef void _control(self, int index, RxViewer* viewer, const uint8_t* data, int length,
                       const sockaddr_in6* source) noexcept nogil:
        cdef int slot
        if self.control_count >= RX_CONTROL_SLOTS or length > RX_SLOT_SIZE:
            viewer.control_dropped += 1
            return
        slot = self.control_count
        self.control_count += 1
        memcpy(self.control_data + slot * RX_SLOT_SIZE, data, length)
        self.control_length[slot] = length
        self.control_viewer[slot] = index
        memcpy(&self.control_source[slot], source, sizeof(sockaddr_in6))
        viewer.control_packets += 1

    cdef double _arrival(self, mmsghdr* message, RxViewer* viewer,
                         double read_at, int* segment_size) noexcept nogil:
        """The kernel's receive time of ``message`` on CLOCK_MONOTONIC (``read_at`` when
        it carries none); records the socket's drop count on the way, and sets
        ``segment_size`` to the UDP_GRO segment size if the read is a coalesced run."""
        cdef cmsghdr* header = CMSG_FIRSTHDR(&message.msg_hdr)
        cdef timespec* stamp
        cdef uint32_t drops
        cdef int gso_size
        cdef double arrival = read_at
        while header != NULL:
            if header.cmsg_level == SOL_UDP and header.cmsg_type == UDP_GRO:
                memcpy(&gso_size, CMSG_DATA(header), sizeof(int))
                if gso_size > 0:
                    segment_size[0] = gso_size
            elif header.cmsg_level == SOL_SOCKET:
                if header.cmsg_type == SCM_TIMESTAMPNS:
                    stamp = <timespec*>CMSG_DATA(header)
                    arrival = stamp.tv_sec + stamp.tv_nsec * 1e-9 + self.clock_offset
                elif header.cmsg_type == SO_RXQ_OVFL:
                    memcpy(&drops, CMSG_DATA(header), sizeof(uint32_t))
                    viewer.socket_drops = drops
            header = CMSG_NXTHDR(&message.msg_hdr, header)
        return arrival

    cdef int _read_socket(self, int index, RxViewer* viewer) noexcept nogil:
        """Empties one socket (up to RX_BATCHES_PER_SOCKET batches, for fairness).
        Returns 1 when the control slots are full: the caller stops, the rest stays queued
        for the next drain/poll."""
        cdef int batch, received, message, length, segment_size, offset, part
        cdef uint8_t* data
        cdef double read_at, arrival
        for batch in range(RX_BATCHES_PER_SOCKET):
            if self.control_count >= RX_CONTROL_SLOTS:
                return 1
            for message in range(self.batch_size):
                self.messages[message].msg_hdr.msg_namelen = sizeof(sockaddr_in6)
                self.messages[message].msg_hdr.msg_controllen = RX_ANCILLARY_SIZE
            received = recvmmsg(viewer.fd, self.messages, self.batch_size, MSG_DONTWAIT, NULL)
            self.recv_calls += 1
            if received <= 0:
                return 0
            read_at = rx_monotonic()
            for message in range(received):
                data = self.buffers + <size_t>message * self.slot_size
                length = self.messages[message].msg_len
                segment_size = length
                arrival = self._arrival(&self.messages[message], viewer, read_at, &segment_size)
                if segment_size <= 0 or segment_size > length:
                    segment_size = length
                if segment_size < length:
                    viewer.coalesced_reads += 1
                # A GRO run is datagrams of segment_size bytes, the last maybe shorter
                # (udp(7)): each is counted and checked as if read on its own.
                offset = 0
                while offset < length:
                    part = min(segment_size, length - offset)
                    if 128 <= data[offset] <= 191:
                        self._media(viewer, data + offset, part, arrival)
                    else:
                        self._control(index, viewer, data + offset, part, &self.sources[message])
                    offset += part
            if received < self.batch_size:
                return 0
        return 0

    cdef void _drain(self) noexcept nogil:
        cdef int ready, event_index, index
        ready = epoll_wait(self.epfd, self.events, RX_MAX_EVENTS, 0)
        for event_index in range(ready if ready > 0 else 0):
            index = self.events[event_index].data.u32
            if index >= self.max_viewers or not self.viewers[index].in_use:
                continue
            # epoll is level-triggered: what a full stop leaves queued comes back next time.
            if self._read_socket(index, &self.viewers[index]):
                return

    cdef void _sweep(self) noexcept nogil:
        cdef int step, index
        for step in range(self.max_viewers):
            index = (self.sweep_next + step) % self.max_viewers
            if self.viewers[index].in_use and self.viewers[index].polled:
                if self._read_socket(index, &self.viewers[index]):
                    self.sweep_next = index  # start there next time: no socket starves
                    return
        self.sweep_next = 0

    cdef list _take_control(self):
        cdef int slot
        cdef char text[INET6_ADDRSTRLEN]
        cdef sockaddr_in6* source
        cdef sockaddr_in* source4
        result = []
        for slot in range(self.control_count):
            source = &self.control_source[slot]
            if source.sin6_family == AF_INET:
                source4 = <sockaddr_in*>source
                inet_ntop(AF_INET, &source4.sin_addr, text, INET6_ADDRSTRLEN)
                address = (text.decode(), ntohs(source4.sin_port))
            else:
                inet_ntop(AF_INET6, &source.sin6_addr, text, INET6_ADDRSTRLEN)
                address = (text.decode(), ntohs(source.sin6_port))
            result.append((
                self.control_viewer[slot],
                PyBytes_FromStringAndSize(<char*>self.control_data + slot * RX_SLOT_SIZE,
                                          self.control_length[slot]),
                address,
            ))
        self.control_count = 0
        return result

    def drain(self) -> list:
        """Read every ready watched socket; returns the non-media datagrams (STUN, DTLS)
        as ``(viewer, data, (host, port))`` for Python's ICE and DTLS."""
        self.control_count = 0
        with nogil:
            self.clock_offset = rx_realtime_to_monotonic()
            self._drain()
        self.drains += 1
        return self._take_control()

    def poll(self) -> list:
        """Read every polled socket (call it on a timer); returns what ``drain()`` does."""
        self.control_count = 0
        with nogil:
            self.clock_offset = rx_realtime_to_monotonic()
            self._sweep()
        self.polls += 1
        return self._take_control()

    def viewer_stats(self, int viewer) -> dict:
        cdef RxViewer* slot = self._viewer(viewer)
        cdef RxStream* stream
        cdef int index
        cdef int64_t expected = 0, unique = 0
        cdef uint64_t duplicates = 0, late = 0
        audio_jitter = 0.0
        video_jitter = 0.0
        streams = 0
        for index in range(RX_MAX_STREAMS):
            stream = &slot.streams[index]
            if not stream.in_use:
                continue
            streams += 1
            expected += stream.highest_seq - stream.base_seq + 1
            unique += stream.packets
            duplicates += stream.duplicates
            late += stream.late
            jitter_ms = stream.jitter * 1000.0 / stream.clock_rate
            if stream.kind == RX_KIND_AUDIO:
                audio_jitter = max(audio_jitter, jitter_ms)
            else:
                video_jitter = max(video_jitter, jitter_ms)
        return {
            "packets": slot.packets,
            "bytes": slot.bytes,
            "expected": expected,
            "lost": max(0, expected - unique),
            "duplicates": duplicates,
            "late": late,
            "rtcp_packets": slot.rtcp_packets,
            "control_packets": slot.control_packets,
            "control_dropped": slot.control_dropped,
            "decrypted": slot.decrypted,
            "decrypt_failures": slot.decrypt_failures,
            "replayed": slot.replayed,
            "unkeyed": slot.unkeyed,
            "malformed": slot.malformed,
            "other_streams": slot.other_streams,
            "coalesced_reads": slot.coalesced_reads,
            "socket_drops": slot.socket_drops,
            "streams": streams,
            "audio_jitter_ms": audio_jitter,
            "video_jitter_ms": video_jitter,
            "first_rtp_at": slot.first_rtp_at or None,
            "first_keyframe_at": slot.first_keyframe_at or None,
            "last_rtp_at": slot.last_rtp_at or None,
        }

    def stats(self) -> dict:
        return {"recv_calls": self.recv_calls, "drains": self.drains, "polls": self.polls,
                "gro_sockets": self.gro_sockets}
