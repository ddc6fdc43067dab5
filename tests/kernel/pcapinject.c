/* pcapinject IFNAME DSTMAC SRCMAC FILE.pcap (or: pcapinject -l PORT, -u SRC DST SIZE COUNT, below): sends every packet of a pcap out of IFNAME through an AF_PACKET
 * socket, as tcpreplay would (the guest has no tcpreplay and busybox cannot write raw frames). Ethernet pcaps
 * (linktype 1) go out as they are; raw IP pcaps (linktype 101, what `xfrm pcap` writes) get an Ethernet header
 * DSTMAC <- SRCMAC with the IP version's ethertype. Built statically by the kernel test harness and run inside the
 * qemu guest; prints the number of frames sent. */
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int parse_mac(const char *s, uint8_t mac[6]) {
    unsigned v[6];
    if (sscanf(s, "%x:%x:%x:%x:%x:%x", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5]) != 6) return -1;
    for (int i = 0; i < 6; i++) mac[i] = (uint8_t)v[i];
    return 0;
}

/* pcapinject -l PORT: holds an IPv4 UDP socket on PORT with UDP_ENCAP_ESPINUDP set (what an IKE daemon does for
 * NAT-T), so that the kernel decapsulates ESP in UDP arriving there; sleeps until killed. */
static int listen_encap(const char *port) {
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0) { perror("socket"); return 1; }
    struct sockaddr_in sin;
    memset(&sin, 0, sizeof sin);
    sin.sin_family = AF_INET;
    sin.sin_port = htons((uint16_t)atoi(port));
    if (bind(s, (struct sockaddr *)&sin, sizeof sin) < 0) { perror("bind"); return 1; }
    int type = 2; /* UDP_ENCAP_ESPINUDP */
    if (setsockopt(s, 17 /* SOL_UDP */, 100 /* UDP_ENCAP */, &type, sizeof type) < 0) {
        perror("setsockopt UDP_ENCAP");
        return 1;
    }
    printf("pcapinject: UDP_ENCAP_ESPINUDP socket on port %s\n", port);
    fflush(stdout);
    for (;;) pause();
}

/* pcapinject -u SRC DST SIZE COUNT: sends COUNT IPv4 UDP datagrams of SIZE bytes (the whole IP packet) from SRC to
 * DST port 9, with IP_PMTUDISC_OMIT: the kernel sizes them by the device's MTU, not the IPsec route's, and sends
 * them without DF, so that xfrm seals each whole and ESP leaves too big for the path: the outer packet is cut (for
 * IPv6, ip6_fragment on the ignore_df packet xfrm6_prepare_output made). Busybox's ping has no -M. */
static int send_udp(const char *src, const char *dst, const char *size, const char *count) {
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0) { perror("socket"); return 1; }
    int omit = 5; /* IP_PMTUDISC_OMIT: no DF, sized by the device (PROBE would set DF) */
    if (setsockopt(s, IPPROTO_IP, 10 /* IP_MTU_DISCOVER */, &omit, sizeof omit) < 0) {
        perror("setsockopt IP_MTU_DISCOVER");
        return 1;
    }
    struct sockaddr_in me, to;
    memset(&me, 0, sizeof me);
    memset(&to, 0, sizeof to);
    me.sin_family = to.sin_family = AF_INET;
    to.sin_port = htons(9);
    if (inet_pton(AF_INET, src, &me.sin_addr) != 1 || inet_pton(AF_INET, dst, &to.sin_addr) != 1) {
        fprintf(stderr, "pcapinject: bad address\n");
        return 2;
    }
    if (bind(s, (struct sockaddr *)&me, sizeof me) < 0) { perror("bind"); return 1; }
    int n = atoi(size) - 28, sent = 0;
    if (n < 0 || n > 65000) { fprintf(stderr, "pcapinject: bad size\n"); return 2; }
    static unsigned char payload[65536];
    for (int i = 0; i < atoi(count); i++) {
        for (int j = 0; j < n; j++) payload[j] = (unsigned char)(i * 31 + j);
        if (sendto(s, payload, (size_t)n, 0, (struct sockaddr *)&to, sizeof to) == n) sent++;
        else perror("sendto");
        usleep(100000);
    }
    printf("pcapinject: %d datagrams sent\n", sent);
    return sent == atoi(count) ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "-l") == 0) return listen_encap(argv[2]);
    if (argc == 6 && strcmp(argv[1], "-u") == 0) return send_udp(argv[2], argv[3], argv[4], argv[5]);
    if (argc != 5) {
        fprintf(stderr, "usage: pcapinject IFNAME DSTMAC SRCMAC FILE.pcap\n");
        return 2;
    }
    uint8_t dst[6], src[6];
    if (parse_mac(argv[2], dst) || parse_mac(argv[3], src)) {
        fprintf(stderr, "pcapinject: bad MAC address\n");
        return 2;
    }
    FILE *f = fopen(argv[4], "rb");
    if (!f) { perror(argv[4]); return 1; }
    uint32_t gh[6];
    if (fread(gh, 4, 6, f) != 6) { fprintf(stderr, "pcapinject: short pcap header\n"); return 1; }
    int swap = 0;
    if (gh[0] == 0xd4c3b2a1u) swap = 1;
    else if (gh[0] != 0xa1b2c3d4u) { fprintf(stderr, "pcapinject: not a microsecond pcap\n"); return 1; }
    uint32_t link = swap ? __builtin_bswap32(gh[5]) : gh[5];
    if (link != 1 && link != 101) { fprintf(stderr, "pcapinject: linktype %u unsupported\n", link); return 1; }
    int ifindex = (int)if_nametoindex(argv[1]);
    if (!ifindex) { perror(argv[1]); return 1; }
    int s = socket(AF_PACKET, SOCK_RAW, 0);
    if (s < 0) { perror("socket"); return 1; }
    struct sockaddr_ll sll;
    memset(&sll, 0, sizeof sll);
    sll.sll_family = AF_PACKET;
    sll.sll_ifindex = ifindex;
    sll.sll_halen = 6;
    memcpy(sll.sll_addr, dst, 6);
    static uint8_t frame[65536 + 14];
    int sent = 0;
    for (;;) {
        uint32_t rh[4];
        if (fread(rh, 4, 4, f) != 4) break;
        uint32_t incl = swap ? __builtin_bswap32(rh[2]) : rh[2];
        if (incl > 65535) { fprintf(stderr, "pcapinject: record too long\n"); return 1; }
        size_t off = 0;
        if (link == 101) {
            off = 14;
        }
        if (fread(frame + off, 1, incl, f) != incl) { fprintf(stderr, "pcapinject: truncated record\n"); return 1; }
        if (link == 101) {
            memcpy(frame, dst, 6);
            memcpy(frame + 6, src, 6);
            uint16_t type = (incl > 0 && (frame[14] >> 4) == 6) ? ETH_P_IPV6 : ETH_P_IP;
            frame[12] = (uint8_t)(type >> 8);
            frame[13] = (uint8_t)type;
        }
        if (sendto(s, frame, off + incl, 0, (struct sockaddr *)&sll, sizeof sll) < 0) {
            perror("sendto");
            return 1;
        }
        sent++;
    }
    printf("pcapinject: %d frames sent on %s\n", sent, argv[1]);
    return 0;
}
