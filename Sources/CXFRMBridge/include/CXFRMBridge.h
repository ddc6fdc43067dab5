// libxfrmbridge.so: an LD_PRELOAD library that hands a process's NETLINK_XFRM sockets to xfrmd (see bridge.c).
// It exports the libc socket calls it interposes and nothing else; there is no API to call.
#pragma once
