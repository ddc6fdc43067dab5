// System calls Swift cannot make directly (variadic ioctl) for the daemon's data path.
#ifndef CXFRMSYS_H
#define CXFRMSYS_H

/// Opens /dev/net/tun as a layer-3 TUN device without packet information (IFF_TUN | IFF_NO_PI), named `name`
/// (created if absent), non-blocking and close-on-exec. Writes the kernel's name for it into `name_out`
/// (at least 16 bytes). Returns the descriptor, or -errno.
int xfrm_tun_open(const char *name, char *name_out);

/// Brings the interface `name` up (SIOCSIFFLAGS with IFF_UP). Returns 0 or -errno.
int xfrm_link_up(const char *name);

#endif
