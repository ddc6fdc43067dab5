"""The outer side's details between two daemons: IKE on the NAT-T port relayed to a key manager (`--ike-port`), and
the outer TOS / traffic class (DSCP, ECN) on every kind of socket."""

import signal
import subprocess
import time

import pytest

from daemonlib import Pair, run, split_gso


KEY_MANAGER = """
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 5500)); s.settimeout(20)
for _ in range(2):
    data, relay = s.recvfrom(65536)
    ver, fam, pport, lport, _ = struct.unpack("!BBHHH", data[:8])
    n = 4 if fam == 4 else 16
    peer = socket.inet_ntop(socket.AF_INET if fam == 4 else socket.AF_INET6, data[8:8 + n])
    local = socket.inet_ntop(socket.AF_INET if fam == 4 else socket.AF_INET6, data[24:24 + n])
    print(ver, fam, peer, pport, local, lport, data[40:].decode(), flush=True)
    s.sendto(data[:40] + b"reply:" + data[40:], relay)
    # A datagram to the relay from any other port is not the key manager's: refused.
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(data[:40] + b"forged", relay)
"""

IKE_PEER = """
import socket, sys
for fam, me, them in [(socket.AF_INET, "192.0.2.2", "192.0.2.1"), (socket.AF_INET6, "2001:db8::2", "2001:db8::1")]:
    u = socket.socket(fam, socket.SOCK_DGRAM); u.bind((me, 4600)); u.settimeout(10)
    u.sendto(b"\\x00\\x00\\x00\\x00" + b"IKE_SA_INIT " + me.encode(), (them, 4500))
    data, src = u.recvfrom(65536)
    print(src[0], src[1], data[:4].hex(), data[4:].decode(), flush=True)
"""


def test_ike_on_the_nat_t_port_is_relayed_to_a_key_manager_and_its_replies_go_out_from_it(tmp_path):
    """`--ike-port 5500`: IKE (behind the non-ESP marker) arriving on port 4500 reaches a key manager on
    127.0.0.1:5500 with the peer's and our addresses and ports; its reply leaves from port 4500 to the peer with the
    marker back in front; a datagram to the relay from anyone else is refused and counted."""
    pair = Pair(tmp_path, daemon_args=["--ike-port", "5500"])
    try:
        km = subprocess.Popen(["ip", "netns", "exec", pair.ns["a"], "python3", "-c", KEY_MANAGER],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        peer = pair.exec("b", "python3", "-c", IKE_PEER, timeout=30)
        out, err = km.communicate(timeout=20)
        assert out.splitlines() == ["1 4 192.0.2.2 4600 192.0.2.1 4500 IKE_SA_INIT 192.0.2.2",
                                    "1 6 2001:db8::2 4600 2001:db8::1 4500 IKE_SA_INIT 2001:db8::2"], (out, err)
        assert peer.stdout.splitlines() == ["192.0.2.1 4500 00000000 reply:IKE_SA_INIT 192.0.2.2",
                                            "2001:db8::1 4500 00000000 reply:IKE_SA_INIT 2001:db8::2"], peer.stdout
        time.sleep(0.3)
        m = pair.metrics("a")
        assert m['xfrmd_datapath_packets_total{event="ike_relayed"}'] == 2, m
        assert m['xfrmd_datapath_packets_total{event="ike_replies"}'] == 2, m
        assert m['xfrmd_datapath_packets_total{event="ike_relay_errors"}'] == 2, m
        assert m['xfrmd_datapath_packets_total{event="ike_dropped"}'] == 0, m
    finally:
        pair.close()


TOS_SENDER = """
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
u = socket.socket(fam, socket.SOCK_DGRAM)
if fam == socket.AF_INET:
    u.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0xba)
else:
    u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, 0xba)
u.bind((sys.argv[1], 0))
for _ in range(3):
    u.sendto(b"dscp-ef-ect0", (sys.argv[2], 9))
"""


@pytest.mark.parametrize("outer6", [False, True], ids=["ipv4-outer", "ipv6-outer"])
@pytest.mark.parametrize("natt", [False, True], ids=["raw-esp", "nat-t"])
def test_the_outer_header_keeps_the_inner_dscp_and_ecn_on_every_socket(pair, tmp_path, natt, outer6):
    """Inner packets marked EF + ECT(0) (0xba) leave with 0xba in the outer TOS / traffic class (DSCP copied, ECN
    encapsulated as RFC 6040 and the kernel's xfrm tunnel output do), over raw ESP and ESP in UDP, IPv4 and IPv6:
    the sockets whose headers the kernel writes get it as a control message."""
    pair.configure(natt, outer6)
    capture = tmp_path / "veth.pcap"
    # Immediate mode: three packets must not wait in a capture block when tcpdump is stopped.
    dump = subprocess.Popen(["ip", "netns", "exec", pair.ns["b"], "tcpdump", "--immediate-mode", "-ni", pair.dev["b"],
                             "-w", str(capture), "esp or udp port 4500"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    time.sleep(1.0)
    pair.exec("a", "python3", "-c", TOS_SENDER, "10.0.1.1", "10.0.2.1")
    time.sleep(0.5)
    dump.send_signal(signal.SIGINT)
    dump.communicate(timeout=10)
    if natt:
        # Three equal datagrams to one peer leave as one UDP GSO send, which shares the TOS control message: cut it
        # back into its datagrams (each with the frame's outer header) to count them.
        split_gso(capture, tmp_path / "split.pcap")
        capture = tmp_path / "split.pcap"
    listing = run("tcpdump", "-vnr", str(capture)).stdout
    field = "class 0xba" if outer6 else "tos 0xba"
    assert listing.count(field) == 3, listing
