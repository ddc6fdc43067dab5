// System calls Swift cannot make directly (variadic ioctl) for the daemon's data path.
#ifndef CXFRMSYS_H
#define CXFRMSYS_H

/// Opens /dev/net/tun as a layer-3 TUN device without packet information (IFF_TUN | IFF_NO_PI), named `name`
/// (created if absent), non-blocking and close-on-exec. Writes the kernel's name for it into `name_out`
/// (at least 16 bytes). Returns the descriptor, or -errno.
int xfrm_tun_open(const char *name, char *name_out);

/// As xfrm_tun_open, with IFF_VNET_HDR (a 10-byte struct virtio_net_hdr before every packet) and the offloads
/// TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 (the kernel may hand over TCP superpackets and partial checksums, and takes
/// coalesced segments back), plus TUN_F_USO4 | TUN_F_USO6 (UDP superpackets, VIRTIO_NET_HDR_GSO_UDP_L4; kernel
/// 6.2 and later) when the kernel takes them: *uso is set to 1 then, 0 otherwise (tun_set_offload refuses unknown
/// bits with EINVAL). Returns the descriptor, or -errno.
int xfrm_tun_open_offload(const char *name, char *name_out, int *uso);

/// Brings the interface `name` up (SIOCSIFFLAGS with IFF_UP). Returns 0 or -errno.
int xfrm_link_up(const char *name);

#include <stddef.h>

/// The most datagrams one batched call moves.
#define XFRM_BATCH_MAX 128

/// recvmmsg(MSG_DONTWAIT) of up to `n` (≤ XFRM_BATCH_MAX) datagrams: datagram i into bufs[i] (caps[i] bytes), its
/// source into names[i] (a struct sockaddr_in6 each), its control messages into ctl + i * ctl_size. Sets lens[i] and flags[i] (MSG_TRUNC when
/// it did not fit). Returns how many were received (0 when none was waiting), or -errno.
int xfrm_recv_batch(int fd, void *const *bufs, const size_t *caps, size_t *lens, int *flags,
                    void *names, unsigned char *ctl, size_t ctl_size, unsigned n);

/// sendmmsg of `n` (≤ XFRM_BATCH_MAX) datagrams: bufs[i] (lens[i] bytes) to names[i] (namelen bytes of it), with the
/// control messages at ctl + i * ctl_size (ctl_lens[i] bytes; ctl may be NULL). Retries what the kernel did not take
/// in one call; a datagram the kernel refuses is skipped and counted in *failed. Returns how many were sent.
int xfrm_send_batch(int fd, void *const *bufs, const size_t *lens, const void *names,
                    unsigned namelen, unsigned char *ctl, const size_t *ctl_lens, size_t ctl_size, unsigned n,
                    unsigned *failed);

/// sendmmsg of `n` (≤ XFRM_BATCH_MAX) messages, each gathering iov_counts[i] buffers from bufs/lens starting at
/// entry iov_starts[i] (all entries at most XFRM_IOV_MAX): a message of several buffers carries a UDP_SEGMENT
/// control message (Linux UDP GSO: udp_send_skb cuts it) and leaves as that many datagrams. Otherwise as
/// xfrm_send_batch. A message the kernel refuses is reported in refused[i] (its errno), 0 when sent; returns how
/// many messages were sent.
#define XFRM_IOV_MAX 1024
int xfrm_send_gso_batch(int fd, void *const *bufs, const size_t *lens, const unsigned *iov_starts,
                        const unsigned *iov_counts, const void *names, unsigned namelen, unsigned char *ctl,
                        const size_t *ctl_lens, size_t ctl_size, unsigned n, int *refused);

/// Sets an int socket option at level SOL_UDP (UDP_GRO, 104). Returns 0 or -errno.
int xfrm_set_udp_option(int fd, int option, int value);

/// Sets SO_MARK on a socket (needs CAP_NET_ADMIN). Returns 0 or -errno.
int xfrm_set_mark(int fd, unsigned mark);

/// The NAT-T port shared by ESP and IKE (RFC 3948), as the kernel splits it with UDP_ENCAP: xfrmd's socket and the
/// key manager's (through xfrm-bridge) both bind it with SO_REUSEPORT, and a classic BPF program on the group
/// (SO_ATTACH_REUSEPORT_CBPF) sends a datagram whose first 4 bytes are zero (IKE behind its non-ESP marker) to the
/// key manager's socket and every other one (ESP, keepalives) to the daemon's. A group's sockets are numbered in
/// the order they joined, so whoever joins second (the port was taken) is 1 and attaches the program for that order;
/// the first attaches it for its own. `role` is XFRM_NATT_ESP (the daemon) or XFRM_NATT_IKE (the key manager);
/// `bindfn` does the binding (NULL: bind; the bridge passes the real one). Returns 0 or -1 with errno.
struct sockaddr;
#define XFRM_NATT_ESP 0
#define XFRM_NATT_IKE 1
int xfrm_natt_join(int fd, const void *addr, unsigned addrlen, int (*bindfn)(int, const struct sockaddr *, unsigned),
                   int role);

#endif
