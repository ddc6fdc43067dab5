"""xfrmd --if-id: the TUN as an XFRM interface (`ip link add ... type xfrm if_id N`), for route-based VPNs such as
strongSwan's if_id_in/if_id_out. What is routed into it is looked up with its if_id (≈ xfrmi_xmit's
xfrm_lookup_with_ifid), so only policies and SAs with that if_id protect it; catch-all selectors (0.0.0.0/0, ::/0)
then protect exactly what the routes send into the TUN. Traffic with no policy of its if_id is dropped and counted
(`tun_no_policy`), never sent in clear."""

import subprocess
import time

import pytest

from daemonlib import K1, K2, Pair, WIRE_FILTER, connect, run, transfer

A, B = "192.0.2.1", "192.0.2.2"


def configure(pair, sa_if_id: int, policy_if_id: int):
    """Two GCM SAs with `sa_if_id` and catch-all tunnel policies (IPv4 and IPv6) with `policy_if_id` on both sides."""
    for side in "ab":
        pair.xfrm(side, f"state add src {A} dst {B} proto esp spi 0x1001 reqid 1 mode tunnel "
                        f"aead rfc4106(gcm(aes)) {K1} 128 replay-window 128 if_id {sa_if_id}")
        pair.xfrm(side, f"state add src {B} dst {A} proto esp spi 0x2002 reqid 2 mode tunnel "
                        f"aead rfc4106(gcm(aes)) {K2} 128 replay-window 128 if_id {sa_if_id}")
    ab = f"tmpl src {A} dst {B} proto esp reqid 1 mode tunnel"
    ba = f"tmpl src {B} dst {A} proto esp reqid 2 mode tunnel"
    for any_ in ("0.0.0.0/0", "::/0"):
        sel = f"src {any_} dst {any_}"
        pair.xfrm("a", f"policy add {sel} dir out if_id {policy_if_id} {ab}")
        pair.xfrm("a", f"policy add {sel} dir in if_id {policy_if_id} {ba}")
        pair.xfrm("b", f"policy add {sel} dir out if_id {policy_if_id} {ba}")
        pair.xfrm("b", f"policy add {sel} dir in if_id {policy_if_id} {ab}")


def ping(pair, side, src, dst, count=3):
    return pair.exec(side, "busybox", "ping6" if ":" in dst else "ping", "-c", str(count), "-W", "2", "-I", src, dst,
                     check=False)


def no_policy(pair, side) -> float:
    return pair.metrics(side).get('xfrmd_datapath_packets_total{event="tun_no_policy"}', 0.0)


@pytest.mark.parametrize("workers", [None, 4], ids=["intakes", "4-workers"])
def test_route_based_tunnel_with_catch_all_policies_of_the_tuns_if_id(tmp_path, workers):
    """With the intakes running their batches, and with four workers fed by affinity (the if_id's OUT policy)."""
    pair = Pair(tmp_path, daemon_args=["--if-id", "42"] + (["--workers", str(workers)] if workers else []))
    try:
        configure(pair, 42, 42)
        assert "if_id 0x2a" in pair.xfrm("a", "state list") and "if_id 0x2a" in pair.xfrm("a", "policy list")
        # What the host sent into the TUN before the policies existed (IPv6 router solicitations, MLD) was dropped.
        dropped_before = {side: no_policy(pair, side) for side in "ab"}
        capture = tmp_path / "veth.pcap"
        dump = subprocess.Popen(["ip", "netns", "exec", pair.ns["b"], "tcpdump", "-ni", pair.dev["b"], "-w",
                                 str(capture), WIRE_FILTER], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(1.0)
        for side, src, dst in [("a", "10.0.1.1", "10.0.2.1"), ("b", "10.0.2.1", "10.0.1.1"),
                               ("a", "2001:db8:1::1", "2001:db8:2::1")]:
            r = ping(pair, side, src, dst)
            assert r.returncode == 0, (side, dst, r.stdout, r.stderr)
        transfer(pair, "a", "10.0.1.1", "10.0.2.1", size=4 * 1024 * 1024)
        transfer(pair, "b", "10.0.2.1", "10.0.1.1", size=1024 * 1024)
        time.sleep(0.5)
        dump.send_signal(2)
        dump.communicate(timeout=10)
        listing = run("tcpdump", "-nr", str(capture)).stdout.splitlines()
        assert listing and all(": ESP(spi=0x0000" in l for l in listing), [l for l in listing if "ESP(" not in l][:5]
        for side in "ab":
            stats = pair.xfrm(side, "-s state list")
            assert stats.count(" replay 0 failed 0") == 2 and " 0(packets)" not in stats, stats
            assert no_policy(pair, side) == dropped_before[side], "nothing routed into the TUN went unprotected"
    finally:
        pair.close()


@pytest.mark.parametrize("daemon_if_id,policy_if_id", [(42, 7), (0, 42)],
                         ids=["policies-of-another-if-id", "tun-without-if-id"])
def test_traffic_into_the_tun_matches_only_policies_of_its_if_id(tmp_path, daemon_if_id, policy_if_id):
    """The same SAs and catch-all policies, but of another if_id than the TUN's (or the TUN is no XFRM interface):
    nothing protects what is routed into it, so every packet is dropped as tun_no_policy and none reaches the wire."""
    pair = Pair(tmp_path, daemon_args=["--if-id", str(daemon_if_id)])
    try:
        configure(pair, policy_if_id, policy_if_id)
        capture = tmp_path / "veth.pcap"
        dump = subprocess.Popen(["ip", "netns", "exec", pair.ns["b"], "tcpdump", "-ni", pair.dev["b"], "-w",
                                 str(capture), WIRE_FILTER], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(1.0)
        r = ping(pair, "a", "10.0.1.1", "10.0.2.1", count=4)
        assert r.returncode != 0 and "4 packets transmitted, 0 packets received" in r.stdout, (r.stdout, r.stderr)
        time.sleep(0.3)
        dump.send_signal(2)
        dump.communicate(timeout=10)
        assert no_policy(pair, "a") >= 4
        assert run("tcpdump", "-nr", str(capture)).stdout.strip() == ""
    finally:
        pair.close()


def test_an_sa_of_an_if_id_the_tun_does_not_have_delivers_nothing_into_it(tmp_path):
    """B's TUN is if_id 7, but the tunnel's SAs and policies are if_id 42: A protects and sends (its TUN is 42), B
    decrypts, but as no interface of B has if_id 42 the packets are checked with if_id 0 (≈ xfrmi_rcv_cb leaving
    them on the underlying device), meet no IN policy and are dropped as XfrmInNoPols; none reaches B's host."""
    pair = Pair(tmp_path, side_args={"a": ["--if-id", "42"], "b": ["--if-id", "7"]})
    try:
        configure(pair, 42, 42)
        r = ping(pair, "a", "10.0.1.1", "10.0.2.1", count=4)
        assert r.returncode != 0 and "0 packets received" in r.stdout, (r.stdout, r.stderr)
        m = pair.metrics("b")
        assert m['xfrm_stat_total{counter="XfrmInNoPols"}'] >= 4, m
        assert m['xfrmd_datapath_packets_total{event="tun_written"}'] == 0, m
    finally:
        pair.close()


def test_route_policies_routes_only_the_tuns_if_id(tmp_path):
    """--route-policies with --if-id 42: an OUT policy of if_id 42 gets its route into the TUN, one of if_id 7 (or
    none) does not — its traffic could only be dropped there."""
    pair = Pair(tmp_path, daemon_args=["--if-id", "42", "--route-policies"], routes=False)
    try:
        tmpl = f"tmpl src {A} dst {B} proto esp reqid 1 mode tunnel"
        pair.xfrm("a", f"policy add src 10.0.1.0/24 dst 10.0.42.0/24 dir out if_id 42 {tmpl}")
        pair.xfrm("a", f"policy add src 10.0.1.0/24 dst 10.0.7.0/24 dir out if_id 7 {tmpl}")
        pair.xfrm("a", f"policy add src 10.0.1.0/24 dst 10.0.99.0/24 dir out {tmpl}")
        deadline = time.time() + 10
        while "10.0.42.0/24" not in (routes := pair.ip("a", "-4", "route", "show", "dev", "xfrm0").stdout):
            assert time.time() < deadline, routes
            time.sleep(0.1)
        time.sleep(0.5)  # the other two policies came right after: their routes would be there by now
        routes = pair.ip("a", "-4", "route", "show", "dev", "xfrm0").stdout
        assert "10.0.7.0/24" not in routes and "10.0.99.0/24" not in routes, routes
    finally:
        pair.close()


def test_a_block_policy_or_an_acquire_of_the_tuns_if_id_fails_a_connect_at_once(tmp_path):
    """As an XFRM interface answers its lookup's failures with ICMP unreachable (xfrmi_xmit2 → dst_link_failure): a
    block policy of the TUN's if_id, or an OUT policy whose SA does not exist yet (the ACQUIRE, larval_drop), makes
    a TCP connect fail with EHOSTUNREACH at once rather than time out; nothing goes on the wire."""
    import errno

    pair = Pair(tmp_path, daemon_args=["--if-id", "42"])
    try:
        tmpl = f"tmpl src {A} dst {B} proto esp reqid 9 mode tunnel"
        pair.xfrm("a", "policy add src 10.0.1.0/24 dst 10.7.7.0/24 dir out if_id 42 action block")
        pair.xfrm("a", f"policy add src 10.0.1.0/24 dst 10.8.8.0/24 dir out if_id 42 {tmpl}")
        for net in ("10.7.7.0/24", "10.8.8.0/24"):
            pair.ip("a", "route", "add", net, "dev", "xfrm0", "src", "10.0.1.1")
        before = pair.metrics("a")
        for dst in ("10.7.7.7", "10.8.8.8"):
            r = connect(pair, "a", "10.0.1.1", dst)
            assert r["errno"] == errno.EHOSTUNREACH and r["seconds"] < 3, (dst, r)
        m = pair.metrics("a")
        assert m['xfrm_stat_total{counter="XfrmOutPolBlock"}'] >= 1, m
        assert m['xfrm_stat_total{counter="XfrmOutNoStates"}'] >= 1, m
        event = 'xfrmd_datapath_packets_total{event="%s"}'
        assert m[event % "tun_unreachable"] - before.get(event % "tun_unreachable", 0) >= 2, m
        assert m[event % "wire_sent"] == before.get(event % "wire_sent", 0), "nothing left"
    finally:
        pair.close()
