"""Edge cases against scapy, both directions: Ethernet trailers, IPv4 options,
IPv6 extension headers in transport mode, both inner families in one tunnel,
SA-file defaults, and sequence-number limits."""

import pytest
from scapy.layers.inet import ICMP, IP, UDP, IPOption_NOP, IPOption_Router_Alert
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop, RouterAlert
from scapy.packet import Raw

from esplib import (INNER4, INNER6, LINKTYPE_ETHERNET, assert_all_ok, decap_roundtrip, encap_roundtrip, esp_trailer,
                    gcm_esp_packet, inner_packets, make_params, run_esp_tool, scapy_encrypt)


def small_inners(version):
    """Packets short enough that an Ethernet frame needs padding to 60 bytes."""
    if version == 4:
        return [bytes(IP(src=INNER4[0], dst=INNER4[1]) / ICMP(seq=n)) for n in range(1, 4)]
    return [bytes(IPv6(src=INNER6[0], dst=INNER6[1], nh=17) / UDP(sport=1, dport=7777))]


@pytest.mark.parametrize("mode", ["transport4", "transport6", "tunnel4in4"])
@pytest.mark.parametrize("algo", ["null-sha1", "gcm128"])
def test_decap_ignores_ethernet_trailer(algo, mode, work):
    """IN.pcap frames with bytes after the IP packet (Ethernet padding/FCS): decap must go by the IP length."""
    p = make_params(algo, mode)
    inners = small_inners(p.mode.inner_version) + inner_packets(p.mode.inner_version, align=4, big=False)[:4]
    decap_roundtrip(p, inners, range(1, len(inners) + 1), work, linktype=LINKTYPE_ETHERNET,
                    eth_trailer=b"\0" * 6 + b"\xde\xad\xbe\xef")


@pytest.mark.parametrize("mode", ["transport4", "transport6", "tunnel4in4", "tunnel6in6"])
@pytest.mark.parametrize("algo", ["null-sha1", "gcm128", "cbc128-sha1"])
def test_encap_ignores_ethernet_trailer(algo, mode, work):
    """Inner packets in Ethernet frames with trailing padding: only the IP packet is protected."""
    p = make_params(algo, mode)
    inners = small_inners(p.mode.inner_version) + inner_packets(p.mode.inner_version, align=4, big=False)[:4]
    encap_roundtrip(p, inners, work, linktype=LINKTYPE_ETHERNET, eth_trailer=b"\0" * 6 + b"\xde\xad\xbe\xef")


def ipv4_with_options():
    src, dst = INNER4
    return [
        bytes(IP(src=src, dst=dst, options=[IPOption_Router_Alert()]) / UDP(sport=9, dport=7777) / Raw(b"ra")),
        bytes(IP(src=src, dst=dst, options=[IPOption_NOP()] * 3 + [IPOption_Router_Alert()])
              / ICMP(seq=7) / Raw(b"opts" * 5)),
        bytes(IP(src=src, dst=dst, options=[IPOption_NOP()] * 40) / UDP(sport=9, dport=7777)),  # IHL 15
    ]


def ipv6_with_hop_by_hop():
    src, dst = INNER6
    return [
        bytes(IPv6(src=src, dst=dst) / IPv6ExtHdrHopByHop(options=[RouterAlert()]) / UDP(sport=9, dport=7777)
              / Raw(b"hbh")),
        bytes(IPv6(src=src, dst=dst, hlim=3) / IPv6ExtHdrHopByHop() / UDP(sport=9, dport=7777) / Raw(b"x" * 33)),
    ]


@pytest.mark.parametrize("algo", ["gcm128", "cbc256-sha256"])
@pytest.mark.parametrize("natt", [False, True], ids=["esp", "natt"])
def test_transport_ipv4_options(algo, natt, work):
    """Transport mode keeps the IPv4 options in the header ESP follows (both directions)."""
    p = make_params(algo, "transport4", natt=(4500, 4500) if natt else None)
    inners = ipv4_with_options()
    decap_roundtrip(p, inners, range(1, len(inners) + 1), work / "a")
    encap_roundtrip(p, inners, work / "b")


@pytest.mark.parametrize("algo", ["gcm128", "cbc256-sha256"])
def test_transport_ipv6_hop_by_hop_encap(algo, work):
    """ESP goes after the Hop-by-Hop header (RFC 4303 3.1.1); the HbH next header becomes 50."""
    p = make_params(algo, "transport6")
    encap_roundtrip(p, ipv6_with_hop_by_hop(), work)


@pytest.mark.parametrize("algo", ["gcm128", "cbc256-sha256"])
def test_transport_ipv6_extension_headers_decap(algo, work):
    """scapy puts ESP after Hop-by-Hop (and after Destination Options with no Routing header,
    as Linux does); decap restores the next header in the last extension header and the payload length."""
    p = make_params(algo, "transport6")
    src, dst = INNER6
    inners = ipv6_with_hop_by_hop() + [
        bytes(IPv6(src=src, dst=dst) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / UDP(sport=9, dport=7777)
              / Raw(b"dst-opts")),
    ]
    decap_roundtrip(p, inners, range(1, len(inners) + 1), work)


@pytest.mark.parametrize("mode", ["tunnel4in4", "tunnel6in6"])
@pytest.mark.parametrize("algo", ["gcm128", "chacha", "cbc256-sha256"])
def test_tunnel_carries_both_families(algo, mode, work):
    """One tunnel SA carries IPv4 and IPv6 inner packets interleaved (next header 4 or 41 per packet)."""
    p = make_params(algo, mode)
    v4, v6 = inner_packets(4, align=4, big=False), inner_packets(6, align=4, big=False)
    inners = [x for pair in zip(v4, v6) for x in pair]
    decap_roundtrip(p, inners, range(1, len(inners) + 1), work / "a")
    encap_roundtrip(p, inners, work / "b")


def test_sa_file_defaults(work):
    """Only the required SA keys: seq starts at 1, the replay window is 32, no ESN."""
    p = make_params("gcm128", "tunnel4in4")
    minimal = {k: v for k, v in p.sa_json().items() if k in ("spi", "mode", "aead", "tunnel")}
    inners = inner_packets(4, align=4, big=False)[:3]
    res = run_esp_tool("encap", p, inners, work, name="enc", sa_override=minimal)
    assert_all_ok(res, p)
    assert [int.from_bytes(o[24:28], "big") for o in res.out_packets] == [1, 2, 3], res.explain()

    def enc(seq):
        return scapy_encrypt(p, inners[seq % 3], seq)

    res = run_esp_tool("decap", p, [enc(100), enc(68), enc(69), enc(69)], work, name="dec", sa_override=minimal)
    assert res.lines == ["ok", "drop replayTooOld", "ok", "drop replayDuplicate"], res.explain()


@pytest.mark.parametrize("algo", ["gcm128", "cbc256-sha256"])
def test_encap_refuses_to_wrap_a_32_bit_sequence_number(algo, work):
    """Without ESN the sender must not reuse a sequence number after 2^32-1 (RFC 4303 3.3.3)."""
    p = make_params(algo, "tunnel4in4", seq=0xFFFFFFFE)
    inners = inner_packets(4, align=4, big=False)[:4]
    res = run_esp_tool("encap", p, inners, work)
    assert res.lines[:2] == ["ok", "ok"], res.explain()
    assert all(ln.startswith("drop ") for ln in res.lines[2:]), (
        "after seq 0xffffffff the SA must stop sending, not wrap to 0\n" + res.explain())
    assert [int.from_bytes(o[24:28], "big") for o in res.out_packets] == [0xFFFFFFFE, 0xFFFFFFFF]


def test_decap_rejects_sequence_number_zero(work):
    """Seq 0 is never sent (the first packet is 1); like the kernel, a receiver without ESN drops it."""
    p = make_params("gcm128", "tunnel4in4")
    inner = inner_packets(4, align=4, big=False)[0]
    res = run_esp_tool("decap", p, [gcm_esp_packet(p, 0, esp_trailer(inner, 4)),
                                    gcm_esp_packet(p, 1, esp_trailer(inner, 4))], work)
    assert res.lines[0].startswith("drop "), "a packet with sequence number 0 was delivered\n" + res.explain()
    assert res.lines[1] == "ok", res.explain()
    assert res.out_packets == [inner]


@pytest.mark.parametrize("algo", ["gcm128", "cbc128-sha1"])
def test_natt_transport_behind_a_nat_gets_checksums_for_the_address_it_came_from(algo, work):
    """RFC 3948 §3.1.2: scapy, a peer behind a NAT, sums its TCP and UDP checksums over its private address and
    sends transport-mode ESP in UDP; the NAT rewrites the source. esp-tool's decapsulation delivers each segment
    with a checksum that verifies (as scapy computes it) over the address the packet arrived from, and every other
    byte as sent. A UDP datagram sent without a checksum keeps none."""
    from scapy.layers.inet import TCP

    p = make_params(algo, "transport4", natt=(4500, 4500))
    private, public, dst = "10.0.0.7", INNER4[0], INNER4[1]
    inners = [
        bytes(IP(src=private, dst=dst) / TCP(sport=40000, dport=443, flags="PA", seq=7) / Raw(b"behind a NAT" * 9)),
        bytes(IP(src=private, dst=dst) / UDP(sport=40000, dport=53) / Raw(b"query" * 7)),
        bytes(IP(src=private, dst=dst) / TCP(sport=40001, dport=22, flags="S")),
    ]
    no_checksum = IP(src=private, dst=dst) / UDP(sport=40002, dport=1701, chksum=0) / Raw(b"l2tp")
    inners.append(bytes(no_checksum))
    natted = []
    for i, inner in enumerate(inners):
        outer = IP(scapy_encrypt(p, inner, i + 1))
        outer.src = public  # the NAT
        del outer.chksum
        del outer[UDP].chksum  # the NAT recomputes the UDP checksum of the ESP-in-UDP datagram (or leaves 0)
        natted.append(bytes(outer))
    res = run_esp_tool("decap", p, natted, work, name="decap")
    assert_all_ok(res, p)
    for got, sent in zip(res.out_packets, inners):
        g, s = IP(got), IP(sent)
        assert g.src == public and g.dst == dst
        l4 = g[TCP] if TCP in g else g[UDP]
        if UDP in g and s[UDP].chksum == 0:
            assert l4.chksum == 0, "no checksum stays none"
        else:
            want = l4.chksum
            fresh = IP(bytes(g))
            del (fresh[TCP] if TCP in fresh else fresh[UDP]).chksum
            assert want == (IP(bytes(fresh))[TCP] if TCP in fresh else IP(bytes(fresh))[UDP]).chksum, \
                "the checksum verifies over the address the packet came from"
            assert want != (s[TCP] if TCP in s else s[UDP]).chksum, "test bug: the NAT changed nothing"
        assert bytes(l4.payload) == bytes((s[TCP] if TCP in s else s[UDP]).payload)
