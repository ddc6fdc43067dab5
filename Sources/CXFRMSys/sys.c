// See include/CXFRMSys.h.
#define _GNU_SOURCE
#include "CXFRMSys.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <unistd.h>

#ifndef TUN_F_USO4
#define TUN_F_USO4 0x20
#define TUN_F_USO6 0x40
#endif

static int tun_open(const char *name, char *name_out, int offload, int *uso) {
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return -errno;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI | (offload ? IFF_VNET_HDR : 0);
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    if (offload) {
        int size = 10; /* sizeof(struct virtio_net_hdr) */
        unsigned long tcp = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
        if (ioctl(fd, TUNSETVNETHDRSZ, &size) < 0) {
            int e = errno;
            close(fd);
            return -e;
        }
        *uso = 1;
        if (ioctl(fd, TUNSETOFFLOAD, tcp | TUN_F_USO4 | TUN_F_USO6) < 0) {
            *uso = 0;  /* before 6.2: TCP offloads only */
            if (ioctl(fd, TUNSETOFFLOAD, tcp) < 0) {
                int e = errno;
                close(fd);
                return -e;
            }
        }
    }
    memcpy(name_out, ifr.ifr_name, IFNAMSIZ);
    return fd;
}

int xfrm_tun_open(const char *name, char *name_out) {
    int uso = 0;
    return tun_open(name, name_out, 0, &uso);
}

int xfrm_tun_open_offload(const char *name, char *name_out, int *uso) { return tun_open(name, name_out, 1, uso); }

int xfrm_link_up(const char *name) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) return -errno;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    int rc = ioctl(s, SIOCGIFFLAGS, &ifr);
    if (rc == 0) {
        ifr.ifr_flags |= IFF_UP;
        rc = ioctl(s, SIOCSIFFLAGS, &ifr);
    }
    int e = errno;
    close(s);
    return rc < 0 ? -e : 0;
}

int xfrm_recv_batch(int fd, void *const *bufs, const size_t *caps, size_t *lens, int *flags,
                    void *names_, unsigned char *ctl, size_t ctl_size, unsigned n) {
    struct sockaddr_in6 *names = names_;
    struct mmsghdr msgs[XFRM_BATCH_MAX];
    struct iovec iov[XFRM_BATCH_MAX];
    if (n > XFRM_BATCH_MAX) n = XFRM_BATCH_MAX;
    for (unsigned i = 0; i < n; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = caps[i];
        memset(&msgs[i], 0, sizeof msgs[i]);
        msgs[i].msg_hdr.msg_name = &names[i];
        msgs[i].msg_hdr.msg_namelen = sizeof names[i];
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        if (ctl) {
            memset(ctl + i * ctl_size, 0, ctl_size);
            msgs[i].msg_hdr.msg_control = ctl + i * ctl_size;
            msgs[i].msg_hdr.msg_controllen = ctl_size;
        }
    }
    int got = recvmmsg(fd, msgs, n, MSG_DONTWAIT, NULL);
    if (got < 0) return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -errno;
    for (int i = 0; i < got; i++) {
        lens[i] = msgs[i].msg_len;
        flags[i] = msgs[i].msg_hdr.msg_flags;
    }
    return got;
}

int xfrm_send_batch(int fd, void *const *bufs, const size_t *lens, const void *names_,
                    unsigned namelen, unsigned char *ctl, const size_t *ctl_lens, size_t ctl_size, unsigned n,
                    unsigned *failed) {
    const struct sockaddr_in6 *names = names_;
    struct mmsghdr msgs[XFRM_BATCH_MAX];
    struct iovec iov[XFRM_BATCH_MAX];
    if (n > XFRM_BATCH_MAX) n = XFRM_BATCH_MAX;
    for (unsigned i = 0; i < n; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = lens[i];
        memset(&msgs[i], 0, sizeof msgs[i]);
        msgs[i].msg_hdr.msg_name = (void *)&names[i];
        msgs[i].msg_hdr.msg_namelen = namelen;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        if (ctl && ctl_lens[i]) {
            msgs[i].msg_hdr.msg_control = ctl + i * ctl_size;
            msgs[i].msg_hdr.msg_controllen = ctl_lens[i];
        }
    }
    unsigned done = 0, sent = 0;
    *failed = 0;
    while (done < n) {
        int k = sendmmsg(fd, msgs + done, n - done, MSG_NOSIGNAL);
        if (k <= 0) {
            if (k < 0 && errno == EINTR) continue;
            (*failed)++;  /* the first one of the rest was refused: skip it */
            done++;
            continue;
        }
        done += (unsigned)k;
        sent += (unsigned)k;
    }
    return (int)sent;
}

int xfrm_send_gso_batch(int fd, void *const *bufs, const size_t *lens, const unsigned *iov_starts,
                        const unsigned *iov_counts, const void *names_, unsigned namelen, unsigned char *ctl,
                        const size_t *ctl_lens, size_t ctl_size, unsigned n, int *refused) {
    const struct sockaddr_in6 *names = names_;
    struct mmsghdr msgs[XFRM_BATCH_MAX];
    struct iovec iov[XFRM_IOV_MAX];
    if (n > XFRM_BATCH_MAX) n = XFRM_BATCH_MAX;
    unsigned used = 0;
    for (unsigned i = 0; i < n; i++) {
        unsigned start = iov_starts[i], count = iov_counts[i];
        if (start + count > XFRM_IOV_MAX || count == 0) { n = i; break; }
        for (unsigned k = 0; k < count; k++) {
            iov[start + k].iov_base = bufs[start + k];
            iov[start + k].iov_len = lens[start + k];
        }
        if (start + count > used) used = start + count;
        memset(&msgs[i], 0, sizeof msgs[i]);
        msgs[i].msg_hdr.msg_name = (void *)&names[i];
        msgs[i].msg_hdr.msg_namelen = namelen;
        msgs[i].msg_hdr.msg_iov = &iov[start];
        msgs[i].msg_hdr.msg_iovlen = count;
        if (ctl && ctl_lens[i]) {
            msgs[i].msg_hdr.msg_control = ctl + i * ctl_size;
            msgs[i].msg_hdr.msg_controllen = ctl_lens[i];
        }
        refused[i] = 0;
    }
    unsigned done = 0, sent = 0;
    while (done < n) {
        int k = sendmmsg(fd, msgs + done, n - done, MSG_NOSIGNAL);
        if (k <= 0) {
            if (k < 0 && errno == EINTR) continue;
            refused[done] = k < 0 ? errno : EIO;  /* the first one of the rest was refused: skip it */
            done++;
            continue;
        }
        done += (unsigned)k;
        sent += (unsigned)k;
    }
    return (int)sent;
}

int xfrm_set_udp_option(int fd, int option, int value) {
    return setsockopt(fd, IPPROTO_UDP, option, &value, sizeof value) < 0 ? -errno : 0;
}

int xfrm_set_mark(int fd, unsigned mark) {
    return setsockopt(fd, SOL_SOCKET, SO_MARK, &mark, sizeof mark) < 0 ? -errno : 0;
}
