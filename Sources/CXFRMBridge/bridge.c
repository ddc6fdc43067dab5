// libxfrmbridge.so — gives a process's NETLINK_XFRM sockets to xfrmd instead of the kernel (LD_PRELOAD; the
// `xfrm-bridge` command sets it up). Every other socket, NETLINK_ROUTE included, stays with the kernel.
//
// socket(AF_NETLINK, type, NETLINK_XFRM) returns a Unix SOCK_SEQPACKET socket connected to the daemon's control
// socket (XFRMD_SOCKET, else /run/xfrmd.sock), which speaks XFRM netlink with one datagram per netlink datagram.
// The calls a netlink user makes on it keep netlink's semantics:
//   bind/connect/getsockname  a sockaddr_nl; the port id is the one asked for, else the process id for the
//                             first socket and -4096, -4097, … for the next (≈ netlink_autobind);
//   nl_groups and NETLINK_ADD/DROP_MEMBERSHIP  the daemon's join message (an NLMSG_NOOP whose body is the group
//                             bitmask, XFRMD's control protocol);
//   SOL_NETLINK options       EXT_ACK, CAP_ACK, PKTINFO, NO_ENOBUFS, BROADCAST_ERROR, LISTEN_ALL_NSID,
//                             GET_STRICT_CHK are kept and read back (the daemon always adds extended-ack
//                             messages and never echoes the request in an error); others are ENOPROTOOPT;
//   send/sendto/sendmsg       each message's nlmsg_pid is set to the socket's port id (the kernel answers with the
//                             sender's port id, whatever the header said), and the destination must be the kernel
//                             (nl_pid 0, no groups; ECONNREFUSED otherwise);
//   recv/recvfrom/recvmsg     message boundaries, MSG_PEEK and MSG_TRUNC as the Unix socket gives them; the
//                             source address is the kernel's (AF_NETLINK, port id 0), so a caller that ignores
//                             messages from user space (strongSwan checks nl_pid) takes them;
//   getsockopt SO_DOMAIN/SO_PROTOCOL/SO_TYPE  AF_NETLINK, NETLINK_XFRM and the type asked for.
// With XFRM_BRIDGE_NATT_PORT (xfrm-bridge --share-natt-port), a UDP socket bound to that port joins xfrmd's socket
// there (xfrm_natt_join: SO_REUSEPORT and a steering program): datagrams with the zero non-ESP marker (IKE) reach
// the program, everything else (ESP) the daemon — the split the kernel makes with UDP_ENCAP.
// ioctl(SIOCETHTOOL, ETHTOOL_GFEATURES) on a bridged socket shows esp-hw-offload on the interfaces where xfrmd has an
// offload device (`xfrmd --offload-dev`), so that a key manager asks the daemon for offload there (ethtool.c).
// A daemon that goes away is connected to again (the in-flight request sent again; the caller reads ENOBUFS, as
// after lost messages); if it does not come back the socket stays silent. It never reads as end of file: netlink
// users spin on that.
#define _GNU_SOURCE
#include "CXFRMSys.h"
#include "bridge.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/netlink.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef SOL_NETLINK
#define SOL_NETLINK 270
#endif

#define MAX_FD 4096
#define EXPORT __attribute__((visibility("default")))

/// One bridged socket.
struct bridged {
    int used;
    int type;          // the type socket() was asked for (SOCK_RAW or SOCK_DGRAM)
    uint32_t portid;   // 0 until bound
    uint32_t groups;   // bit g-1: group g
    int options[16];   // SOL_NETLINK options by number
    dev_t dev;         // the Unix socket's identity: an fd number closed behind our back (close_range, dup2)
    ino_t ino;         // and reused is not taken for a bridged socket
    uint8_t *last;     // the last datagram sent, sent again after a reconnection (the request then in flight)
    size_t last_len;
};

static struct bridged table[MAX_FD];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int32_t rover = -4096;
static int pid_taken;

#define REAL(name, ret, ...)                                                                                   \
    static ret (*real_##name)(__VA_ARGS__);                                                                     \
    static ret (*get_##name(void))(__VA_ARGS__) {                                                               \
        if (real_##name == NULL) real_##name = (ret(*)(__VA_ARGS__))dlsym(RTLD_NEXT, #name);                    \
        return real_##name;                                                                                     \
    }

REAL(socket, int, int, int, int)
REAL(bind, int, int, const struct sockaddr *, socklen_t)
REAL(connect, int, int, const struct sockaddr *, socklen_t)
REAL(getsockname, int, int, struct sockaddr *, socklen_t *)
REAL(setsockopt, int, int, int, int, const void *, socklen_t)
REAL(getsockopt, int, int, int, int, void *, socklen_t *)
REAL(sendmsg, ssize_t, int, const struct msghdr *, int)
REAL(recvmsg, ssize_t, int, struct msghdr *, int)
REAL(close, int, int)
REAL(sendto, ssize_t, int, const void *, size_t, int, const struct sockaddr *, socklen_t)
REAL(send, ssize_t, int, const void *, size_t, int)
REAL(recvfrom, ssize_t, int, void *, size_t, int, struct sockaddr *, socklen_t *)
REAL(recv, ssize_t, int, void *, size_t, int)

struct bridged *bridge_lookup(int fd) {
    if (fd < 0 || fd >= MAX_FD || !table[fd].used) return NULL;
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_dev != table[fd].dev || st.st_ino != table[fd].ino) {
        table[fd].used = 0;  // not ours any more
        return NULL;
    }
    return &table[fd];
}

static const char *daemon_path(void) {
    const char *p = getenv("XFRMD_SOCKET");
    return p != NULL && *p != 0 ? p : "/run/xfrmd.sock";
}

/// Sends the daemon the socket's group bitmask (XFRMD's join message: NLMSG_NOOP with a 4-byte body).
static int send_join(int fd, struct bridged *b) {
    struct {
        struct nlmsghdr h;
        uint32_t groups;
    } m = {{sizeof(m), NLMSG_NOOP, NLM_F_REQUEST, 0, b->portid}, b->groups};
    ssize_t n = get_send()(fd, &m, sizeof(m), MSG_NOSIGNAL);
    return n == (ssize_t)sizeof(m) ? 0 : -1;
}

/// A Unix SOCK_SEQPACKET socket connected to the daemon, or -1 with errno.
int bridge_connect_daemon(int cloexec) {
    int fd = get_socket()(AF_UNIX, SOCK_SEQPACKET | cloexec, 0);
    if (fd < 0) return -1;
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    const char *path = daemon_path();
    if (strlen(path) >= sizeof(a.sun_path)) {
        get_close()(fd);
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(a.sun_path, path);
    if (get_connect()(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
        int e = errno;
        get_close()(fd);
        errno = e;
        return -1;
    }
    return fd;
}

/// Puts `replacement` in place of the bridged socket `fd` (same number, same blocking mode and close-on-exec).
static void replace_socket(int fd, struct bridged *b, int replacement) {
    int status = fcntl(fd, F_GETFL);
    int fdflags = fcntl(fd, F_GETFD);
    dup3(replacement, fd, (fdflags >= 0 && (fdflags & FD_CLOEXEC)) ? O_CLOEXEC : 0);
    get_close()(replacement);
    if (status >= 0) fcntl(fd, F_SETFL, status);
    struct stat st;
    if (fstat(fd, &st) == 0) {
        b->dev = st.st_dev;
        b->ino = st.st_ino;
    }
}

static int send_join(int fd, struct bridged *b);

/// The daemon closed the socket. A kernel's netlink socket never reads as end of file, and its users (charon's
/// watcher and request loops) spin on one, so: connect again (for up to 5 s: a restarting daemon), join the same
/// groups, and send the request that was in flight again; the caller reads ENOBUFS, netlink's "you missed
/// messages" (a listener resynchronises). If the daemon does not come back the socket becomes a silent kernel (one
/// end of a socket pair nobody writes to): requests go unanswered, nothing spins.
static void daemon_lost(int fd, struct bridged *b) {
    for (int i = 0; i < 50; i++) {
        int s = bridge_connect_daemon(0);
        if (s >= 0) {
            replace_socket(fd, b, s);
            send_join(fd, b);
            if (b->last != NULL) get_send()(fd, b->last, b->last_len, MSG_NOSIGNAL);
            fprintf(stderr, "xfrm-bridge: xfrmd at %s went away; connected again\n", daemon_path());
            return;
        }
        usleep(100000);
    }
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, pair) == 0) replace_socket(fd, b, pair[0]);  // pair[1] stays open
    fprintf(stderr, "xfrm-bridge: xfrmd at %s went away and does not answer; this netlink socket stays silent\n",
            daemon_path());
}

/// ≈ netlink_autobind: the process id first, then -4096, -4097, …
static void autobind(struct bridged *b) {
    pthread_mutex_lock(&lock);
    if (b->portid != 0) {
        pthread_mutex_unlock(&lock);
        return;
    }
    if (!pid_taken) {
        pid_taken = 1;
        b->portid = (uint32_t)getpid();
    } else {
        b->portid = (uint32_t)rover--;
    }
    pthread_mutex_unlock(&lock);
}

EXPORT int socket(int domain, int type, int protocol) {
    if (domain != AF_NETLINK || protocol != NETLINK_XFRM) return get_socket()(domain, type, protocol);
    int flags = type & (SOCK_CLOEXEC | SOCK_NONBLOCK);
    int base = type & ~(SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (base != SOCK_RAW && base != SOCK_DGRAM) {
        errno = ESOCKTNOSUPPORT;
        return -1;
    }
    int fd = bridge_connect_daemon(flags & SOCK_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        fprintf(stderr, "xfrm-bridge: cannot reach xfrmd at %s: %s\n", daemon_path(), strerror(e));
        errno = e;
        return -1;
    }
    if (fd >= MAX_FD) {
        get_close()(fd);
        errno = EMFILE;
        return -1;
    }
    if (flags & SOCK_NONBLOCK) {
        int one = 1;
        ioctl(fd, FIONBIO, &one);
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        get_close()(fd);
        errno = e;
        return -1;
    }
    pthread_mutex_lock(&lock);
    memset(&table[fd], 0, sizeof(table[fd]));
    table[fd].dev = st.st_dev;
    table[fd].ino = st.st_ino;
    table[fd].type = base;
    table[fd].used = 1;
    pthread_mutex_unlock(&lock);
    return fd;
}

EXPORT int close(int fd) {
    struct bridged *b = bridge_lookup(fd);
    if (b != NULL) {
        pthread_mutex_lock(&lock);
        if (b->portid == (uint32_t)getpid()) pid_taken = 0;
        free(b->last);
        b->last = NULL;
        b->used = 0;
        pthread_mutex_unlock(&lock);
    }
    return get_close()(fd);
}

/// XFRM_BRIDGE_NATT_PORT (xfrm-bridge --share-natt-port): the UDP port whose sockets join xfrmd's NAT-T port.
static int natt_port(void) {
    const char *p = getenv("XFRM_BRIDGE_NATT_PORT");
    return p != NULL ? atoi(p) : 0;
}

/// A UDP socket binding the shared NAT-T port (IPv4 or IPv6).
static int binds_natt_port(int fd, const struct sockaddr *addr, socklen_t len) {
    int port = natt_port();
    if (port <= 0 || addr == NULL) return 0;
    int p;
    if (addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        p = ntohs(((const struct sockaddr_in *)addr)->sin_port);
    } else if (addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        p = ntohs(((const struct sockaddr_in6 *)addr)->sin6_port);
    } else {
        return 0;
    }
    int proto = 0;
    socklen_t n = sizeof(proto);
    return p == port && get_getsockopt()(fd, SOL_SOCKET, SO_PROTOCOL, &proto, &n) == 0 && proto == IPPROTO_UDP;
}

EXPORT int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    struct bridged *b = bridge_lookup(fd);
    if (b == NULL && binds_natt_port(fd, addr, len)) {
        // The key manager's IKE socket on the NAT-T port: it joins xfrmd's socket there; IKE comes here, ESP there.
        return xfrm_natt_join(fd, addr, len, (int (*)(int, const struct sockaddr *, unsigned))get_bind(),
                              XFRM_NATT_IKE);
    }
    if (b == NULL) return get_bind()(fd, addr, len);
    const struct sockaddr_nl *nl = (const struct sockaddr_nl *)addr;
    if (nl == NULL || len < sizeof(*nl) || nl->nl_family != AF_NETLINK) {
        errno = EINVAL;
        return -1;
    }
    if (nl->nl_pid != 0) {
        if (b->portid != 0 && b->portid != nl->nl_pid) {
            errno = EINVAL;  // ≈ netlink_bind: a bound socket keeps its port id
            return -1;
        }
        b->portid = nl->nl_pid;
        if (nl->nl_pid == (uint32_t)getpid()) pid_taken = 1;
    } else {
        autobind(b);
    }
    b->groups = nl->nl_groups;
    return send_join(fd, b);
}

EXPORT int connect(int fd, const struct sockaddr *addr, socklen_t len) {
    struct bridged *b = bridge_lookup(fd);
    if (b == NULL) return get_connect()(fd, addr, len);
    const struct sockaddr_nl *nl = (const struct sockaddr_nl *)addr;
    if (len < sizeof(*nl) || nl->nl_family != AF_NETLINK) {
        errno = EINVAL;
        return -1;
    }
    if (nl->nl_pid != 0 || nl->nl_groups != 0) {
        errno = ECONNREFUSED;  // only the kernel (port id 0) is there
        return -1;
    }
    autobind(b);
    return send_join(fd, b);
}

EXPORT int getsockname(int fd, struct sockaddr *addr, socklen_t *len) {
    struct bridged *b = bridge_lookup(fd);
    if (b == NULL) return get_getsockname()(fd, addr, len);
    if (addr == NULL || len == NULL) {
        errno = EFAULT;
        return -1;
    }
    struct sockaddr_nl nl = {.nl_family = AF_NETLINK, .nl_pid = b->portid, .nl_groups = b->groups};
    size_t n = *len < sizeof(nl) ? *len : sizeof(nl);
    memcpy(addr, &nl, n);
    *len = sizeof(nl);
    return 0;
}

/// The SOL_NETLINK flags kept and read back (their effects are the daemon's fixed behaviour).
static int kept_option(int name) {
    switch (name) {
    case NETLINK_PKTINFO:
    case NETLINK_BROADCAST_ERROR:
    case NETLINK_NO_ENOBUFS:
    case NETLINK_LISTEN_ALL_NSID:
    case NETLINK_CAP_ACK:
    case NETLINK_EXT_ACK:
    case NETLINK_GET_STRICT_CHK:
        return 1;
    default:
        return 0;
    }
}

EXPORT int setsockopt(int fd, int level, int name, const void *value, socklen_t len) {
    struct bridged *b = bridge_lookup(fd);
    if (b == NULL || level != SOL_NETLINK) return get_setsockopt()(fd, level, name, value, len);
    if (len < sizeof(int) || value == NULL) {
        errno = EINVAL;
        return -1;
    }
    int v = *(const int *)value;
    switch (name) {
    case NETLINK_ADD_MEMBERSHIP:
    case NETLINK_DROP_MEMBERSHIP:
        if (v < 1 || v > 32) {
            errno = EINVAL;
            return -1;
        }
        autobind(b);
        if (name == NETLINK_ADD_MEMBERSHIP) b->groups |= 1u << (v - 1);
        else b->groups &= ~(1u << (v - 1));
        return send_join(fd, b);
    default:
        if (!kept_option(name)) {
            errno = ENOPROTOOPT;
            return -1;
        }
        b->options[name] = v != 0;
        return 0;
    }
}

EXPORT int getsockopt(int fd, int level, int name, void *value, socklen_t *len) {
    struct bridged *b = bridge_lookup(fd);
    if (b == NULL) return get_getsockopt()(fd, level, name, value, len);
    int v;
    if (level == SOL_SOCKET && (name == SO_DOMAIN || name == SO_PROTOCOL || name == SO_TYPE)) {
        v = name == SO_DOMAIN ? AF_NETLINK : name == SO_PROTOCOL ? NETLINK_XFRM : b->type;
    } else if (level == SOL_NETLINK) {
        if (!kept_option(name)) {
            errno = ENOPROTOOPT;
            return -1;
        }
        v = b->options[name];
    } else {
        return get_getsockopt()(fd, level, name, value, len);
    }
    if (value == NULL || len == NULL) {
        errno = EFAULT;
        return -1;
    }
    if (*len < sizeof(int)) {
        errno = EINVAL;
        return -1;
    }
    memcpy(value, &v, sizeof(v));
    *len = sizeof(int);
    return 0;
}

EXPORT ssize_t sendmsg(int fd, const struct msghdr *msg, int flags) {
    struct bridged *b = bridge_lookup(fd);
    if (b == NULL) return get_sendmsg()(fd, msg, flags);
    if (msg->msg_name != NULL && msg->msg_namelen != 0) {
        const struct sockaddr_nl *to = msg->msg_name;
        if (msg->msg_namelen < sizeof(*to) || to->nl_family != AF_NETLINK) {
            errno = EINVAL;
            return -1;
        }
        if (to->nl_pid != 0 || to->nl_groups != 0) {
            errno = ECONNREFUSED;
            return -1;
        }
    }
    autobind(b);
    size_t total = 0;
    for (size_t i = 0; i < msg->msg_iovlen; i++) total += msg->msg_iov[i].iov_len;
    uint8_t *buf = malloc(total ? total : 1);
    if (buf == NULL) {
        errno = ENOBUFS;
        return -1;
    }
    size_t off = 0;
    for (size_t i = 0; i < msg->msg_iovlen; i++) {
        memcpy(buf + off, msg->msg_iov[i].iov_base, msg->msg_iov[i].iov_len);
        off += msg->msg_iov[i].iov_len;
    }
    // The kernel answers to the socket's port id, whatever a request's header says; the daemon echoes the header.
    for (off = 0; off + sizeof(struct nlmsghdr) <= total;) {
        struct nlmsghdr *h = (struct nlmsghdr *)(buf + off);
        if (h->nlmsg_len < sizeof(*h) || off + h->nlmsg_len > total) break;
        h->nlmsg_pid = b->portid;
        off += NLMSG_ALIGN(h->nlmsg_len);
    }
    struct iovec iov = {buf, total};
    struct msghdr out = {.msg_iov = &iov, .msg_iovlen = 1};
    ssize_t n = get_sendmsg()(fd, &out, (flags & (MSG_DONTWAIT)) | MSG_NOSIGNAL);
    if (n < 0 && (errno == EPIPE || errno == ECONNRESET || errno == ENOTCONN || errno == ECONNREFUSED)) {
        free(b->last);  // the request goes once, below, not twice
        b->last = NULL;
        daemon_lost(fd, b);
        n = get_sendmsg()(fd, &out, (flags & (MSG_DONTWAIT)) | MSG_NOSIGNAL);
    }
    int e = errno;
    if (n == (ssize_t)total) {
        free(b->last);  // kept: sent again if the daemon goes away before answering
        b->last = buf;
        b->last_len = total;
    } else {
        free(buf);
    }
    errno = e;
    if (n < 0 && errno == EPIPE) errno = ECONNREFUSED;
    return n;
}

EXPORT ssize_t sendto(int fd, const void *data, size_t len, int flags, const struct sockaddr *to, socklen_t tolen) {
    if (bridge_lookup(fd) == NULL) return get_sendto()(fd, data, len, flags, to, tolen);
    struct iovec iov = {(void *)data, len};
    struct msghdr m = {.msg_name = (void *)to, .msg_namelen = to ? tolen : 0, .msg_iov = &iov, .msg_iovlen = 1};
    return sendmsg(fd, &m, flags);
}

EXPORT ssize_t send(int fd, const void *data, size_t len, int flags) {
    if (bridge_lookup(fd) == NULL) return get_send()(fd, data, len, flags);
    return sendto(fd, data, len, flags, NULL, 0);
}

EXPORT ssize_t recvmsg(int fd, struct msghdr *msg, int flags) {
    struct bridged *b = bridge_lookup(fd);
    if (b == NULL) return get_recvmsg()(fd, msg, flags);
    void *name = msg->msg_name;
    socklen_t namelen = msg->msg_namelen;
    msg->msg_name = NULL;
    msg->msg_namelen = 0;
    ssize_t n = get_recvmsg()(fd, msg, flags & (MSG_PEEK | MSG_TRUNC | MSG_DONTWAIT | MSG_WAITALL));
    msg->msg_name = name;
    if (n == 0 || (n < 0 && (errno == ECONNRESET || errno == ENOTCONN))) {
        // The daemon closed the socket (it never sends an empty datagram) or went away with messages unread.
        daemon_lost(fd, b);
        errno = ENOBUFS;
        n = -1;
    }
    if (n < 0) {
        msg->msg_namelen = namelen;
        return n;
    }
    if (name != NULL) {
        struct sockaddr_nl from = {.nl_family = AF_NETLINK};  // every message comes from the "kernel"
        memcpy(name, &from, namelen < sizeof(from) ? namelen : sizeof(from));
        msg->msg_namelen = sizeof(from);
    }
    return n;
}

EXPORT ssize_t recvfrom(int fd, void *data, size_t len, int flags, struct sockaddr *from, socklen_t *fromlen) {
    if (bridge_lookup(fd) == NULL) return get_recvfrom()(fd, data, len, flags, from, fromlen);
    struct iovec iov = {data, len};
    struct msghdr m = {.msg_name = from, .msg_namelen = fromlen ? *fromlen : 0, .msg_iov = &iov, .msg_iovlen = 1};
    ssize_t n = recvmsg(fd, &m, flags);
    if (n >= 0 && fromlen) *fromlen = m.msg_namelen;
    return n;
}

EXPORT ssize_t recv(int fd, void *data, size_t len, int flags) {
    if (bridge_lookup(fd) == NULL) return get_recv()(fd, data, len, flags);
    return recvfrom(fd, data, len, flags, NULL, NULL);
}

// _FORTIFY_SOURCE builds call these instead of recv/recvfrom when the buffer's size is known.
EXPORT ssize_t __recv_chk(int fd, void *data, size_t len, size_t buflen, int flags) {
    if (len > buflen) abort();
    return recv(fd, data, len, flags);
}

EXPORT ssize_t __recvfrom_chk(int fd, void *data, size_t len, size_t buflen, int flags, struct sockaddr *from,
                              socklen_t *fromlen) {
    if (len > buflen) abort();
    return recvfrom(fd, data, len, flags, from, fromlen);
}
