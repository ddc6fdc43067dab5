"""Golden output of `xfrm -batch`: listings, monitor lines, lifetimes on the simulated clock, acquire, errors.

The expected texts follow iproute2's format (ip/xfrm_state.c, ip/xfrm_policy.c, ip/xfrm_monitor.c) byte for byte.
"""

import textwrap

from scapy.layers.inet import IP, UDP
from scapy.packet import Raw

from xfrmlib import SUITES, parse_ip, read_raw_pcap, scapy_sa, write_raw_pcap

KEY = "0x0102030405060708090a0b0c0d0e0f1011121314"
NET = "link add eth0 type dummy\nlink set eth0 up\naddr add 192.0.2.1/24 dev eth0\n" \
      "route add 10.0.2.0/24 dev eth0 via 192.0.2.2\n"


def batch(tmp_path, xfrm, text, *opts, check=True):
    (tmp_path / "b").write_text(textwrap.dedent(text))
    return xfrm(*opts, "-batch", "b", check=check)


def test_state_and_policy_listings(tmp_path, xfrm):
    _, out, _ = batch(tmp_path, xfrm, NET + f"""\
        state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 reqid 1 mode tunnel aead rfc4106(gcm(aes)) {KEY} 128 replay-window 64 flag esn
        ip xfrm state add src 192.0.2.2 dst 192.0.2.1 proto esp spi 0x200 reqid 2 mode transport enc cbc(aes) 0x00112233445566778899aabbccddeeff auth-trunc hmac(sha256) 0x{'ab' * 32} 128 encap espinudp 4500 4500 0.0.0.0 mark 7 mask 0xff
        xfrm policy add src 10.0.1.0/24 dst 10.0.2.0/24 proto tcp dport 443 dir out priority 10 tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 1 mode tunnel
        policy add src 10.0.2.0/24 dst 10.0.1.0/24 dir in action block
        state list
        state list nokeys
        policy list
        state count
        policy count
        policy getdefault
        """)
    assert out == textwrap.dedent(f"""\
        src 192.0.2.2 dst 192.0.2.1
        \tproto esp spi 0x00000200 reqid 2 mode transport
        \treplay-window 0 
        \tmark 0x7/0xff 
        \tauth-trunc hmac(sha256) 0x{'ab' * 32} 128
        \tenc cbc(aes) 0x00112233445566778899aabbccddeeff
        \tencap type espinudp sport 4500 dport 4500 addr 0.0.0.0
        \tanti-replay context: seq 0x0, oseq 0x0, bitmap 0x00000000
        \tsel src 0.0.0.0/0 dst 0.0.0.0/0 
        src 192.0.2.1 dst 192.0.2.2
        \tproto esp spi 0x00000100 reqid 1 mode tunnel
        \treplay-window 0 flag esn
        \taead rfc4106(gcm(aes)) {KEY} 128
        \tanti-replay esn context:
        \t seq-hi 0x0, seq 0x0, oseq-hi 0x0, oseq 0x0
        \t replay_window 64, bitmap-length 2
        \t 00000000 00000000 
        \tsel src 0.0.0.0/0 dst 0.0.0.0/0 
        src 192.0.2.2 dst 192.0.2.1
        \tproto esp spi 0x00000200 reqid 2 mode transport
        \treplay-window 0 
        \tmark 0x7/0xff 
        \tauth-trunc hmac(sha256) <<Keys hidden>> 128
        \tenc cbc(aes) <<Keys hidden>>
        \tencap type espinudp sport 4500 dport 4500 addr 0.0.0.0
        \tanti-replay context: seq 0x0, oseq 0x0, bitmap 0x00000000
        \tsel src 0.0.0.0/0 dst 0.0.0.0/0 
        src 192.0.2.1 dst 192.0.2.2
        \tproto esp spi 0x00000100 reqid 1 mode tunnel
        \treplay-window 0 flag esn
        \taead rfc4106(gcm(aes)) <<Keys hidden>> 128
        \tanti-replay esn context:
        \t seq-hi 0x0, seq 0x0, oseq-hi 0x0, oseq 0x0
        \t replay_window 64, bitmap-length 2
        \t 00000000 00000000 
        \tsel src 0.0.0.0/0 dst 0.0.0.0/0 
        src 10.0.2.0/24 dst 10.0.1.0/24 
        \tdir in action block priority 0 ptype main 
        src 10.0.1.0/24 dst 10.0.2.0/24 proto tcp dport 443 
        \tdir out priority 10 ptype main 
        \ttmpl src 192.0.2.1 dst 192.0.2.2
        \t\tproto esp reqid 1 mode tunnel
        \t SAD count 2
        \t SPD IN  1 OUT 1 FWD 0
        Default policies:
         in:  accept
         fwd: accept
         out: accept
        """)


def test_lifetimes_on_the_simulated_clock(tmp_path, xfrm):
    _, out, _ = batch(tmp_path, xfrm, NET + f"""\
        monitor
        state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 reqid 1 mode tunnel aead rfc4106(gcm(aes)) {KEY} 128 limit time-soft 10 limit time-hard 20 limit time-use-hard 5
        clock advance 9
        clock advance 1
        clock advance 10
        state count
        """)
    sa = textwrap.dedent(f"""\
        src 192.0.2.1 dst 192.0.2.2
        \tproto esp spi 0x00000100 reqid 1 mode tunnel
        \treplay-window 0 
        \taead rfc4106(gcm(aes)) {KEY} 128
        \tanti-replay context: seq 0x0, oseq 0x0, bitmap 0x00000000
        \tsel src 0.0.0.0/0 dst 0.0.0.0/0 
        """)
    # EXPIRE carries the state without keys or replay state (build_expire: only mark, if_id and dir attributes).
    expired = textwrap.dedent("""\
        src 192.0.2.1 dst 192.0.2.2
        \tproto esp spi 0x00000100 reqid 1 mode tunnel
        \treplay-window 0 
        \tsel src 0.0.0.0/0 dst 0.0.0.0/0 
        """)
    # Added; soft expiry once at 10 s (the never-used SA never use-expires); hard expiry and deletion at 20 s.
    assert out == sa + "Expired " + expired + "\thard 0\n" + "Expired " + expired + "\thard 1\n" + "\t SAD count 0\n"


def test_a_clock_jump_with_no_timer_armed_keeps_everything_and_later_limits_count_from_the_new_time(tmp_path, xfrm):
    """Nothing with a time limit: `clock advance` of ten years is one timer run (nothing can fire), not one per
    second; the SA and policy stay. An SA added afterwards expires at its own add time + its limit."""
    _, out, _ = batch(tmp_path, xfrm, NET + f"""\
        state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 reqid 1 mode tunnel aead rfc4106(gcm(aes)) {KEY} 128
        policy add src 10.0.1.0/24 dst 10.0.2.0/24 dir out tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 1 mode tunnel
        clock advance 315360000
        state count
        policy count
        state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x200 reqid 2 mode tunnel aead rfc4106(gcm(aes)) {KEY} 128 limit time-hard 5
        clock advance 4
        state count
        clock advance 1
        state count
        """)
    assert [line.strip() for line in out.splitlines()] == \
        ["SAD count 1", "SPD IN  0 OUT 1 FWD 0", "SAD count 2", "SAD count 1"], out


def test_policy_lifetimes_repeat_soft_every_30_seconds_then_delete(tmp_path, xfrm):
    _, out, _ = batch(tmp_path, xfrm, NET + """\
        policy add src 10.0.1.0/24 dst 10.0.2.0/24 dir out tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 9 mode tunnel limit time-soft 5 limit time-hard 40
        monitor
        clock advance 34
        policy count
        clock advance 1
        clock advance 5
        policy count
        """)
    pol = "src 10.0.1.0/24 dst 10.0.2.0/24 \n\tdir out priority 0 ptype main \n\ttmpl src 192.0.2.1 dst 192.0.2.2\n" \
          "\t\tproto esp reqid 9 mode tunnel\n"
    assert out == ("Expired " + pol + "\thard 0\n" + "\t SPD IN  0 OUT 1 FWD 0\n" + "Expired " + pol + "\thard 0\n"
                   + "Expired " + pol + "\thard 1\n" + "\t SPD IN  0 OUT 0 FWD 0\n")


def test_acquire_sends_one_acquire_keeps_a_larval_sa_that_expires_with_spi_0_and_never_sends_in_clear(tmp_path, xfrm):
    (tmp_path / "setup").write_text(NET + "policy add src 10.0.1.0/24 dst 10.0.2.0/24 dir out tmpl src 192.0.2.1 "
                                    "dst 192.0.2.2 proto esp reqid 9 mode tunnel\nmonitor\n")
    (tmp_path / "after").write_text("state list\nclock advance 29\nstate count\nclock advance 1\nstate count\nstat\n")
    write_raw_pcap(tmp_path / "in.pcap", [bytes(IP(src="10.0.1.1", dst="10.0.2.1") / UDP(sport=1000, dport=53))] * 3)
    _, out, _ = xfrm("pcap", "--batch", "setup", "--then", "after", "--output-path", "in.pcap", "out.pcap")
    assert read_raw_pcap(tmp_path / "out.pcap") == []
    head = textwrap.dedent("""\
        acquire proto esp 
          sel src 10.0.1.1/32 dst 10.0.2.1/32 proto udp sport 1000 dport 53 dev eth0 
          policy src 10.0.1.0/24 dst 10.0.2.0/24 
            \tdir out priority 0 ptype main 
            \ttmpl src 192.0.2.1 dst 192.0.2.2
            \t\tproto esp reqid 9 mode tunnel

        src 192.0.2.1 dst 192.0.2.2
        \tproto esp spi 0x00000000 reqid 9 mode tunnel
        \treplay-window 0 
        \tanti-replay context: seq 0x0, oseq 0x0, bitmap 0x00000000
        \tdir out
        \tsel src 10.0.1.1/32 dst 10.0.2.1/32 proto udp sport 1000 dport 53 dev eth0 
        \t SAD count 1
        Expired src 192.0.2.1 dst 192.0.2.2
        \tproto esp spi 0x00000000 reqid 9 mode tunnel
        \treplay-window 0 
        \tdir out
        \tsel src 10.0.1.1/32 dst 10.0.2.1/32 proto udp sport 1000 dport 53 dev eth0 
        \thard 1
        \t SAD count 0
        """)
    assert out.startswith(head), out
    stats = dict(l.split() for l in out.splitlines() if l.startswith("Xfrm"))
    assert stats["XfrmOutNoStates"] == "3"


def test_a_failing_line_stops_the_batch_as_ip_does_and_changes_nothing(tmp_path, xfrm):
    rc, out, err = batch(tmp_path, xfrm, f"""\
        state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 reqid 1 mode tunnel aead rfc4106(gcm(aes)) {KEY} 128
        state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x101 reqid 1 mode tunnel aead rfc4106(gcm(aes)) 0x0102 128
        state count
        """, check=False)
    assert rc != 0
    lines = err.strip().splitlines()
    # The kernel's answer to a key its crypto layer cannot take (esp_init_aead's extack).
    assert lines == ["Error: Kernel was unable to initialize cryptographic operations."], err
    assert rc == 2, "ip xfrm exits 2 after an error reply, at once, without a Command failed line"
    assert out == ""
    rc, out, err = batch(tmp_path, xfrm, f"""\
        state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 reqid 1 mode tunnel aead rfc4106(gcm(aes)) {KEY} 128
        state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 reqid 1 mode tunnel aead rfc4106(gcm(aes)) {KEY} 128
        """, check=False)
    assert err.strip().splitlines() == ["RTNETLINK answers: File exists"]
    assert rc == 2
    rc, out, err = batch(tmp_path, xfrm, "link add eth0 type dummy\nlink add eth0 type dummy\n", check=False)
    assert err.strip().splitlines()[-1] == "Command failed b:2", "other commands fail as ip -batch reports them"
    assert rc == 1


def test_stats_listing_shows_counters_after_traffic(tmp_path, xfrm):
    (tmp_path / "setup").write_text(NET + f"state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 reqid 1 mode "
                                    f"tunnel aead rfc4106(gcm(aes)) {KEY} 128\npolicy add src 10.0.1.0/24 dst 10.0.2.0/24 "
                                    "dir out tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 1 mode tunnel\n")
    (tmp_path / "after").write_text("-s state list\n")
    write_raw_pcap(tmp_path / "in.pcap", [bytes(IP(src="10.0.1.1", dst="10.0.2.1") / UDP() / Raw(b"x" * 72))] * 4)
    _, out, _ = xfrm("pcap", "--batch", "setup", "--then", "after", "--output-path", "in.pcap", "out.pcap")
    assert textwrap.dedent(f"""\
        src 192.0.2.1 dst 192.0.2.2
        \tproto esp spi 0x00000100(256) reqid 1(0x00000001) mode tunnel
        \treplay-window 0 seq 0x00000000 flag  (0x00000000)
        \taead rfc4106(gcm(aes)) {KEY} (160 bits) 128
        \tlastused 2024-01-01 00:00:00
        \tanti-replay context: seq 0x0, oseq 0x4, bitmap 0x00000000
        \tsel src 0.0.0.0/0 dst 0.0.0.0/0 uid 0
        \tlifetime config:
        \t  limit: soft (INF)(bytes), hard (INF)(bytes)
        \t  limit: soft (INF)(packets), hard (INF)(packets)
        \t  expire add: soft 0(sec), hard 0(sec)
        \t  expire use: soft 0(sec), hard 0(sec)
        \tlifetime current:
        \t  400(bytes), 4(packets)
        \t  add 2024-01-01 00:00:00 use 2024-01-01 00:00:00
        \tstats:
        \t  replay-window 0 replay 0 failed 0
        """) == out


def test_nested_transforms_decrypt_in_scapy_layer_by_layer(tmp_path, xfrm):
    """Two templates: transport ESP end to end inside tunnel ESP between gateways (innermost first)."""
    gcm = SUITES["gcm128"]
    cbc = SUITES["cbc-sha256"]
    (tmp_path / "setup").write_text(NET.replace("dev eth0 via 192.0.2.2", "dev eth0") + "\n".join([
        f"state add src 10.0.1.1 dst 10.0.2.1 proto esp spi 0x501 reqid 5 mode transport {cbc.xfrm_algo}",
        f"state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x601 reqid 6 mode tunnel {gcm.xfrm_algo}",
        "policy add src 10.0.1.0/24 dst 10.0.2.0/24 dir out tmpl proto esp reqid 5 mode transport "
        "tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 6 mode tunnel",
    ]) + "\n")
    pkts = [bytes(IP(src="10.0.1.1", dst="10.0.2.1", id=i) / UDP(sport=5, dport=6) / Raw(b"n" * (9 * i)))
            for i in range(4)]
    write_raw_pcap(tmp_path / "in.pcap", pkts)
    xfrm("pcap", "--batch", "setup", "--output-path", "in.pcap", "out.pcap")
    wire = read_raw_pcap(tmp_path / "out.pcap")
    assert len(wire) == 4
    outer = scapy_sa(gcm, 0x601, ("192.0.2.1", "192.0.2.2"))
    inner = scapy_sa(cbc, 0x501, None)
    for w, p in zip(wire, pkts):
        mid = outer.decrypt(parse_ip(w))
        assert mid.proto == 50 and mid.src == "10.0.1.1"
        got = inner.decrypt(IP(bytes(mid)))
        assert bytes(got[UDP]) == bytes(IP(p)[UDP])
