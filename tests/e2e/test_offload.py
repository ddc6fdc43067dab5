"""Offload through the commands a user types, with scapy checking what the simulated NIC puts on its wire.

Every mode (software, crypto offload, packet offload) must put the same bytes on the wire for the same SA and
traffic (packet offload is indistinguishable from software ESP), and every rule of the offload design is driven
through `xfrm` batch files.
"""

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from xfrmlib import SUITES, parse_ip, read_raw_pcap, scapy_sa, write_raw_pcap

KEY = SUITES["gcm128"].crypt_key
AEAD = SUITES["gcm128"].xfrm_algo


def host_lines(outer_me, outer_plen, lan_peer, peer, nic="link add sim0 type simnic offload both"):
    return [nic, "link set sim0 up", f"addr add {outer_me}/{outer_plen} dev sim0",
            f"route add {lan_peer} dev sim0" + (f" via {peer}" if (":" in peer) == (":" in lan_peer) else "")]


def sa_line(src, dst, spi, mode, direction, offload, extra=""):
    off = "" if offload == "software" else f" offload {offload} dev sim0 dir {direction}"
    win = " replay-window 128" if direction == "in" else ""
    return f"state add src {src} dst {dst} proto esp spi {spi:#x} reqid 7 mode {mode} {AEAD}{win}{extra}{off}"


def pol_line(sel_src, sel_dst, direction, tmpl, offload):
    off = " offload packet dev sim0" if offload == "packet" else ""
    return f"policy add src {sel_src} dst {sel_dst} dir {direction} {tmpl}{off}"


def inner(v6=False, n=5):
    if v6:
        return [bytes(IPv6(src="2001:db8:a::1", dst="2001:db8:b::1") / UDP(sport=7, dport=9) / Raw(bytes(range(i * 30 % 256)) * 2))
                for i in range(n)]
    return [bytes(IP(src="10.0.1.1", dst="10.0.2.1", id=i + 1) / UDP(sport=7, dport=9) / Raw(bytes(range(i * 30 % 256)) * 2))
            for i in range(n)]


SCENARIOS = {
    # name: (outer src, outer dst, outer plen, lan_a, lan_b, mode, natt, v6 inner)
    "tunnel-v4": ("192.0.2.1", "192.0.2.2", 24, "10.0.1.0/24", "10.0.2.0/24", "tunnel", False, False),
    "tunnel-v6": ("2001:db8::1", "2001:db8::2", 64, "2001:db8:a::/64", "2001:db8:b::/64", "tunnel", False, True),
    "tunnel-natt": ("192.0.2.1", "192.0.2.2", 24, "10.0.1.0/24", "10.0.2.0/24", "tunnel", True, False),
    "transport-v4": ("10.0.1.1", "10.0.2.1", 24, "10.0.1.0/24", "10.0.2.0/24", "transport", False, False),
}


def output_setup(name, offload):
    src, dst, plen, lan_a, lan_b, mode, natt, _ = SCENARIOS[name]
    lines = host_lines(src, plen, lan_b, dst)
    extra = " encap espinudp 4500 4500 0.0.0.0" if natt else ""
    lines.append(sa_line(src, dst, 0x5000, mode, "out", offload, extra))
    tmpl = (f"tmpl src {src} dst {dst} proto esp reqid 7 mode tunnel" if mode == "tunnel"
            else "tmpl proto esp reqid 7 mode transport")
    lines.append(pol_line(lan_a, lan_b, "out", tmpl, offload))
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_mode_puts_the_same_esp_on_the_wire(tmp_path, xfrm, scenario):
    src, dst, _, _, _, mode, natt, v6 = SCENARIOS[scenario]
    pkts = inner(v6)
    write_raw_pcap(tmp_path / "in.pcap", pkts)
    wires = {}
    for offload in ["software", "crypto", "packet"]:
        (tmp_path / f"setup-{offload}").write_text(output_setup(scenario, offload))
        (tmp_path / "after").write_text("-s state list\nlink show -s sim0\n")
        _, out, _ = xfrm("pcap", "--batch", f"setup-{offload}", "--then", "after", "--output-path", "in.pcap",
                         f"out-{offload}.pcap")
        wires[offload] = read_raw_pcap(tmp_path / f"out-{offload}.pcap")
        if offload == "packet":
            assert "mode packet" in out and "esp_tx 5" in out, out
        if offload == "crypto":
            assert "mode crypto" in out and "crypto_tx 5" in out, out
    assert len(wires["software"]) == len(pkts)
    # Every device draws its own IV salt (≈ seqiv), as real NICs generate their own IVs, so the modes agree on
    # everything up to the IV — outer header, UDP, SPI, sequence number — and on the length; scapy must decrypt
    # each mode's packets to the same inner packets.
    hdr = (40 if v6 else 20) + (8 if natt else 0) + 8
    for m in ["crypto", "packet"]:
        assert len(wires[m]) == len(pkts)
        for a, b in zip(wires[m], wires["software"]):
            assert len(a) == len(b) and a[:hdr] == b[:hdr], f"{m} offload's ESP framing differs from software's"
    assert len({w[hdr:hdr + 8] for m in wires for w in wires[m]}) == 3 * len(pkts), "an IV repeated"
    sa = scapy_sa(SUITES["gcm128"], 0x5000, (src, dst) if mode == "tunnel" else None, natt)
    for m in ["software", "crypto", "packet"]:
        for w, p in zip(wires[m], pkts):
            got = sa.decrypt(parse_ip(w))
            if mode == "tunnel":
                assert bytes(got) == p, m
            else:
                assert bytes(got[1:]) == bytes(parse_ip(p)[1:]), m


@pytest.mark.parametrize("offload", ["software", "crypto", "packet"])
@pytest.mark.parametrize("scenario", ["tunnel-v4", "tunnel-v6", "tunnel-natt"])
def test_input_through_the_nic_delivers_what_scapy_sent(tmp_path, xfrm, offload, scenario):
    src, dst, plen, lan_a, lan_b, mode, natt, v6 = SCENARIOS[scenario]
    lines = host_lines(dst, plen, lan_a, src)
    lan_b_host = "2001:db8:b::1/64" if v6 else "10.0.2.1/24"
    lines += ["link add lan0 type dummy", "link set lan0 up", f"addr add {lan_b_host} dev lan0"]
    extra = " encap espinudp 4500 4500 0.0.0.0" if natt else ""
    lines.append(sa_line(src, dst, 0x6000, mode, "in", offload, extra))
    lines.append(pol_line(lan_a, lan_b, "in", f"tmpl src {src} dst {dst} proto esp reqid 7 mode tunnel", offload))
    (tmp_path / "setup").write_text("\n".join(lines) + "\n")
    (tmp_path / "after").write_text("-s state list\nstat\n")
    pkts = inner(v6)
    sa = scapy_sa(SUITES["gcm128"], 0x6000, (src, dst), natt)
    wire = [bytes(sa.encrypt(parse_ip(p))) for p in pkts]
    tampered = bytearray(bytes(sa.encrypt(parse_ip(pkts[0]))))  # a fresh sequence number, then one flipped bit
    tampered[-5] ^= 1
    write_raw_pcap(tmp_path / "in.pcap", wire + [wire[1], bytes(tampered)])
    _, out, _ = xfrm("pcap", "--batch", "setup", "--then", "after", "--input-path", "--dev", "sim0", "in.pcap",
                     "out.pcap")
    got = read_raw_pcap(tmp_path / "out.pcap")
    assert got == pkts, "exactly the inner packets, once each (the replay and the forgery are dropped)"
    stats = dict(l.split() for l in out.splitlines() if l.startswith("Xfrm"))
    assert stats["XfrmInStateSeqError"] == "1"
    assert stats["XfrmInStateProtoError"] == "1"
    assert "replay-window 0 replay 1 failed 1" in out
    assert f"{len(pkts)}(packets)" in out


def run_batch(tmp_path, xfrm, text, check=False):
    (tmp_path / "b").write_text(text)
    return xfrm("-batch", "b", check=check)


def test_packet_offload_never_falls_back_and_crypto_offload_does(tmp_path, xfrm):
    base = "link add sim0 type simnic offload crypto\nlink set sim0 up\naddr add 192.0.2.1/24 dev sim0\n"
    rc, out, err = run_batch(tmp_path, xfrm, base + sa_line("192.0.2.1", "192.0.2.2", 0x10, "tunnel", "out", "packet")
                             + "\n")
    assert rc == 2 and "Command failed" not in err, err  # ip xfrm exits at once after an error reply
    rc, out, err = run_batch(tmp_path, xfrm, base.replace("crypto", "packet")
                             + sa_line("192.0.2.1", "192.0.2.2", 0x10, "tunnel", "out", "crypto") + "\nstate list\n")
    assert rc == 0, err
    assert "offload" not in out, "crypto offload on a packet-only NIC silently stays in software"
    assert "spi 0x00000010" in out


def test_full_device_table_fails_both_modes_and_leaves_nothing(tmp_path, xfrm):
    base = "link add sim0 type simnic sa-capacity 1 offload both\nlink set sim0 up\naddr add 192.0.2.1/24 dev sim0\n"
    base += sa_line("192.0.2.1", "192.0.2.2", 0x10, "tunnel", "out", "packet") + "\n"
    for mode in ["packet", "crypto"]:
        rc, out, err = run_batch(tmp_path, xfrm, base + sa_line("192.0.2.1", "192.0.2.2", 0x11, "tunnel", "out", mode)
                                 + "\n")
        assert rc != 0 and "No space for SA" in err, err
    rc, out, err = run_batch(tmp_path, xfrm, base + "state count\n")
    assert "SAD count 1" in out


@pytest.mark.parametrize("line,message", [
    (sa_line("192.0.2.1", "192.0.2.2", 0x10, "tunnel", "out", "packet").replace("reqid 7 ", ""), "reqid"),
    (sa_line("192.0.2.2", "192.0.2.1", 0x10, "tunnel", "in", "packet").replace("replay-window 128", "replay-window 100"),
     "replay window"),
    (sa_line("192.0.2.1", "192.0.2.2", 0x10, "tunnel", "out", "packet", " limit packet-soft 10 limit packet-hard 5"),
     "greater than soft"),
    (sa_line("192.0.2.1", "192.0.2.2", 0x10, "tunnel", "out", "packet", " limit packet-soft 0"), "can't be 0"),
    ("policy add src 10.0.1.0/24 dst 10.0.2.0/24 dir fwd tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 7 mode tunnel"
     " offload packet dev sim0", "forward"),
    ("policy add src 10.0.1.0/24 dst 10.0.2.0/24 dir out tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 7 mode tunnel"
     " tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 8 mode tunnel offload packet dev sim0", "template"),
    ("state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x10 reqid 7 mode tunnel " + AEAD + " offload packet dir out",
     "Missing dev keyword"),
    ("policy add src 10.0.1.0/24 dst 10.0.2.0/24 dir out offload crypto dev sim0", "Invalid offload mode"),
])
def test_device_rules_refuse_with_a_clear_message_and_change_nothing(tmp_path, xfrm, line, message):
    base = "link add sim0 type simnic offload both\nlink set sim0 up\naddr add 192.0.2.1/24 dev sim0\n"
    rc, out, err = run_batch(tmp_path, xfrm, base + line + "\n")
    assert rc != 0, out
    assert message.lower() in err.lower(), err
    assert "Command failed" not in err, "ip xfrm exits at once, without ip -batch's Command failed line"
    rc, out, err = run_batch(tmp_path, xfrm, base + "state count\npolicy count\nlink show -s sim0\n")
    assert "SAD count 0" in out and "OUT 0" in out and "SA count=0" in out


def test_offloaded_policy_beats_a_better_software_priority(tmp_path, xfrm):
    setup = "\n".join(host_lines("192.0.2.1", 24, "10.0.2.0/24", "192.0.2.2") + [
        sa_line("192.0.2.1", "192.0.2.2", 0x7000, "tunnel", "out", "packet"),
        "policy add src 10.0.1.1/32 dst 10.0.2.1/32 dir out action block priority 0",
        pol_line("10.0.1.0/24", "10.0.2.0/24", "out", "tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 7 mode tunnel",
                 "packet").replace("dir out", "dir out priority 1000"),
    ]) + "\n"
    (tmp_path / "setup").write_text(setup)
    write_raw_pcap(tmp_path / "in.pcap", inner(n=3))
    xfrm("pcap", "--batch", "setup", "--output-path", "in.pcap", "out.pcap")
    out = read_raw_pcap(tmp_path / "out.pcap")
    assert len(out) == 3 and all(parse_ip(p).proto == 50 for p in out)
    # Strict mode refuses that mix instead.
    rc, _, err = run_batch(tmp_path, xfrm, "policy set offload-priority strict\n" + setup)
    assert rc != 0 and "strict offload-priority" in err, err


def test_device_down_flushes_its_states_and_policies_and_says_so(tmp_path, xfrm):
    text = "\n".join(host_lines("192.0.2.1", 24, "10.0.2.0/24", "192.0.2.2") + [
        sa_line("192.0.2.1", "192.0.2.2", 0x7000, "tunnel", "out", "packet"),
        sa_line("192.0.2.1", "192.0.2.2", 0x7001, "tunnel", "out", "crypto"),
        sa_line("192.0.2.1", "192.0.2.2", 0x7002, "tunnel", "out", "software"),
        pol_line("10.0.1.0/24", "10.0.2.0/24", "out", "tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 7 mode tunnel",
                 "packet"),
        "monitor", "link set sim0 down", "state count", "policy count", "link show -s sim0",
    ]) + "\n"
    rc, out, err = run_batch(tmp_path, xfrm, text, check=True)
    assert "Device sim0 flushed: 2 states, 1 policies" in out
    assert "SAD count 1" in out and "OUT 0" in out and "SA count=0" in out


def test_device_hard_limit_drops_and_expires(tmp_path, xfrm):
    setup = "\n".join(host_lines("192.0.2.1", 24, "10.0.2.0/24", "192.0.2.2") + [
        sa_line("192.0.2.1", "192.0.2.2", 0x7000, "tunnel", "out", "packet",
                " limit packet-soft 2 limit packet-hard 4"),
        pol_line("10.0.1.0/24", "10.0.2.0/24", "out", "tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 7 mode tunnel",
                 "packet"),
        "monitor",
    ]) + "\n"
    (tmp_path / "setup").write_text(setup)
    (tmp_path / "after").write_text("state count\nstat\n")
    write_raw_pcap(tmp_path / "in.pcap", inner(n=8))
    _, out, _ = xfrm("pcap", "--batch", "setup", "--then", "after", "--output-path", "in.pcap", "out.pcap")
    wire = read_raw_pcap(tmp_path / "out.pcap")
    assert len(wire) == 4, "the NIC stops at the hard limit"
    assert out.count("Expired src 192.0.2.1 dst 192.0.2.2") == 2
    assert "\thard 0" in out and "\thard 1" in out
    assert "SAD count 1" in out, "only the larval SA of the acquire the next packet triggered is left"
    stats = dict(l.split() for l in out.splitlines() if l.startswith("Xfrm"))
    assert int(stats["XfrmOutNoStates"]) >= 1, "after the hard expiry the policy acquires instead of sending in clear"


def test_forwarding_gateway_with_packet_offload_does_no_esp_on_the_host(tmp_path, xfrm):
    """A gateway between a protected network (behind sim0's wire) and a LAN: fwd/out/in all offloaded."""
    setup = "\n".join([
        "link add sim0 type simnic offload packet fwd-offload", "link set sim0 up", "addr add 192.0.2.1/24 dev sim0",
        "link add lan0 type dummy", "link set lan0 up", "addr add 10.0.1.254/24 dev lan0",
        "route add 10.0.2.0/24 dev sim0 via 192.0.2.2",
        sa_line("192.0.2.1", "192.0.2.2", 0x8000, "tunnel", "out", "packet"),
        sa_line("192.0.2.2", "192.0.2.1", 0x8001, "tunnel", "in", "packet"),
        pol_line("10.0.1.0/24", "10.0.2.0/24", "out", "tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 7 mode tunnel", "packet"),
        pol_line("10.0.2.0/24", "10.0.1.0/24", "fwd", "tmpl src 192.0.2.2 dst 192.0.2.1 proto esp reqid 7 mode tunnel", "packet"),
        pol_line("10.0.2.0/24", "10.0.1.0/24", "in", "tmpl src 192.0.2.2 dst 192.0.2.1 proto esp reqid 7 mode tunnel", "packet"),
    ]) + "\n"
    (tmp_path / "setup").write_text(setup)
    (tmp_path / "after").write_text("link show -s sim0\n")
    # From the remote network through the tunnel, forwarded onto the LAN in clear.
    remote = [bytes(IP(src="10.0.2.7", dst="10.0.1.5", ttl=64, id=i) / UDP(sport=1, dport=2) / Raw(b"r" * (10 * i)))
              for i in range(4)]
    sa_in = scapy_sa(SUITES["gcm128"], 0x8001, ("192.0.2.2", "192.0.2.1"))
    write_raw_pcap(tmp_path / "in.pcap", [bytes(sa_in.encrypt(IP(p))) for p in remote])
    _, out, _ = xfrm("pcap", "--batch", "setup", "--then", "after", "--input-path", "--dev", "sim0", "in.pcap",
                     "fwd.pcap")
    fwd = [IP(p) for p in read_raw_pcap(tmp_path / "fwd.pcap")]
    assert [(p.src, p.dst, p.ttl) for p in fwd] == [("10.0.2.7", "10.0.1.5", 63)] * 4
    assert "esp_rx 4" in out
    # From the LAN towards the remote network: the NIC encrypts; scapy decrypts.
    lan = [bytes(IP(src="10.0.1.5", dst="10.0.2.7", ttl=64, id=i) / UDP(sport=2, dport=1) / Raw(b"l" * (7 * i)))
           for i in range(4)]
    write_raw_pcap(tmp_path / "lan.pcap", lan)
    _, out, _ = xfrm("pcap", "--batch", "setup", "--then", "after", "--input-path", "--dev", "lan0", "lan.pcap",
                     "wire.pcap")
    wire = read_raw_pcap(tmp_path / "wire.pcap")
    sa_out = scapy_sa(SUITES["gcm128"], 0x8000, ("192.0.2.1", "192.0.2.2"))
    got = [sa_out.decrypt(parse_ip(w)) for w in wire]
    assert [(p.src, p.dst, p.ttl) for p in got] == [("10.0.1.5", "10.0.2.7", 63)] * 4
    assert "esp_tx 4" in out


def test_updating_an_offloaded_policy_replaces_it_in_the_device_too(tmp_path, xfrm):
    text = "\n".join(host_lines("192.0.2.1", 24, "10.0.2.0/24", "192.0.2.2") + [
        sa_line("192.0.2.1", "192.0.2.2", 0x7000, "tunnel", "out", "packet"),
        "policy add src 10.0.1.0/24 dst 10.0.2.0/24 dir out offload packet dev sim0",
        pol_line("10.0.1.0/24", "10.0.2.0/24", "out", "tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 7 mode tunnel",
                 "packet").replace("policy add", "policy update"),
        "link show -s sim0",
    ]) + "\n"
    (tmp_path / "setup").write_text(text)
    write_raw_pcap(tmp_path / "in.pcap", inner(n=3))
    _, out, _ = xfrm("pcap", "--batch", "setup", "--output-path", "in.pcap", "out.pcap")
    policies = [l for l in out.splitlines() if "policy[" in l]
    assert len(policies) == 1 and "reqid 7" in policies[0], out
    wire = read_raw_pcap(tmp_path / "out.pcap")
    assert len(wire) == 3 and all(parse_ip(w).proto == 50 for w in wire), "never in clear after the update"


def test_a_device_that_is_down_sends_nothing_at_all(tmp_path, xfrm):
    text = "\n".join(host_lines("192.0.2.1", 24, "10.0.2.0/24", "192.0.2.2") + ["link set sim0 down"]) + "\n"
    (tmp_path / "setup").write_text(text)
    write_raw_pcap(tmp_path / "in.pcap", inner(n=2))
    xfrm("pcap", "--batch", "setup", "--output-path", "in.pcap", "out.pcap")
    assert read_raw_pcap(tmp_path / "out.pcap") == []


def test_state_update_with_new_limits_reaches_the_device(tmp_path, xfrm):
    base = host_lines("192.0.2.1", 24, "10.0.2.0/24", "192.0.2.2") + [
        pol_line("10.0.1.0/24", "10.0.2.0/24", "out", "tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 7 mode tunnel",
                 "packet")]
    (tmp_path / "setup").write_text("\n".join(base + [
        sa_line("192.0.2.1", "192.0.2.2", 0x7000, "tunnel", "out", "packet", " limit packet-soft 2 limit packet-hard 4"),
    ]) + "\n")
    (tmp_path / "then").write_text(
        sa_line("192.0.2.1", "192.0.2.2", 0x7000, "tunnel", "out", "packet", " limit packet-soft 50 limit packet-hard 100")
        .replace("state add", "state update") + "\nstate count\n")
    write_raw_pcap(tmp_path / "three.pcap", inner(n=3))
    # First: the update after traffic keeps the SA (and its sequence numbers) in place.
    _, out, _ = xfrm("pcap", "--batch", "setup", "--then", "then", "--output-path", "three.pcap", "o1.pcap")
    assert len(read_raw_pcap(tmp_path / "o1.pcap")) == 3 and "SAD count 1" in out
    # Then: limits raised after the device was programmed are the ones it enforces.
    (tmp_path / "setup2").write_text((tmp_path / "setup").read_text() + (tmp_path / "then").read_text().replace(
        "state count\n", ""))
    write_raw_pcap(tmp_path / "eight.pcap", inner(n=8))
    _, out, _ = xfrm("pcap", "--batch", "setup2", "--then", "then", "--output-path", "eight.pcap", "o2.pcap")
    assert len(read_raw_pcap(tmp_path / "o2.pcap")) == 8, "the device enforces the raised hard limit, not the old one"


@pytest.mark.parametrize("algo,ok,message", [
    ("aead rfc4106(gcm(aes)) 0x" + "11" * 20 + " 128", True, ""),
    ("aead rfc4106(gcm(aes)) 0x" + "11" * 36 + " 128", True, ""),
    ("aead rfc4106(gcm(aes)) 0x" + "11" * 20 + " 64", False, "AEAD ICV length other than 128bit"),
    ("aead rfc4106(gcm(aes)) 0x" + "11" * 28 + " 128", False, "AEAD key length other than 128/256 bit"),
    ("aead rfc7539esp(chacha20,poly1305) 0x" + "11" * 36 + " 128", False, "AEAD algorithm"),
    ("enc cbc(aes) 0x" + "11" * 16 + " auth-trunc hmac(sha256) 0x" + "22" * 32 + " 128", False, "without aead"),
])
@pytest.mark.parametrize("mode", ["crypto", "packet"])
def test_a_connectx_like_nic_offloads_only_its_algorithms_and_refuses_the_rest_with_einval(tmp_path, xfrm, algo,
                                                                                          ok, message, mode):
    """`algos rfc4106-128`: what mlx5 takes; anything else is EINVAL, which fails crypto offload too (the kernel
    falls back to software only on EOPNOTSUPP, xfrm_dev_state_add)."""
    base = "link add sim0 type simnic offload both algos rfc4106-128\nlink set sim0 up\naddr add 192.0.2.1/24 dev sim0\n"
    line = (f"state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x10 reqid 7 mode tunnel {algo} "
            f"offload {mode} dev sim0 dir out")
    rc, out, err = run_batch(tmp_path, xfrm, base + line + "\nlink show -s sim0\nstate count\n")
    if ok:
        assert rc == 0, err
        assert "algos rfc4106-128" in out and "SA count=1" in out, out
    else:
        assert rc == 2, (out, err)
        assert message in err, err
        rc, out, err = run_batch(tmp_path, xfrm, base + "state count\nlink show -s sim0\n")
        assert "SAD count 0" in out and "SA count=0" in out


def test_the_default_simnic_takes_every_algorithm(tmp_path, xfrm):
    base = "link add sim0 type simnic offload both\nlink set sim0 up\naddr add 192.0.2.1/24 dev sim0\n"
    line = ("state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x10 reqid 7 mode tunnel "
            "aead rfc7539esp(chacha20,poly1305) 0x" + "11" * 36 + " 128 offload crypto dev sim0 dir out")
    rc, out, err = run_batch(tmp_path, xfrm, base + line + "\nlink show -s sim0\n")
    assert rc == 0, err
    assert "SA count=1" in out and "algos" not in out
