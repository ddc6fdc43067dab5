"""Edges of xfrmd's I/O against the real kernel: a TUN packet larger than a packet buffer (without TUN offloads), and
the outer ECN field of ESP in UDP reaching the inner packet (RFC 6040), which the daemon's UDP socket must be asked
for (IP_RECVTOS / IPV6_RECVTCLASS)."""

import signal
import subprocess
import time

from daemonlib import Pair, run

TUN_BAD = 'xfrmd_datapath_packets_total{event="tun_bad"}'


def test_a_tun_packet_larger_than_a_buffer_is_counted_and_dropped_not_a_crash(tmp_path):
    # Without offloads every read is one packet into one packet buffer (3,840 bytes of room): the kernel's
    # tun_put_user answers a larger packet's whole length although it copied only the start.
    pair = Pair(tmp_path, daemon_args=["--no-tun-offload"])
    try:
        pair.configure(natt=True)
        pair.ip("a", "link", "set", "xfrm0", "mtu", "6000")
        before = pair.metrics("a").get(TUN_BAD, 0)
        pair.exec("a", "busybox", "ping", "-c", "1", "-W", "1", "-s", "5000", "-I", "10.0.1.1", "10.0.2.1",
                  check=False)
        time.sleep(0.3)
        assert all(p.poll() is None for p in pair.procs), "both daemons still run"
        after = pair.metrics("a")
        assert after.get(TUN_BAD, 0) >= before + 1, after
        # A packet that fits still goes through the tunnel (cut into outer fragments: no DF on busybox's ping).
        ping = pair.exec("a", "busybox", "ping", "-c", "2", "-W", "2", "-s", "3000", "-I", "10.0.1.1", "10.0.2.1",
                         check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        assert pair.metrics("a").get(TUN_BAD, 0) == after.get(TUN_BAD, 0)
    finally:
        pair.close()


CE_SENDER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("192.0.2.1", 4600))  # not xfrmd's port: a NAT-T peer seen at another port is still taken
s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, %(tos)d)  # the outer ECN field (and DSCP 0)
for esp in sys.argv[1:]:
    s.sendto(bytes.fromhex(esp), ("192.0.2.2", 4500))
"""


def esp_of_ect0_packets(count: int) -> list[str]:
    """ESP (no outer header) of the A → B SA (SPI 0x1001, key K1), sequence numbers 1..count, each carrying a UDP
    packet 10.0.1.1 → 10.0.2.1:9 marked ECT(0)."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.ipsec import ESP, SecurityAssociation
    from daemonlib import K1
    out = []
    for seq in range(1, count + 1):
        sa = SecurityAssociation(ESP, spi=0x1001, crypt_algo="AES-GCM", crypt_key=bytes.fromhex(K1[2:]), seq_num=seq,
                                 tunnel_header=IP(src="192.0.2.1", dst="192.0.2.2"))
        inner = IP(src="10.0.1.1", dst="10.0.2.1", tos=0x02) / UDP(sport=7, dport=9) / (b"ecn" * 10)
        out.append(bytes(sa.encrypt(inner))[20:].hex())
    return out


def test_a_ce_mark_on_the_outer_esp_in_udp_header_reaches_the_inner_packet(tmp_path):
    """RFC 6040 §4.2: an outer CE over an ECT(0) inner packet makes it CE. The outer header of ESP in UDP is the
    kernel's, so the daemon must ask its socket for it; before, every datagram was framed with TOS 0."""
    pair = Pair(tmp_path)
    try:
        pair.configure(natt=True)
        capture = tmp_path / "inner.pcap"
        dump = subprocess.Popen(["ip", "netns", "exec", pair.ns["b"], "tcpdump", "--immediate-mode", "-ni", "xfrm0",
                                 "-w", str(capture), "udp and dst port 9"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        packets = esp_of_ect0_packets(6)
        time.sleep(2.0)  # tcpdump listening
        pair.exec("a", "python3", "-c", CE_SENDER % {"tos": 0x03}, *packets[:3])  # CE on the path
        pair.exec("a", "python3", "-c", CE_SENDER % {"tos": 0x02}, *packets[3:])  # ECT(0): unchanged
        time.sleep(1.0)
        dump.send_signal(signal.SIGINT)
        dump.communicate(timeout=10)
        tos = [l.split("tos ")[1].split(",")[0] for l in run("tcpdump", "-vnr", str(capture)).stdout.splitlines()
               if "tos " in l]
        # The daemon may write each group of three as one coalesced packet (USO into the TUN): by group, in order.
        assert tos and tos == sorted(tos, reverse=True) and set(tos) == {"0x3", "0x2"}, tos
    finally:
        pair.close()
