// libxfrmbridge.so, ethtool: the daemon's offload devices have esp-hw-offload.
//
// A key manager asks the kernel's ethtool whether the interface holding its outer address has the esp-hw-offload
// feature before it names that interface in XFRMA_OFFLOAD_DEV (strongSwan's and libreswan's kernel-netlink code,
// through their NETLINK_XFRM socket). On a bridged socket that question is the daemon's to answer: the kernel's
// answer is kept, and the feature is added (available, requested, active) when xfrmd has an ESP offload device on
// that interface (its XFRMD_MSG_GETOFFLOADDEV, asked on a connection of its own).
#define _GNU_SOURCE
#include "bridge.h"

#include <dlfcn.h>
#include <errno.h>
#include <linux/ethtool.h>
#include <linux/netlink.h>
#include <linux/sockios.h>
#include <net/if.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

#define XFRMD_MSG_GETOFFLOADDEV 0x7ff0
#define XFRMA_OFFLOAD_DEV_TYPE 28  // XFRMA_OFFLOAD_DEV

// glibc's ioctl is variadic: called through a pointer of the same type.
static int (*real_ioctl)(int, unsigned long, ...);
static int (*get_ioctl(void))(int, unsigned long, ...) {
    if (real_ioctl == NULL) real_ioctl = (int (*)(int, unsigned long, ...))dlsym(RTLD_NEXT, "ioctl");
    return real_ioctl;
}

/// Whether xfrmd has an ESP offload device on interface `ifindex`.
static int daemon_offloads(uint32_t ifindex) {
    int s = bridge_connect_daemon(SOCK_CLOEXEC);
    if (s < 0) return 0;
    struct timeval tv = {2, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    struct nlmsghdr q = {sizeof(q), XFRMD_MSG_GETOFFLOADDEV, NLM_F_REQUEST, 1, 0};
    int found = 0;
    uint8_t buf[4096] __attribute__((aligned(4)));
    if (send(s, &q, sizeof(q), MSG_NOSIGNAL) == (ssize_t)sizeof(q)) {
        ssize_t n = recv(s, buf, sizeof(buf), 0);
        const struct nlmsghdr *h = (const void *)buf;
        if (n >= (ssize_t)NLMSG_HDRLEN && h->nlmsg_type == XFRMD_MSG_GETOFFLOADDEV && h->nlmsg_len <= (size_t)n) {
            for (size_t off = NLMSG_HDRLEN; off + NLA_HDRLEN <= h->nlmsg_len;) {
                const struct nlattr *a = (const void *)(buf + off);
                if (a->nla_len < NLA_HDRLEN || off + a->nla_len > h->nlmsg_len) break;
                int32_t index;
                if (a->nla_type == XFRMA_OFFLOAD_DEV_TYPE && a->nla_len >= NLA_HDRLEN + sizeof(index)) {
                    memcpy(&index, buf + off + NLA_HDRLEN, sizeof(index));
                    if ((uint32_t)index == ifindex) found = 1;
                }
                off += NLA_ALIGN(a->nla_len);
            }
        }
    }
    close(s);
    return found;
}

/// The position of esp-hw-offload in the kernel's feature strings (ETH_SS_FEATURES), or -1.
static int esp_feature_bit(int fd, const char *ifname) {
    static int cached = -2;  // -2: not looked up yet (threads may look it up twice; they find the same)
    int known = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (known != -2) return known;
    // struct ethtool_sset_info with one data word: the number of feature strings.
    struct ethtool_sset_info *sset = calloc(1, sizeof(*sset) + sizeof(uint32_t));
    if (sset == NULL) return -1;
    sset->cmd = ETHTOOL_GSSET_INFO;
    sset->sset_mask = 1ULL << ETH_SS_FEATURES;
    struct ifreq ifr = {0};
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    ifr.ifr_data = (void *)sset;
    int ok = get_ioctl()(fd, SIOCETHTOOL, &ifr) == 0 && sset->sset_mask == 1ULL << ETH_SS_FEATURES;
    uint32_t count = ok ? sset->data[0] : 0;
    free(sset);
    if (!ok) return -1;  // not cached: asked again next time
    struct ethtool_gstrings *names = calloc(1, sizeof(*names) + (size_t)count * ETH_GSTRING_LEN);
    if (names == NULL) return -1;
    names->cmd = ETHTOOL_GSTRINGS;
    names->string_set = ETH_SS_FEATURES;
    ifr.ifr_data = (void *)names;
    int bit = -1;
    if (get_ioctl()(fd, SIOCETHTOOL, &ifr) == 0) {
        for (uint32_t i = 0; i < names->len && i < count; i++) {
            if (strncmp((const char *)names->data + (size_t)i * ETH_GSTRING_LEN, "esp-hw-offload", ETH_GSTRING_LEN) == 0) {
                bit = (int)i;
                break;
            }
        }
    }
    free(names);
    __atomic_store_n(&cached, bit, __ATOMIC_RELAXED);
    return bit;
}

EXPORT int ioctl(int fd, unsigned long request, ...) {
    va_list ap;
    va_start(ap, request);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    struct ifreq *ifr = arg;
    if (request != SIOCETHTOOL || ifr == NULL || ifr->ifr_data == NULL || bridge_lookup(fd) == NULL) {
        return get_ioctl()(fd, request, arg);
    }
    struct ethtool_gfeatures *g = (void *)ifr->ifr_data;
    uint32_t cmd = g->cmd;  // every ethtool command starts with its u32 number
    if (cmd != ETHTOOL_GFEATURES) return get_ioctl()(fd, request, arg);
    uint32_t blocks = g->size;  // the kernel rewrites size with its own count
    int rc = get_ioctl()(fd, request, arg);
    if (rc != 0) return rc;
    int saved = errno;
    int bit = esp_feature_bit(fd, ifr->ifr_name);
    unsigned idx = if_nametoindex(ifr->ifr_name);
    if (bit >= 0 && (uint32_t)bit / 32 < blocks && idx != 0 && daemon_offloads(idx)) {
        uint32_t m = 1U << (bit % 32);
        g->features[bit / 32].available |= m;
        g->features[bit / 32].requested |= m;
        g->features[bit / 32].active |= m;
    }
    errno = saved;
    return rc;
}
