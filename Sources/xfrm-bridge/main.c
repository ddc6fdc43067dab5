// xfrm-bridge [-S PATH] [--share-natt-port] [--natt-port N] COMMAND [ARG...]: runs COMMAND with its NETLINK_XFRM
// sockets given to xfrmd instead of the kernel (LD_PRELOAD of libxfrmbridge.so, found beside this program). With
// --share-natt-port, COMMAND's UDP sockets on the NAT-T port (4500, or --natt-port N) share it with
// `xfrmd --share-natt-port`: IKE comes to COMMAND, ESP goes to the daemon. The daemon's socket is found as `xfrm` finds
// it: -S, else XFRMD_SOCKET, else /run/xfrmd.sock. Everything else COMMAND does (NETLINK_ROUTE, UDP, TUN) stays with
// the kernel. Exit status: COMMAND's; 1 with one line on stderr when xfrmd is not there or the library is missing.
#define _GNU_SOURCE
#include <errno.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static int usage(void) {
    fprintf(stderr, "usage: xfrm-bridge [-S PATH] [--share-natt-port] [--natt-port N] COMMAND [ARG...]\n");
    return 2;
}

int main(int argc, char **argv) {
    const char *path = NULL;
    const char *natt = NULL;  // the NAT-T port shared with xfrmd --share-natt-port
    int i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        if ((strcmp(argv[i], "-S") == 0 || strcmp(argv[i], "--socket") == 0) && i + 1 < argc) {
            path = argv[++i];
        } else if (strcmp(argv[i], "--share-natt-port") == 0) {
            natt = "4500";
        } else if (strcmp(argv[i], "--natt-port") == 0 && i + 1 < argc) {
            natt = argv[++i];
            if (atoi(natt) <= 0 || atoi(natt) > 65535) {
                fprintf(stderr, "xfrm-bridge: --natt-port must be a UDP port, got \"%s\"\n", natt);
                return 2;
            }
        } else if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            usage();
            return 0;
        } else if (strcmp(argv[i], "--") == 0) {
            i++;
            break;
        } else {
            fprintf(stderr, "xfrm-bridge: unknown option \"%s\"\n", argv[i]);
            return usage();
        }
    }
    if (i >= argc) return usage();
    if (path == NULL) path = getenv("XFRMD_SOCKET");
    if (path == NULL || *path == 0) path = "/run/xfrmd.sock";

    // The daemon must be there now: a command that cannot reach it would fail in its own words, later.
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof(a.sun_path)) {
        fprintf(stderr, "xfrm-bridge: socket path too long: %s\n", path);
        return 1;
    }
    strcpy(a.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
        fprintf(stderr, "xfrm-bridge: no xfrmd is running at %s (%s)\n", path, strerror(errno));
        return 1;
    }
    close(fd);

    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (n <= 0) {
        fprintf(stderr, "xfrm-bridge: cannot find its own path: %s\n", strerror(errno));
        return 1;
    }
    self[n] = 0;
    char lib[PATH_MAX + 32];
    snprintf(lib, sizeof(lib), "%s/libxfrmbridge.so", dirname(self));
    if (access(lib, R_OK) != 0) {
        fprintf(stderr, "xfrm-bridge: %s: %s\n", lib, strerror(errno));
        return 1;
    }
    const char *old = getenv("LD_PRELOAD");
    char *preload;
    if (old != NULL && *old != 0) {
        if (asprintf(&preload, "%s:%s", lib, old) < 0) return 1;
    } else {
        preload = lib;
    }
    setenv("LD_PRELOAD", preload, 1);
    setenv("XFRMD_SOCKET", path, 1);
    if (natt != NULL) setenv("XFRM_BRIDGE_NATT_PORT", natt, 1);
    execvp(argv[i], argv + i);
    fprintf(stderr, "xfrm-bridge: %s: %s\n", argv[i], strerror(errno));
    return 127;
}
