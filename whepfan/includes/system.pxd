# C declarations of the POSIX/Linux socket API the fan-out sends with.
# Cython ships <sys/uio.h> (iovec) and <time.h> (clock_gettime) in posix.*; the
# socket calls, in particular Linux's sendmmsg(2), are declared here.
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

    int sendmmsg(int sockfd, mmsghdr* msgvec, unsigned int vlen, int flags)
    int getsockname(int sockfd, sockaddr* addr, socklen_t* addrlen)
    int getsockopt(int sockfd, int level, int optname, void* optval, socklen_t* optlen)


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


cdef extern from "<errno.h>" nogil:
    int errno
    enum: EAGAIN
    enum: ENOBUFS
    enum: EINTR
