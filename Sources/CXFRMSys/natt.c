// See include/CXFRMSys.h: xfrm_natt_join.
#define _GNU_SOURCE
#include "CXFRMSys.h"

#include <errno.h>
#include <linux/filter.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef SO_ATTACH_REUSEPORT_CBPF
#define SO_ATTACH_REUSEPORT_CBPF 51
#endif

/// Whether another socket holds the address now: a probe bound without SO_REUSEPORT fails with EADDRINUSE.
static int taken(const struct sockaddr *addr, unsigned len, int (*bindfn)(int, const struct sockaddr *, unsigned)) {
    int probe = socket(addr->sa_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (probe < 0) return 0;
    int one = 1;
    if (addr->sa_family == AF_INET6) setsockopt(probe, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
    int busy = bindfn(probe, addr, len) != 0 && errno == EADDRINUSE;
    close(probe);
    return busy;
}

int xfrm_natt_join(int fd, const void *addr_, unsigned addrlen, int (*bindfn)(int, const struct sockaddr *, unsigned),
                   int role) {
    const struct sockaddr *addr = addr_;
    if (bindfn == NULL) bindfn = (int (*)(int, const struct sockaddr *, unsigned))bind;
    int index = taken(addr, addrlen, bindfn) ? 1 : 0;
    int one = 1;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0) return -1;
    if (bindfn(fd, addr, addrlen) != 0) return -1;
    unsigned ike = role == XFRM_NATT_IKE ? (unsigned)index : (unsigned)(1 - index);
    // The reuseport program sees the UDP payload at offset 0. A datagram shorter than 4 bytes (a NAT-T keepalive)
    // ends the program at the load with 0: the first socket.
    struct sock_filter code[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, ike),
        BPF_STMT(BPF_RET | BPF_K, 1 - ike),
    };
    struct sock_fprog prog = {.len = sizeof(code) / sizeof(code[0]), .filter = code};
    return setsockopt(fd, SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, &prog, sizeof(prog));
}
