// Internal to libxfrmbridge.so (hidden symbols): what ethtool.c uses from bridge.c.
#pragma once

struct bridged;

/// The bridged socket behind `fd`, or NULL (not bridged, or closed and its number reused behind our back).
struct bridged *bridge_lookup(int fd);

/// A Unix SOCK_SEQPACKET socket connected to the daemon's control socket, or -1 with errno.
int bridge_connect_daemon(int cloexec);
