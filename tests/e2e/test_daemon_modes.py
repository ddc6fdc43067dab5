"""xfrmd's modes between two daemons: four workers (the engine's rings and affinity), crypto and packet offload on
a simulated NIC whose wire is the daemon's real sockets, and host-to-host transport mode with the socket mark
keeping the daemon's ESP out of its TUN."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from daemonlib import K1, K2, Pair, WIRE_FILTER, check_tunnel, run, transfer


@pytest.mark.parametrize("offload", ["software", "packet"])
def test_four_workers_keep_each_sas_packets_in_order(tmp_path, offload):
    """`--workers 4`: the intakes hand batches to four workers by affinity (packet offload: by the device's SA
    handle). The tunnel carries 20 MB each way and the wire shows each SA's sequence numbers one by one."""
    pair = Pair(tmp_path, daemon_args=["--workers", "4", "--offload", "both"])
    try:
        pair.configure(False, offload=offload)
        m = check_tunnel(pair, tmp_path, False, False, False, size=20 * 1024 * 1024)
        assert m['xfrmd_datapath_packets_total{event="ring_full"}'] == 0, m
        assert len([k for k in m if k.startswith("xfrmd_worker_queue_depth{")]) == 4, m
    finally:
        pair.close()


@pytest.mark.parametrize("offload", ["crypto", "packet"])
@pytest.mark.parametrize("natt", [False, True], ids=["raw-esp", "nat-t"])
def test_offload_to_a_simulated_nic_on_the_real_sockets_carries_the_same_tunnel(tmp_path, offload, natt):
    """`xfrmd --offload both`: the outer interface is a simulated NIC whose wire is the daemon's sockets. With the
    SAs (and for packet offload the policies) on the device, the same traffic crosses, tshark verifies every ICV,
    and the device's counters show that it, not the stack, did the ESP."""
    pair = Pair(tmp_path, daemon_args=["--offload", "both"])
    try:
        pair.configure(natt, offload=offload)
        listing = pair.xfrm("a", "state list")
        assert listing.count(f"crypto offload parameters: dev xfrm0 dir out mode {offload}") == 1, listing
        assert listing.count(f"crypto offload parameters: dev xfrm0 dir in mode {offload}") == 1, listing
        # The NIC's engine hands its wire (the daemon's sockets) a batch at a time: ESP-in-UDP leaves as UDP GSO sends
        # there too (check_wire cuts them back into datagrams and finds some).
        m = check_tunnel(pair, tmp_path, natt, False, False, size=20 * 1024 * 1024)
        dev = {k.split('counter="')[1].rstrip('"}'): v for k, v in m.items() if k.startswith("xfrmd_device_total{")}
        tx, rx = ("crypto_tx", "crypto_rx") if offload == "crypto" else ("esp_tx", "esp_rx")
        assert dev[tx] > 1000 and dev[rx] > 1000, dev
        assert dev["icv_errors"] == 0 and dev["replay_errors"] == 0 and dev["tx_dropped"] == 0, dev
    finally:
        pair.close()


def test_the_two_crypto_backends_carry_one_tunnel_between_them(tmp_path):
    """`--crypto`: host A seals and opens with OpenSSL, host B with Intel ipsec-mb. The tunnel carries 20 MB each
    way over raw ESP, tshark verifies every ICV, and each daemon's start line names its backend."""
    pair = Pair(tmp_path, side_args={"a": ["--crypto", "openssl"], "b": ["--crypto", "ipsec-mb"]})
    logs = []
    try:
        pair.configure(False)
        check_tunnel(pair, tmp_path, False, False, False, size=20 * 1024 * 1024)
    finally:
        logs = pair.close()
    assert "crypto=openssl" in logs[0] and "crypto=ipsec-mb" in logs[1], logs


def test_an_unknown_crypto_backend_is_refused_by_name():
    xfrmd = str(Path(os.environ["XFRM_TOOL"]).with_name("xfrmd"))
    r = run(xfrmd, "--crypto", "aesni", check=False)
    assert r.returncode != 0 and "--crypto must be one of openssl, ipsec-mb" in r.stderr, r.stderr


TRANSPORT_RULES = """
set -e
ip rule add not fwmark 0x5846 table 5846 pref 100
ip -6 rule add not fwmark 0x5846 table 5846 pref 100
ip route add {peer4} dev xfrm0 src {me4} table 5846
ip -6 route add {peer6} dev xfrm0 src {me6} table 5846
"""


@pytest.mark.parametrize("family,offload", [(4, "software"), (6, "software"), (4, "crypto"), (4, "packet")],
                         ids=["ipv4", "ipv6", "ipv4-crypto-offload", "ipv4-packet-offload"])
def test_transport_mode_between_the_two_hosts_keeps_its_esp_out_of_the_tun(tmp_path, family, offload):
    """Host to host, transport mode: the peer's own address is routed into xfrm0 by a rule for unmarked traffic,
    and the daemon's sockets carry the mark (0x5846), so its ESP to that same address takes the main table (the
    veth) instead of looping into the TUN. ping and TCP both ways; the veth carries only ESP. In software, and with
    the SAs (and for packet offload the policies) on the simulated NIC."""
    pair = Pair(tmp_path, daemon_args=[] if offload == "software" else ["--offload", "both"])
    try:
        run_transport_mode(pair, tmp_path, family, offload)
    finally:
        pair.close()


def run_transport_mode(pair, tmp_path, family, offload):
    a, b = ("192.0.2.1", "192.0.2.2") if family == 4 else ("2001:db8::1", "2001:db8::2")
    for side, me4, peer4, me6, peer6 in [("a", "192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8::2"),
                                         ("b", "192.0.2.2", "192.0.2.1", "2001:db8::2", "2001:db8::1")]:
        pair.exec(side, "sh", "-c", TRANSPORT_RULES.format(me4=me4, peer4=peer4, me6=me6, peer6=peer6))
        pair.exec(side, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.xfrm0.rp_filter=0")

    def off(side, sender):
        if offload == "software":
            return " replay-window 128"
        if side == sender:
            return f" offload {offload} dev xfrm0 dir out"
        return f" replay-window 128 offload {offload} dev xfrm0 dir in"

    pol = " offload packet dev xfrm0" if offload == "packet" else ""
    for side in "ab":
        pair.xfrm(side, f"state add src {a} dst {b} proto esp spi 0x1001 reqid 1 mode transport "
                        f"aead rfc4106(gcm(aes)) {K1} 128" + off(side, "a"))
        pair.xfrm(side, f"state add src {b} dst {a} proto esp spi 0x2002 reqid 2 mode transport "
                        f"aead rfc4106(gcm(aes)) {K2} 128" + off(side, "b"))
    pair.xfrm("a", f"policy add src {a} dst {b} dir out tmpl proto esp reqid 1 mode transport{pol}")
    pair.xfrm("a", f"policy add src {b} dst {a} dir in tmpl proto esp reqid 2 mode transport{pol}")
    pair.xfrm("b", f"policy add src {b} dst {a} dir out tmpl proto esp reqid 2 mode transport{pol}")
    pair.xfrm("b", f"policy add src {a} dst {b} dir in tmpl proto esp reqid 1 mode transport{pol}")
    capture = tmp_path / "veth.pcap"
    dump = subprocess.Popen(["ip", "netns", "exec", pair.ns["b"], "tcpdump", "-ni", pair.dev["b"], "-w",
                             str(capture), WIRE_FILTER], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # And on A's TUN: had the daemon's ESP followed the route to B into xfrm0, it would show here.
    inner = tmp_path / "tun.pcap"
    tun_dump = subprocess.Popen(["ip", "netns", "exec", pair.ns["a"], "tcpdump", "-ni", "xfrm0", "-w", str(inner)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.0)
    ping = pair.exec("a", "busybox", "ping" if family == 4 else "ping6", "-c", "3", "-W", "2", b, check=False)
    assert ping.returncode == 0 and "3 packets received" in ping.stdout, ping.stdout + ping.stderr
    transfer(pair, "a", a, b, 10 * 1024 * 1024)
    transfer(pair, "b", b, a, 10 * 1024 * 1024)
    time.sleep(0.5)
    for d in (dump, tun_dump):
        d.send_signal(signal.SIGINT)
        d.communicate(timeout=10)
    listing = run("tcpdump", "-nr", str(capture)).stdout.splitlines()
    assert len(listing) > 50 and all(": ESP(spi=0x0000" in l for l in listing), \
        [l for l in listing if "ESP(" not in l][:5]
    tun_listing = run("tcpdump", "-nr", str(inner)).stdout.splitlines()
    assert len(tun_listing) > 50 and not [l for l in tun_listing if "ESP" in l], "no ESP looped into the TUN"
    for side in "ab":
        stats = pair.xfrm(side, "-s state list")
        assert "replay-window 0 replay 0 failed 0" in stats and " 0(packets)" not in stats, stats
    m = pair.metrics("a")
    assert m['xfrmd_datapath_packets_total{event="not_esp"}'] == 0, m
    if offload != "software":
        dev = {k.split('counter="')[1].rstrip('"}'): v for k, v in m.items() if k.startswith("xfrmd_device_total{")}
        tx, rx = ("crypto_tx", "crypto_rx") if offload == "crypto" else ("esp_tx", "esp_rx")
        assert dev[tx] > 1000 and dev[rx] > 1000 and dev["icv_errors"] == 0, dev


# From 10.0.1.1, routed into xfrm0 towards 10.9.9.9 (no policy): a UDP 4500 → 4500 datagram whose payload starts
# like ESP-in-UDP (the daemon holds port 4500 in this namespace, so it is built by hand) and an IP protocol 50
# packet.
