# C declarations of the POSIX/Linux socket API the fan-out sends with (and the load-test
# receiver reads with). Cython ships <sys/uio.h> (iovec) and <time.h> (clock_gettime) in
# posix.*; the socket calls, in particular Linux's sendmmsg(2), and ancillary data
# (cmsg(3)) are declared here.
from posix.uio cimport iovec


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t

    cdef struct sockaddr:
        sa_family_t sa_family

    cdef struct sockaddr_storage:
        sa_family_t ss_family

    cdef struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags

    # Linux sendmmsg(2): one system call for a whole batch of datagrams, each with
    # its own destination (msg_name); msg_len is filled with the bytes sent.
    cdef struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len

    enum: AF_INET
    enum: AF_INET6
    enum: SOCK_DGRAM
    enum: SOL_SOCKET
    enum: SO_TYPE
    enum: MSG_DONTWAIT

    # Ancillary data (cmsg(3)): a msghdr's msg_control is a sequence of these headers,
    # each followed by its data, aligned as the CMSG_* macros compute.
    cdef struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type

    cmsghdr* CMSG_FIRSTHDR(msghdr* message)
    cmsghdr* CMSG_NXTHDR(msghdr* message, cmsghdr* header)
    unsigned char* CMSG_DATA(cmsghdr* header)
    size_t CMSG_SPACE(size_t length)
    size_t CMSG_LEN(size_t length)

    int sendmmsg(int sockfd, mmsghdr* msgvec, unsigned int vlen, int flags)
    int getsockname(int sockfd, sockaddr* addr, socklen_t* addrlen)
    int getsockopt(int sockfd, int level, int optname, void* optval, socklen_t* optlen)
    int setsockopt(int sockfd, int level, int optname, const void* optval, socklen_t optlen)


cdef extern from "<netinet/in.h>" nogil:
    ctypedef unsigned short in_port_t

    cdef struct in_addr:
        unsigned int s_addr

    cdef struct sockaddr_in:
        sa_family_t sin_family
        in_port_t sin_port
        in_addr sin_addr

    cdef struct in6_addr:
        unsigned char s6_addr[16]

    cdef struct sockaddr_in6:
        sa_family_t sin6_family
        in_port_t sin6_port
        unsigned int sin6_flowinfo
        in6_addr sin6_addr
        unsigned int sin6_scope_id

    unsigned short htons(unsigned short hostshort)

    enum: IPPROTO_IP
    enum: IPPROTO_IPV6

    # ip(7) IP_PKTINFO / ipv6(7) IPV6_PKTINFO (RFC 3542 §6.1): as a control message on
    # send, the source address (ipi_spec_dst / ipi6_addr) and interface of the datagram;
    # on receive, the address it was sent to (ipi_addr / ipi6_addr). glibc declares both
    # structs under _GNU_SOURCE, which Python.h defines.
    enum: IP_PKTINFO
    enum: IPV6_PKTINFO

    cdef struct in_pktinfo:
        int ipi_ifindex
        in_addr ipi_spec_dst
        in_addr ipi_addr

    cdef struct in6_pktinfo:
        in6_addr ipi6_addr
        unsigned int ipi6_ifindex


cdef extern from "<netinet/udp.h>" nogil:
    # udp(7) UDP_SEGMENT (Linux 4.18, "UDP GSO"): as a SOL_UDP control message on send,
    # a uint16_t segment size; the kernel cuts the datagram's payload into datagrams of
    # that size (the last may be shorter), walking the UDP/IP stack once for all of
    # them. UDP_GRO (Linux 5.0): a receiving socket may get such a run coalesced, with
    # the segment size in a SOL_UDP/UDP_GRO control message (an int).
    enum: SOL_UDP
    enum: UDP_SEGMENT
    enum: UDP_GRO


cdef extern from "<errno.h>" nogil:
    int errno
    enum: EAGAIN
    enum: ENOBUFS
    enum: EINTR
    enum: EIO
    enum: EINVAL
    enum: EMSGSIZE
    enum: EOPNOTSUPP
    enum: ENOPROTOOPT
