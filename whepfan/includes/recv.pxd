# C declarations for the load-test receive side (whepfan/_receiver.pxi): Linux
# recvmmsg(2) and epoll(7). The socket structs come from includes/system.pxd.
from libc.stdint cimport uint32_t, uint64_t
from posix.time cimport timespec

from whepfan.includes.system cimport mmsghdr, msghdr, sockaddr, socklen_t


cdef extern from "<sys/socket.h>" nogil:
    # Linux recvmmsg(2): a whole batch of datagrams, each with its source (msg_name)
    # and length (msg_len), in one system call.
    int recvmmsg(int sockfd, mmsghdr* msgvec, unsigned int vlen, int flags, timespec* timeout)

    # Ancillary data (cmsg(3), declared in includes/system.pxd): the kernel's receive
    # timestamp (socket(7) SO_TIMESTAMPNS, CLOCK_REALTIME) and the socket's cumulative
    # drop count (SO_RXQ_OVFL) per datagram.
    enum: SO_TIMESTAMPNS
    enum: SCM_TIMESTAMPNS
    enum: SO_RXQ_OVFL
    int setsockopt(int sockfd, int level, int optname, const void* optval, socklen_t optlen)


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void* ptr
        int fd
        uint32_t u32
        uint64_t u64

    cdef struct epoll_event:
        uint32_t events
        epoll_data_t data

    enum: EPOLLIN
    enum: EPOLL_CTL_ADD
    enum: EPOLL_CTL_DEL
    enum: EPOLL_CLOEXEC

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout)


cdef extern from "<arpa/inet.h>" nogil:
    const char* inet_ntop(int af, const void* src, char* dst, socklen_t size)
    unsigned short ntohs(unsigned short netshort)
    enum: INET6_ADDRSTRLEN


cdef extern from "<unistd.h>" nogil:
    int close(int fd)
