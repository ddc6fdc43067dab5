"""`xfrm pcap` end to end, with scapy as the independent peer on the other side of the wire.

Output path: inner packets → the offline stack's OUT policy and SA → OUT.pcap → scapy decrypts each one back
to the exact inner packet. Input path: scapy encrypts → IN.pcap → the stack decrypts and checks its IN policy →
OUT.pcap holds the exact inner packets; traffic the policy forbids never comes out.
"""

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.packet import Raw

from xfrmlib import SUITES, parse_ip, read_raw_pcap, scapy_sa, write_raw_pcap

V4 = dict(outer=("192.0.2.1", "192.0.2.2"), lan_a="10.0.1.0/24", lan_b="10.0.2.0/24", a="10.0.1.1", b="10.0.2.1",
          plen=24, host=32)
V6 = dict(outer=("2001:db8::1", "2001:db8::2"), lan_a="2001:db8:a::/64", lan_b="2001:db8:b::/64",
          a="2001:db8:a::1", b="2001:db8:b::1", plen=64, host=128)


def inner_packets(fam, n=6):
    out = []
    for i in range(n):
        payload = bytes((i * 7 + j) & 0xFF for j in range(i * 37))
        if fam is V4:
            l4 = [ICMP(type=8, id=1, seq=i), UDP(sport=1000 + i, dport=53), TCP(sport=2000, dport=80, flags="S")][i % 3]
            out.append(bytes(IP(src=fam["a"], dst=fam["b"], ttl=64, id=100 + i) / l4 / Raw(payload)))
        else:
            l4 = [ICMPv6EchoRequest(id=1, seq=i), UDP(sport=1000 + i, dport=53), TCP(sport=2000, dport=80)][i % 3]
            out.append(bytes(IPv6(src=fam["a"], dst=fam["b"], hlim=64) / l4 / Raw(payload)))
    return out


def setup_lines(fam, suite, mode, spi, direction, natt, outer_fam=None):
    outer = (outer_fam or fam)["outer"]
    o_plen = (outer_fam or fam)["plen"]
    src, dst = outer
    me = src if direction == "out" else dst
    lines = [
        "link add eth0 type dummy",
        "link set eth0 up",
        f"addr add {me}/{o_plen} dev eth0",
    ]
    if direction == "out":
        via = f" via {dst}" if (":" in dst) == (":" in fam["b"]) else ""
        lines.append(f"route add {fam['lan_b']} dev eth0{via}")
        if mode == "transport":
            lines[2] = f"addr add {fam['a']}/{fam['plen']} dev eth0"
            lines[3] = f"route add {fam['lan_b']} dev eth0"
    else:
        lines.append(f"link add lan0 type dummy")
        lines.append("link set lan0 up")
        lines.append(f"addr add {fam['b']}/{fam['plen']} dev lan0")
    encap = " encap espinudp 4500 4500 0.0.0.0" if natt else ""
    if outer_fam is not None and outer_fam is not fam:
        # As with the kernel, an SA's selector defaults to the outer family: cross-family tunnels name theirs.
        any_inner = "0.0.0.0/0" if fam is V4 else "::/0"
        encap += f" sel src {any_inner} dst {any_inner}"
    if mode == "tunnel":
        lines.append(f"xfrm state add src {src} dst {dst} proto esp spi {spi:#x} reqid 7 mode tunnel "
                     f"{suite.xfrm_algo} replay-window 32{encap}")
        tmpl = f"tmpl src {src} dst {dst} proto esp reqid 7 mode tunnel"
    else:
        lines.append(f"xfrm state add src {fam['a']} dst {fam['b']} proto esp spi {spi:#x} reqid 7 mode transport "
                     f"{suite.xfrm_algo} replay-window 32{encap}")
        tmpl = "tmpl proto esp reqid 7 mode transport"
    lines.append(f"xfrm policy add src {fam['lan_a']} dst {fam['lan_b']} dir {direction} {tmpl}")
    return "\n".join(lines) + "\n"


CASES = [
    ("gcm128", "tunnel", V4, V4, False),
    ("gcm256", "tunnel", V6, V6, False),
    ("chacha", "tunnel", V4, V6, False),
    ("cbc-sha256", "tunnel", V6, V4, False),
    ("gcm128", "transport", V4, None, False),
    ("cbc-sha256", "transport", V6, None, False),
    ("gcm128", "tunnel", V4, V4, True),
    ("chacha", "transport", V4, None, True),
]


@pytest.mark.parametrize("suite,mode,fam,outer_fam,natt", CASES)
def test_output_path_decrypts_in_scapy(tmp_path, xfrm, suite, mode, fam, outer_fam, natt):
    s = SUITES[suite]
    (tmp_path / "setup").write_text(setup_lines(fam, s, mode, 0x3000, "out", natt, outer_fam))
    inners = inner_packets(fam)
    write_raw_pcap(tmp_path / "in.pcap", inners)
    xfrm("pcap", "--batch", "setup", "--output-path", "in.pcap", "out.pcap")
    out = read_raw_pcap(tmp_path / "out.pcap")
    assert len(out) == len(inners)
    tunnel = (outer_fam or fam)["outer"] if mode == "tunnel" else None
    sa = scapy_sa(s, 0x3000, tunnel, natt)
    for i, (wire, inner) in enumerate(zip(out, inners)):
        pkt = parse_ip(wire)
        if natt:
            assert pkt.haslayer(UDP) and pkt[UDP].dport == 4500
        got = sa.decrypt(parse_ip(wire))
        if mode == "tunnel":
            assert bytes(got) == inner, f"packet {i}"
        else:
            assert bytes(got[1:]) == bytes(parse_ip(inner)[1:]), f"packet {i}: payload"
            assert got.src == parse_ip(inner).src and got.dst == parse_ip(inner).dst


@pytest.mark.parametrize("suite,fam,outer_fam,tfcpad,mtu,natt", [
    ("gcm128", V4, V4, 400, 1500, False), ("cbc-sha256", V6, V6, 400, 1500, False),
    ("chacha", V4, V6, 65535, 1400, False), ("cbc-sha256", V6, V4, 65535, 1281, False),
    ("gcm128", V4, V4, 65535, 1333, True)],
    ids=["gcm128-4in4", "cbc-sha256-6in6", "chacha-4in6-mtu", "cbc-6in4-mtu", "gcm128-nat-t-mtu"])
def test_output_path_pads_to_tfcpad_and_scapy_decrypts_the_inner_packet_then_zeros(tmp_path, xfrm, suite, fam,
                                                                                  outer_fam, tfcpad, mtu, natt):
    """A tunnel SA with `tfcpad` (RFC 4303 §2.4 traffic flow confidentiality padding, XFRMA_TFCPAD) follows each
    shorter inner packet with zeros up to it, inside the encryption and before ESP's padding, but never past the
    largest inner packet the path's MTU takes (esp_output: min(tfcpad, xfrm_state_mtu)): every packet of the run
    leaves the same length, and scapy's decryption gives the exact inner packet followed by zeros."""
    s = SUITES[suite]
    setup = setup_lines(fam, s, "tunnel", 0x3000, "out", natt, outer_fam)
    assert setup.count("replay-window 32") == 1
    setup = setup.replace("replay-window 32", f"replay-window 32 tfcpad {tfcpad}") + f"link set eth0 mtu {mtu}\n"
    (tmp_path / "setup").write_text(setup)
    (tmp_path / "after").write_text("-s state list\n")
    inners = inner_packets(fam)
    write_raw_pcap(tmp_path / "in.pcap", inners)
    _, listing, _ = xfrm("pcap", "--batch", "setup", "--then", "after", "--output-path", "in.pcap", "out.pcap")
    assert f"tfcpad {tfcpad}" in listing, listing
    out = read_raw_pcap(tmp_path / "out.pcap")
    assert len(out) == len(inners)
    assert len({len(w) for w in out}) == 1, f"the lengths differ: {[len(w) for w in out]}"
    assert len(out[0]) <= mtu
    sa = scapy_sa(s, 0x3000, outer_fam["outer"], natt)
    padded = set()
    for i, (wire, inner) in enumerate(zip(out, inners)):
        plain = bytes(sa.decrypt(parse_ip(wire)))
        assert plain[:len(inner)] == inner, f"packet {i}: the inner packet"
        assert plain[len(inner):] == bytes(len(plain) - len(inner)), f"packet {i}: TFC padding is zeros"
        padded.add(len(plain))
    assert len(padded) == 1, padded
    if tfcpad < mtu:
        assert padded == {tfcpad}
    else:  # capped: the next block of plaintext would not fit the MTU any more
        assert len(out[0]) > mtu - (16 if "cbc" in suite else 4), (len(out[0]), mtu)


@pytest.mark.parametrize("suite,mode,fam,outer_fam,natt", CASES)
def test_input_path_accepts_scapy_and_restores_inner(tmp_path, xfrm, suite, mode, fam, outer_fam, natt):
    s = SUITES[suite]
    (tmp_path / "setup").write_text(setup_lines(fam, s, mode, 0x4000, "in", natt, outer_fam))
    (tmp_path / "after").write_text("stat\n")
    inners = inner_packets(fam)
    tunnel = (outer_fam or fam)["outer"] if mode == "tunnel" else None
    sa = scapy_sa(s, 0x4000, tunnel, natt)
    wires = [bytes(sa.encrypt(parse_ip(p))) for p in inners]
    # A clear packet the IN policy says must be protected, and a replay of the first ESP packet.
    wires.append(inners[0])
    wires.append(wires[0])
    write_raw_pcap(tmp_path / "in.pcap", wires)
    _, stdout, _ = xfrm("pcap", "--batch", "setup", "--then", "after", "--input-path", "--dev", "eth0",
                        "in.pcap", "out.pcap")
    out = read_raw_pcap(tmp_path / "out.pcap")
    assert len(out) == len(inners), "the clear packet and the replay must not be delivered"
    for i, (got, inner) in enumerate(zip(out, inners)):
        if mode == "tunnel":
            assert got == inner, f"packet {i}"
        else:
            assert bytes(parse_ip(got)) == bytes(parse_ip(inner)), f"packet {i}"
    stats = dict(line.split() for line in stdout.splitlines() if line.startswith("Xfrm"))
    assert stats["XfrmInTmplMismatch"] == "1"
    assert stats["XfrmInStateSeqError"] == "1"


@pytest.mark.parametrize("fam", [V4, V6], ids=["ipv4", "ipv6"])
def test_tunnel_pmtu_answers_with_an_icmp_error_scapy_accepts(tmp_path, xfrm, fam):
    """DF (IPv4) or any IPv6 packet too big for the tunnel: an ICMP error to the sender carrying the usable MTU."""
    from scapy.layers.inet import ICMP, IPerror
    from scapy.layers.inet6 import ICMPv6PacketTooBig

    s = SUITES["gcm128"]
    (tmp_path / "setup").write_text(setup_lines(fam, s, "tunnel", 0x3000, "out", False) + "link set eth0 mtu 1400\n")
    if fam is V4:
        big = IP(src=fam["a"], dst=fam["b"], flags="DF") / UDP(sport=1, dport=2) / Raw(b"x" * 1400)
    else:
        big = IPv6(src=fam["a"], dst=fam["b"]) / UDP(sport=1, dport=2) / Raw(b"x" * 1400)
    write_raw_pcap(tmp_path / "in.pcap", [bytes(big)])
    xfrm("pcap", "--batch", "setup", "--output-path", "in.pcap", "out.pcap")
    out = read_raw_pcap(tmp_path / "out.pcap")
    assert len(out) == 1
    err = parse_ip(out[0])
    assert err.dst == fam["a"]
    if fam is V4:
        icmp = err[ICMP]
        assert (icmp.type, icmp.code) == (3, 4)
        mtu = icmp.nexthopmtu
        fresh = IP(bytes(err))
        del fresh[ICMP].chksum
        assert IP(bytes(fresh))[ICMP].chksum == icmp.chksum, "ICMP checksum"
    else:
        ptb = err[ICMPv6PacketTooBig]
        mtu = ptb.mtu
        rebuilt = IPv6(bytes(err))
        want = rebuilt[ICMPv6PacketTooBig].cksum
        del rebuilt[ICMPv6PacketTooBig].cksum
        assert IPv6(bytes(rebuilt))[ICMPv6PacketTooBig].cksum == want, "ICMPv6 checksum"
    # The reported MTU is the largest inner packet that still fits 1400 bytes after ESP.
    assert 1300 < mtu < 1400 - 20
    fits = (IP(src=fam["a"], dst=fam["b"], flags="DF") if fam is V4 else IPv6(src=fam["a"], dst=fam["b"])) / UDP(
        sport=1, dport=2)
    fits = fits / Raw(b"y" * (mtu - len(bytes(fits))))
    write_raw_pcap(tmp_path / "fit.pcap", [bytes(fits)])
    xfrm("pcap", "--batch", "setup", "--output-path", "fit.pcap", "fit-out.pcap")
    wire = read_raw_pcap(tmp_path / "fit-out.pcap")
    assert len(wire) == 1 and len(wire[0]) <= 1400 and parse_ip(wire[0]).dst != fam["a"]


@pytest.mark.parametrize("mode,natt", [("tunnel", False), ("tunnel", True), ("transport", False)],
                         ids=["tunnel", "tunnel-nat-t", "transport"])
def test_output_path_cuts_esp_without_df_into_fragments_scapy_reassembles_and_decrypts(tmp_path, xfrm, mode, natt):
    """IPv4 without DF that ESP makes larger than the interface's MTU leaves as fragments (RFC 4303 §3.3.5, after
    ESP; RFC 791 §3.2): scapy's own reassembly and decryption give back each inner packet; what fits is not cut."""
    from scapy.layers.inet import defragment

    s = SUITES["gcm128"]
    (tmp_path / "setup").write_text(setup_lines(V4, s, mode, 0x3000, "out", natt) + "link set eth0 mtu 1280\n")
    sizes = [1000, 1250, 1400, 2500, 3000]
    inners = [bytes(IP(src=V4["a"], dst=V4["b"], id=500 + i, flags=0) / UDP(sport=1000 + i, dport=53)
                    / Raw(bytes((i + j) & 0xFF for j in range(n - 28)))) for i, n in enumerate(sizes)]
    write_raw_pcap(tmp_path / "in.pcap", inners)
    xfrm("pcap", "--batch", "setup", "--output-path", "in.pcap", "out.pcap")
    wire = [parse_ip(w) for w in read_raw_pcap(tmp_path / "out.pcap")]
    assert all(len(w) <= 1280 and not w.flags.DF for w in wire)
    frags = [w for w in wire if w.flags.MF or w.frag]
    assert len(wire) > len(inners) and len(frags) == len(wire) - 1, "all but the 1000-byte packet are cut"
    assert all(w.proto == (17 if natt else 50) for w in wire)
    whole = defragment(wire)
    assert len(whole) == len(inners)
    sa = scapy_sa(s, 0x3000, V4["outer"] if mode == "tunnel" else None, natt)
    for i, (w, inner) in enumerate(zip(whole, inners)):
        got = sa.decrypt(IP(bytes(w)))
        if mode == "tunnel":
            assert bytes(got) == inner, f"packet {i}"
        else:
            assert bytes(got[UDP]) == bytes(parse_ip(inner)[UDP]), f"packet {i}"


def input_path_gives_back(tmp_path, xfrm, wires: list[bytes], inners: list[bytes]):
    """Runs `wires` through the input path of eth0 with the SAs of `setup`: exactly `inners` come out, and the
    `stat` listing after shows every xfrm_stat counter at 0."""
    (tmp_path / "after").write_text("stat\n")
    write_raw_pcap(tmp_path / "in.pcap", wires)
    _, stdout, _ = xfrm("pcap", "--batch", "setup", "--then", "after", "--input-path", "--dev", "eth0",
                        "in.pcap", "out.pcap")
    assert read_raw_pcap(tmp_path / "out.pcap") == inners
    stats = dict(line.split() for line in stdout.splitlines() if line.startswith("Xfrm"))
    assert stats and all(v == "0" for v in stats.values()), stats


def test_input_path_reassembles_fragments_scapy_cut_before_esp_and_drops_overlaps(tmp_path, xfrm):
    """ESP that scapy encrypted and then cut into IPv4 fragments (its own `fragment`), in any order, is put back
    together before ESP (RFC 4303 §3.4.1) and gives the exact inner packet; a datagram with an overlapping fragment
    is discarded whole (RFC 5722's rule, as Linux applies to IPv4)."""
    from scapy.layers.inet import fragment

    s = SUITES["gcm128"]
    (tmp_path / "setup").write_text(setup_lines(V4, s, "tunnel", 0x4000, "in", False))
    sa = scapy_sa(s, 0x4000, V4["outer"], False)
    inners = [bytes(IP(src=V4["a"], dst=V4["b"], id=900 + i, flags=0) / UDP(sport=5000 + i, dport=53)
                    / Raw(bytes((7 * i + j) & 0xFF for j in range(n)))) for i, n in enumerate([1200, 2500, 3000])]
    wires = []
    for i, inner in enumerate(inners):
        esp = IP(bytes(sa.encrypt(parse_ip(inner))))
        esp.id = 4000 + i
        pieces = [bytes(f) for f in fragment(esp, fragsize=800)]
        assert len(pieces) >= 2
        wires += pieces[::-1] if i % 2 else pieces
    # A fourth datagram whose second fragment overlaps its first by eight bytes: never delivered.
    bad = IP(bytes(sa.encrypt(parse_ip(inners[0]))))
    bad.id = 4999
    first, second = [IP(bytes(f)) for f in fragment(bad, fragsize=800)][:2]
    second.frag -= 1
    del second.chksum
    wires += [bytes(first), bytes(second)]
    input_path_gives_back(tmp_path, xfrm, wires, inners)


def ipv6_pieces_joined(wire: list[bytes]) -> list:
    """The IPv6 packets of `wire`, fragments joined by scapy's defragment6 (each group by identification, in the
    order its last piece came), whole packets as they are."""
    from scapy.layers.inet6 import IPv6ExtHdrFragment, defragment6

    out, groups = [], {}
    for w in wire:
        p = IPv6(w)
        if IPv6ExtHdrFragment not in p:
            out.append(p)
            continue
        g = groups.setdefault(p[IPv6ExtHdrFragment].id, [])
        g.append(p)
        if sum(len(bytes(q[IPv6ExtHdrFragment].payload)) for q in g) == max(
                q[IPv6ExtHdrFragment].offset * 8 + len(bytes(q[IPv6ExtHdrFragment].payload)) for q in g) and any(
                q[IPv6ExtHdrFragment].m == 0 for q in g):
            out.append(IPv6(bytes(defragment6(g))))
    return out


@pytest.mark.parametrize("fam", [V4, V6], ids=["4in6", "6in6"])
def test_output_path_cuts_ipv6_esp_into_fragments_scapy_reassembles_and_decrypts(tmp_path, xfrm, fam):
    """ESP sealed for an IPv6 path too small for it leaves in IPv6 fragments (RFC 8200 §4.5; Linux's IPv6 layer
    cuts the outer packets xfrm6_prepare_output marks ignore_df): IPv4 inner packets without DF, and IPv6 inner
    packets of up to 1,280 bytes (RFC 8200 §5: the tunnel, a link that cannot carry them whole, fragments below
    IPv6). scapy's own defragment6 and decryption give back each inner packet; what fits is not cut."""
    from scapy.layers.inet6 import IPv6ExtHdrFragment

    s = SUITES["gcm128"]
    (tmp_path / "setup").write_text(setup_lines(fam, s, "tunnel", 0x3000, "out", False, V6)
                                    + "link set eth0 mtu 1280\n")
    if fam is V4:
        inners = [bytes(IP(src=V4["a"], dst=V4["b"], id=500 + i, flags=0) / UDP(sport=1000 + i, dport=53)
                        / Raw(bytes((i + j) & 0xFF for j in range(n - 28))))
                  for i, n in enumerate([1000, 1250, 1400, 2500, 3000])]
    else:
        inners = [bytes(IPv6(src=V6["a"], dst=V6["b"]) / UDP(sport=1000 + i, dport=53)
                        / Raw(bytes((i + j) & 0xFF for j in range(n - 48)))) for i, n in enumerate([1000, 1280])]
    write_raw_pcap(tmp_path / "in.pcap", inners)
    xfrm("pcap", "--batch", "setup", "--output-path", "in.pcap", "out.pcap")
    wire = read_raw_pcap(tmp_path / "out.pcap")
    assert all(w[0] >> 4 == 6 and len(w) <= 1280 for w in wire)
    frags = [IPv6(w) for w in wire if IPv6(w).nh == 44]
    assert len(wire) > len(inners) and len(frags) == len(wire) - 1, "all but the 1000-byte packet are cut"
    assert all(f[IPv6ExtHdrFragment].nh == 50 for f in frags)
    assert len({f[IPv6ExtHdrFragment].id for f in frags}) == len(inners) - 1, "one identification per packet"
    whole = ipv6_pieces_joined(wire)
    assert len(whole) == len(inners)
    sa = scapy_sa(s, 0x3000, V6["outer"], False)
    for i, (w, inner) in enumerate(zip(whole, inners)):
        assert bytes(sa.decrypt(w)) == inner, f"packet {i}"


@pytest.mark.parametrize("fam", [V4, V6], ids=["4in6", "6in6"])
def test_input_path_reassembles_ipv6_fragments_scapy_cut_before_esp_and_drops_overlaps(tmp_path, xfrm, fam):
    """ESP over IPv6 that scapy encrypted and then cut into IPv6 fragments (its own fragment6), in any order, is put
    back together before ESP (RFC 4303 §3.4.1, RFC 8200 §4.5) and gives the exact inner packet; a datagram with an
    overlapping fragment is discarded whole (RFC 5722)."""
    from scapy.layers.inet6 import IPv6ExtHdrFragment, fragment6

    s = SUITES["gcm128"]
    (tmp_path / "setup").write_text(setup_lines(fam, s, "tunnel", 0x4000, "in", False, V6))
    sa = scapy_sa(s, 0x4000, V6["outer"], False)
    if fam is V4:
        inners = [bytes(IP(src=V4["a"], dst=V4["b"], id=900 + i, flags=0) / UDP(sport=5000 + i, dport=53)
                        / Raw(bytes((7 * i + j) & 0xFF for j in range(n)))) for i, n in enumerate([1200, 2500, 3000])]
    else:
        inners = [bytes(IPv6(src=V6["a"], dst=V6["b"]) / UDP(sport=5000 + i, dport=53)
                        / Raw(bytes((7 * i + j) & 0xFF for j in range(n)))) for i, n in enumerate([1200, 2500, 3000])]

    def cut(inner: bytes, ident: int) -> list[bytes]:
        esp = IPv6(bytes(sa.encrypt(parse_ip(inner))))
        framed = (IPv6(src=esp.src, dst=esp.dst, hlim=esp.hlim)
                  / IPv6ExtHdrFragment(nh=esp.nh, id=ident) / Raw(bytes(esp.payload)))
        return [bytes(f) for f in fragment6(framed, 800)]

    wires = []
    for i, inner in enumerate(inners):
        pieces = cut(inner, 0x7000 + i)
        assert len(pieces) >= 2
        wires += pieces[::-1] if i % 2 else pieces
    # A fourth datagram whose second fragment overlaps its first by eight bytes: never delivered.
    first, second = [IPv6(p) for p in cut(inners[0], 0x7999)][:2]
    second[IPv6ExtHdrFragment].offset -= 1
    wires += [bytes(first), bytes(second)]
    input_path_gives_back(tmp_path, xfrm, wires, inners)
