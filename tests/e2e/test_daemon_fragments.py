"""Outer fragmentation between two xfrmd daemons (RFC 4303 §3.3.5: ESP is fragmented after ESP processing;
RFC 791 §3.2, RFC 8200 §4.5): a UDP datagram sent without DF that fills the TUN's 1500-byte MTU no longer fits the
veth once it is inside ESP, so the sending daemon cuts the ESP packet into IPv4 fragments — or, over an IPv6 outer
path, IPv6 fragments, as Linux's IPv6 layer fragments the ESP packets xfrm6_prepare_output marks ignore_df — and the
receiving host's kernel puts them back together before the daemon decrypts. Checked independently of us: the peer's
kernel reassembles them (the echo comes back), and scapy reassembles the captured fragments itself and decrypts them
to the exact datagram."""

import signal
import subprocess
import time

import pytest
from scapy.layers.inet import IP, UDP, defragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, defragment6
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.utils import rdpcap

from daemonlib import K1, Pair

ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 10, 0)  # IP_MTU_DISCOVER = IP_PMTUDISC_DONT: sent without DF
s.bind(("10.0.2.1", 7000))
s.settimeout(30)
print("listening", flush=True)
for _ in range(int(sys.argv[1])):
    data, peer = s.recvfrom(65535)
    s.sendto(data, peer)
"""

CLIENT = r"""
import socket, sys
n, size = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 10, 0)
s.bind(("10.0.1.1", 0))
s.settimeout(5)
for i in range(n):
    payload = bytes((i * 31 + j) & 0xFF for j in range(size))
    s.sendto(payload, ("10.0.2.1", 7000))
    data, _ = s.recvfrom(65535)
    assert data == payload, f"echo {i} differs"
# A burst, large and small in turn, without waiting: the daemon's batches mix fragments and whole packets.
burst = int(sys.argv[3])
sent = set()
for i in range(n, n + burst):
    for p in (bytes((i * 31 + j) & 0xFF for j in range(size)), bytes([i]) * 100):
        s.sendto(p, ("10.0.2.1", 7000))
        sent.add(p)
got = set()
for _ in range(2 * burst):
    got.add(s.recvfrom(65535)[0])
assert got == sent, "every echo of the burst"
print("ok", flush=True)
"""

N, SIZE, BURST = 5, 1472, 8  # 1500-byte inner packets without DF; then 8 of them, each followed by a small one


def payload(i):
    return bytes((i * 31 + j) & 0xFF for j in range(SIZE))


@pytest.mark.parametrize("natt,mtu,offload,outer6", [(False, None, "software", False), (True, None, "software", False),
                                                     (True, 1280, "software", False), (True, None, "crypto", False),
                                                     (False, None, "software", True), (True, None, "software", True)],
                         ids=["raw-esp", "nat-t", "nat-t-outer-mtu-1280", "nat-t-crypto-offload", "ipv6-raw-esp",
                              "ipv6-nat-t"])
def test_a_packet_without_df_too_big_once_inside_esp_leaves_as_fragments_the_peer_reassembles(natt, mtu, offload,
                                                                                            outer6, tmp_path):
    # --outer-mtu: the daemons cut to a path smaller than the veth's 1500 bytes. With crypto offload (the daemons'
    # simulated NICs), the small packets are sealed by the NIC and the big ones in software, then cut (as Linux's
    # xfrm_dev_offload_ok refuses the device a packet ESP would make too big for the MTU).
    args = ["--outer-mtu", str(mtu)] if mtu else []
    if offload != "software":
        args += ["--offload", offload]
    pair = Pair(tmp_path, daemon_args=args)
    try:
        run_case(pair, natt, mtu or 1500, tmp_path, offload, outer6)
    finally:
        pair.close()


def run_case(pair, natt, mtu, tmp_path, offload, outer6):
    pair.configure(natt, outer6=outer6, offload=offload)
    for side in "ab":
        pair.ip(side, "link", "set", "xfrm0", "mtu", "1500")
    capture = tmp_path / "veth.pcap"
    # Every packet of the exchange, counted: each way N + BURST datagrams in two fragments and BURST small ones.
    # tcpdump stops by itself once it has them all (-c), so none is left unread in its ring on a loaded machine.
    expected = 2 * (2 * (N + BURST) + BURST)
    dump = subprocess.Popen(["ip", "netns", "exec", pair.ns["b"], "tcpdump", "--immediate-mode", "-U", "-B", "16384",
                             "-c", str(expected), "-ni", pair.dev["b"], "-w", str(capture),
                             # IPv6: the tunnel's packets, not the link's MLD and neighbour discovery (ICMPv6
                             # errors stay: they fail the test's protocol checks)
                             "ip6 and src net 2001:db8::/64 and dst net 2001:db8::/64 and "
                             "not (icmp6 and ip6[40] >= 133 and ip6[40] <= 137)"
                             if outer6 else "ip"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    server = subprocess.Popen(["ip", "netns", "exec", pair.ns["b"], "python3", "-c", ECHO, str(N + 2 * BURST)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "listening"
        time.sleep(1.0)  # tcpdump is capturing
        client = pair.exec("a", "python3", "-c", CLIENT, str(N), str(SIZE), str(BURST), check=False)
        assert client.returncode == 0 and client.stdout.strip() == "ok", client.stderr
    finally:
        server.kill()
        server.communicate()
        try:
            dump.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            dump.send_signal(signal.SIGINT)
            _, err = dump.communicate(timeout=10)
            raise AssertionError(f"tcpdump saw fewer than the {expected} packets of the exchange: {err}")

    # Both daemons cut every datagram (the request on A, the echo on B) into two fragments, and none failed.
    for side in "ab":
        m = pair.metrics(side)
        assert m['xfrmd_datapath_packets_total{event="fragmented"}'] == N + BURST, (side, m)
        assert m['xfrmd_datapath_packets_total{event="fragments_created"}'] == 2 * (N + BURST), (side, m)
        assert m['xfrmd_datapath_packets_total{event="fragment_failed"}'] == 0, (side, m)
        stats = {k: v for k, v in m.items() if k.startswith("xfrm_stat_total{") and v}
        assert not stats, (side, stats)
        if offload == "crypto":  # the NIC sealed the small ones (and its first echo requests), software the rest
            dev = {k.split('counter="')[1].rstrip('"}'): v for k, v in m.items() if k.startswith("xfrmd_device_total{")}
            assert dev["crypto_tx"] >= BURST and dev["tx_dropped"] == 0, (side, dev)

    # On the wire: only fragments, each at most the veth's 1500 bytes, none in clear; scapy reassembles A's and
    # decrypts each to the exact datagram sent.
    src, dst = ("2001:db8::1", "2001:db8::2") if outer6 else ("192.0.2.1", "192.0.2.2")
    L3 = IPv6 if outer6 else IP
    packets = [p for p in rdpcap(str(capture)) if L3 in p]
    if outer6:
        frags = [p for p in packets if IPv6ExtHdrFragment in p]
        firsts = [p for p in packets if IPv6ExtHdrFragment not in p or p[IPv6ExtHdrFragment].offset == 0]
        assert all(len(p[IPv6]) <= mtu for p in frags)
        assert all(p[IPv6].nh == 44 and p[IPv6ExtHdrFragment].nh == (17 if natt else 50) for p in frags)
        assert all(p[IPv6].nh == (17 if natt else 50) for p in packets if IPv6ExtHdrFragment not in p)
        # Each packet's pieces share an identification that no other packet has (RFC 8200 §4.5).
        ids = {}
        for p in frags:
            ids.setdefault((p[IPv6].src, p[IPv6ExtHdrFragment].id), []).append(p)
        assert all(len(v) == 2 for v in ids.values()), {k: len(v) for k, v in ids.items()}
    else:
        frags = [p for p in packets if p[IP].flags.MF or p[IP].frag]
        firsts = [p for p in packets if p[IP].frag == 0]
        assert all(len(p[IP]) <= mtu and not p[IP].flags.DF for p in frags)
        assert all(p[IP].proto == (17 if natt else 50) for p in packets)
    assert len(frags) == 4 * (N + BURST), [p.summary() for p in packets]
    assert all({p[L3].src, p[L3].dst} == {src, dst} for p in packets), "only the tunnel's outer packets"
    if natt:
        assert all(p[UDP].sport == 4500 and p[UDP].dport == 4500 for p in firsts)
    # In the order A's SA numbered them: fragments never overtake, nor are overtaken by, whole packets.
    seqs = []
    for p in firsts:
        if p[L3].src == src:
            esp = bytes((p[IPv6ExtHdrFragment] if IPv6ExtHdrFragment in p else p[L3]).payload)[8 if natt else 0:]
            seqs.append(int.from_bytes(esp[4:8], "big"))
    # (With crypto offload the simulated NIC's engine thread sends what it sealed beside the host's own sends, so
    # only the set is checked; the peer's replay window takes the difference, and every echo came back.)
    assert len(set(seqs)) == len(seqs) == N + 2 * BURST and (offload != "software" or seqs == sorted(seqs)), seqs
    from_a = [p for p in packets if p[L3].src == src]
    if outer6:
        whole, groups = [], {}
        for p in from_a:
            if IPv6ExtHdrFragment in p:
                groups.setdefault(p[IPv6ExtHdrFragment].id, []).append(p)
                if len(groups[p[IPv6ExtHdrFragment].id]) == 2:
                    whole.append(defragment6(groups[p[IPv6ExtHdrFragment].id]))
            else:
                whole.append(p[IPv6])
        from_a = whole
    else:
        from_a = defragment(from_a)
    assert len(from_a) == N + 2 * BURST
    sa = SecurityAssociation(ESP, spi=0x1001, crypt_algo="AES-GCM", crypt_key=bytes.fromhex(K1[2:]),
                             tunnel_header=L3(src=src, dst=dst),
                             **({"nat_t_header": UDP(sport=4500, dport=4500)} if natt else {}))
    for i, p in enumerate(from_a[:N]):
        outer = L3(bytes(p[L3]))
        if outer6:
            assert IPv6ExtHdrFragment not in outer and len(outer) > mtu
        else:
            assert outer.flags.MF == 0 and outer.frag == 0 and len(outer) > mtu
        inner = sa.decrypt(outer)
        assert inner[IP].src == "10.0.1.1" and inner[IP].dst == "10.0.2.1" and not inner[IP].flags.DF
        assert bytes(inner[UDP].payload) == payload(i), f"datagram {i}"
