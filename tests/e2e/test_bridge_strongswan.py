"""Unmodified strongSwan programs xfrmd over XFRM netlink: in each of two namespaces an xfrmd and a charon (its
kernel-netlink plugin, Debian's strongSwan 5.9.8) started through `xfrm-bridge`, so charon's NETLINK_XFRM socket talks
to the daemon while its routes, addresses and IKE sockets stay with the kernel. IKEv2 with a PSK negotiates one
CHILD_SA for 10.0.1.0/24,2001:db8:1::/64 ⟷ 10.0.2.0/24,2001:db8:2::/64; each charon installs it into its xfrmd
(ALLOCSPI, NEWSA, UPDSA, policies), and the data plane is xfrmd's alone.

No NAT: ESP is raw (IP protocol 50) and IKE stays on UDP 500, so the daemons leave UDP 4500 to charon (their NAT-T
port is moved aside). charon runs with install_routes = no; the daemons route what their OUT policies protect into
their TUN devices (`xfrmd --route-policies`).

Checked per ESP proposal and family: the SAs and policies in xfrmd carry charon's SPIs and traffic selectors; ping
and a TCP transfer both ways with a verified hash; the veth carried only ESP on those SPIs, sequence numbers one by
one, and tshark decrypted every packet with its ICV good (ChaCha20-Poly1305: tshark has no decoder, the other checks
stand); swanctl --list-sas shows xfrmd's byte and packet counters (charon reads them with GETSA); swanctl --terminate
removes every SA and policy it installed from both daemons."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import types
import uuid
from pathlib import Path

import pytest

from charonlib import Charon, parse_swanctl_raw, require_tools, run
from daemonlib import WIRE_FILTER, Pair, check_tunnel, transfer

SIZE = 100 * 1000 * 1000  # bytes per TCP transfer, each way: the 100 MB, for every proposal and family
OUTER = {False: {"a": "192.0.2.1", "b": "192.0.2.2"}, True: {"a": "2001:db8::1", "b": "2001:db8::2"}}
TS = {"a": "10.0.1.0/24,2001:db8:1::/64", "b": "10.0.2.0/24,2001:db8:2::/64"}
# strongSwan's ESP proposal → what charon reports for it.
PROPOSALS = {
    "aes128gcm16": {"encr-alg": "AES_GCM_16", "encr-keysize": "128"},
    "aes256gcm16": {"encr-alg": "AES_GCM_16", "encr-keysize": "256"},
    "chacha20poly1305": {"encr-alg": "CHACHA20_POLY1305"},
    "aes128-sha256": {"encr-alg": "AES_CBC", "encr-keysize": "128", "integ-alg": "HMAC_SHA2_256_128"},
}


def tshark_sas(listing: str) -> list:
    """xfrmd's `state list` (keys shown) → the SAs as tshark's ESP SA table takes them; [] when tshark cannot
    decrypt the algorithm (ChaCha20-Poly1305)."""
    sas = []
    for block in re.split(r"(?m)^(?=src )", listing):
        spi = re.search(r"spi 0x([0-9a-f]{8})", block)
        if not spi:
            continue
        gcm = re.search(r"aead rfc4106\(gcm\(aes\)\) (0x[0-9a-f]+) 128", block)
        cbc = re.search(r"enc cbc\(aes\) (0x[0-9a-f]+)", block)
        sha = re.search(r"auth-trunc hmac\(sha256\) (0x[0-9a-f]+) 128", block)
        if gcm:
            sas.append((int(spi[1], 16), "AES-GCM with 16 octet ICV [RFC4106]", gcm[1], "NULL", ""))
        elif cbc and sha:
            sas.append((int(spi[1], 16), "AES-CBC [RFC3602]", cbc[1], "HMAC-SHA-256-128 [RFC4868]", sha[1]))
        else:
            assert "rfc7539esp(chacha20,poly1305)" in block, block
            return []
    return sas


@contextlib.contextmanager
def bridged_peers(tmp_path, proposal, outer6, child_settings=(), daemon_args=()):
    """Two namespaces, each with an xfrmd and a charon started through xfrm-bridge, connection loaded; yields
    (pair, charons, diag)."""
    require_tools(plugins=())
    bridge = str(Path(os.environ["XFRM_TOOL"]).with_name("xfrm-bridge"))
    # Short: the vici sockets are Unix sockets (108-byte paths), which pytest's tmp_path can exceed.
    d = Path(tempfile.mkdtemp(prefix="xbs-", dir="/tmp"))
    # The daemons route what their OUT policies protect into their TUN devices (--route-policies), as charon
    # would route into the kernel's: nothing else is configured for the inner traffic.
    pair = Pair(tmp_path, daemon_args=["--udp-port", "14500", "--route-policies", *daemon_args], routes=False)
    charons = {}

    def diag():
        return "\n".join(f"--- charon {s} log (tail) ---\n" + "\n".join(c.log().splitlines()[-30:])
                         for s, c in charons.items())
    try:
        outer = OUTER[outer6]
        for side, peer in [("a", "b"), ("b", "a")]:
            charons[side] = Charon(pair.ns[side], d / side, side, outer[side], outer[peer], TS[side], TS[peer],
                                   proposal, plugins="", settings=("install_routes = no",),
                                   wrapper=(bridge, "-S", str(pair.sock[side])), log_levels=("knl = 2", "chd = 1"),
                                   child_settings=child_settings)
        for c in charons.values():
            c.load(diag=diag)
        yield pair, charons, diag
    finally:
        for c in charons.values():
            c.stop()
        pair.close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("outer6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("proposal", list(PROPOSALS))
def test_charon_through_the_bridge_programs_xfrmd_and_traffic_flows(tmp_path, proposal, outer6):
    with bridged_peers(tmp_path, proposal, outer6) as (pair, charons, diag):
        outer = OUTER[outer6]
        charons["a"].swanctl("--initiate", "--child", "net", "--timeout", "20", diag=diag)
        listed = {s: parse_swanctl_raw(c.swanctl("--list-sas", "--raw", diag=diag))["child"]
                  for s, c in charons.items()}
        for side, child in listed.items():
            assert child.get("state") == "INSTALLED" and child.get("mode") == "TUNNEL" \
                and child.get("encap") != "yes", (side, child)
            assert {k: child.get(k) for k in PROPOSALS[proposal]} == PROPOSALS[proposal], (side, child)
        spi_ab, spi_ba = listed["a"]["spi-out"], listed["a"]["spi-in"]
        assert (listed["b"]["spi-in"], listed["b"]["spi-out"]) == (spi_ab, spi_ba) and spi_ab != spi_ba, listed

        # What charon installed is in each daemon: its SPIs between the outer addresses, its selectors as policies.
        for side in "ab":
            states = pair.xfrm(side, "state list")
            for spi, src, dst in [(spi_ab, outer["a"], outer["b"]), (spi_ba, outer["b"], outer["a"])]:
                assert re.search(rf"src {re.escape(src)} dst {re.escape(dst)}\n\tproto esp spi 0x{spi} reqid \d+ "
                                 r"mode tunnel", states), (side, spi, states)
            policies = pair.xfrm(side, "policy list")
            me, peer = ("a", "b") if side == "a" else ("b", "a")
            for mine, theirs in zip(TS[me].split(","), TS[peer].split(",")):
                assert f"src {mine} dst {theirs} \n\tdir out" in policies, (side, policies)
                assert f"src {theirs} dst {mine} \n\tdir in" in policies, (side, policies)
                assert f"src {theirs} dst {mine} \n\tdir fwd" in policies, (side, policies)

            # --route-policies: one route into the TUN per OUT policy destination.
            routes = pair.ip(side, "-4", "route", "show", "dev", "xfrm0").stdout + \
                pair.ip(side, "-6", "route", "show", "dev", "xfrm0").stdout
            for theirs in TS[peer].split(","):
                assert f"{theirs} proto static scope link" in routes or f"{theirs} proto static metric" in routes, \
                    (side, routes)

        # The data plane: ping, TCP both ways, only ESP on the wire, every ICV good, counters clean.
        size = SIZE
        check_tunnel(pair, tmp_path, natt=False, outer6=outer6, inner6=outer6, size=size, gso=False,
                     sas=tshark_sas(pair.xfrm("b", "state list")))

        # charon reads its counters from xfrmd (GETSA): the transfers are in them, both ways.
        child = parse_swanctl_raw(charons["a"].swanctl("--list-sas", "--raw", diag=diag))["child"]
        for direction in ("in", "out"):
            assert int(child[f"bytes-{direction}"]) > size and int(child[f"packets-{direction}"]) > size // 1400, child

        # Terminating removes everything charon installed, from both daemons (the peer's charon hears the DELETE).
        charons["a"].swanctl("--terminate", "--ike", "peer", diag=diag)
        deadline = time.time() + 10
        while any(pair.xfrm(s, "state list") or pair.xfrm(s, "policy list") for s in "ab"):
            assert time.time() < deadline, [(pair.xfrm(s, "state list"), pair.xfrm(s, "policy list")) for s in "ab"]
            time.sleep(0.1)
        # With the policies gone, so are the daemons' routes.
        deadline = time.time() + 5
        while any("proto static" in pair.ip(s, "-4", "route", "show", "dev", "xfrm0").stdout
                  + pair.ip(s, "-6", "route", "show", "dev", "xfrm0").stdout for s in "ab"):
            assert time.time() < deadline, [pair.ip(s, "route", "show", "dev", "xfrm0").stdout for s in "ab"]
            time.sleep(0.1)
        # No SPD entry went to the kernel's own XFRM tables; all it holds are the per-socket bypass policies charon
        # sets on its IKE sockets (setsockopt IP_XFRM_POLICY: kernel sockets, so the kernel's, listed as `socket`).
        for side in "ab":
            kernel = pair.ip(side, "xfrm", "policy", "list").stdout
            assert "\tdir " not in kernel and kernel.count("\tsocket ") >= 2, (side, kernel)


def test_charon_route_based_child_sa_with_if_id_through_xfrmd_as_an_xfrm_interface(tmp_path):
    """A route-based CHILD_SA (if_id_in = if_id_out = 42, as strongSwan sets up for an XFRM interface): charon
    installs its SAs and policies with if_id 42 over XFRM netlink (XFRMA_IF_ID); `xfrmd --if-id 42` makes the TUN
    that interface, so what is routed into it meets those policies, and the decapsulated traffic passes the IN
    policy of its SA's if_id. Ping and TCP both ways, only ESP on the wire."""
    with bridged_peers(tmp_path, "aes128gcm16", False, child_settings=("if_id_in = 42", "if_id_out = 42"),
                       daemon_args=("--if-id", "42")) as (pair, charons, diag):
        charons["a"].swanctl("--initiate", "--child", "net", "--timeout", "20", diag=diag)
        for side in "ab":
            states, policies = pair.xfrm(side, "state list"), pair.xfrm(side, "policy list")
            assert states.count("if_id 0x2a") == 2, (side, states)
            # in, out and fwd for each family's selectors
            assert policies.count("if_id 0x2a") == 6, (side, policies)
        check_tunnel(pair, tmp_path, natt=False, outer6=False, inner6=False, size=10 * 1000 * 1000, gso=False,
                     sas=tshark_sas(pair.xfrm("b", "state list")))


def test_charon_trap_policies_negotiate_on_the_first_packet_through_xfrmd(tmp_path):
    """start_action = trap: each charon installs only its CHILD_SA's policies into its xfrmd (the OUT one a template
    without an SA). a's first packet to b meets the trap: xfrmd sends XFRM_MSG_ACQUIRE through the bridge, charon
    negotiates the CHILD_SA and installs it (ALLOCSPI, NEWSA, UPDSA), and the pings get through."""
    with bridged_peers(tmp_path, "aes128gcm16", False, child_settings=("start_action = trap",)) as (pair, charons,
                                                                                                    diag):
        deadline = time.time() + 10
        while "dir out" not in pair.xfrm("a", "policy list"):
            assert time.time() < deadline, (pair.xfrm("a", "policy list"), diag())
            time.sleep(0.1)
        assert pair.xfrm("a", "state list") == "", "a trap is a policy without an SA"
        deadline = time.time() + 20
        while pair.exec("a", "busybox", "ping", "-c", "1", "-W", "1", "-I", "10.0.1.1", "10.0.2.1",
                        check=False).returncode != 0:
            assert time.time() < deadline, (pair.xfrm("a", "state list"), pair.xfrm("a", "policy list"), diag())
        assert "XFRM_MSG_ACQUIRE" in charons["a"].log(), diag()
        listed = parse_swanctl_raw(charons["a"].swanctl("--list-sas", "--raw", diag=diag))["child"]
        assert listed.get("state") == "INSTALLED", (listed, diag())
        for side in "ab":
            blocks = [b for b in re.split(r"(?m)^(?=src )", pair.xfrm(side, "state list")) if b.strip()]
            keyed = [b for b in blocks if re.search(r"spi 0x(?!0{8})[0-9a-f]{8} ", b)]
            spis = {re.search(r"spi 0x([0-9a-f]{8})", b)[1] for b in keyed}
            assert spis == {listed["spi-in"], listed["spi-out"]}, (side, blocks)
            # Anything else is the larval SA of a's ACQUIRE (SPI 0), which goes by itself after 30 s.
            assert all(b in keyed or "spi 0x00000000" in b for b in blocks), (side, blocks)
        ping = pair.exec("a", "busybox", "ping", "-c", "3", "-W", "2", "-I", "10.0.1.1", "10.0.2.1", check=False)
        assert ping.returncode == 0, (ping.stdout, diag())
        # The pings went through xfrmd's SAs: charon reads their counters from it (GETSA).
        child = parse_swanctl_raw(charons["a"].swanctl("--list-sas", "--raw", diag=diag))["child"]
        assert int(child["packets-out"]) >= 3 and int(child["packets-in"]) >= 3, child


def check_offload(pair, mode):
    """Every SA in each daemon sits where `mode` puts it: on the NIC named after the side's veth, in crypto or
    packet mode, both directions; with packet offload the policies are on the NIC too."""
    for side in "ab":
        states = pair.xfrm(side, "state list")
        blocks = [b for b in re.split(r"(?m)^(?=src )", states) if "proto esp" in b]
        assert blocks, (side, states)
        for b in blocks:
            offload = re.search(r"crypto offload parameters: dev (\S+) dir (in|out) mode (\w+)", b)
            if mode == "software":
                assert offload is None, (side, b)
            else:
                assert offload and offload[1] == pair.dev[side] and offload[3] == mode.split("-")[0], (side, b)
        policies = pair.xfrm(side, "policy list")
        offloaded = re.findall(rf"crypto offload parameters: dev {pair.dev[side]} mode packet", policies)
        assert len(offloaded) == (6 if mode == "packet-offload" else 0), (side, policies)


REKEY_BYTES = 4 * 1024 * 1024  # charon's rekey_bytes: xfrmd's soft byte limit on each SA
# Where the SAs live: xfrmd's options, and charon's child settings. charon 5.9.8 asks for crypto offload only
# (hw_offload = yes: the SA fails unless the interface of its outer address shows esp-hw-offload, which the bridge
# answers for the daemon's --offload-dev); --offload-promote serves those requests in packet mode.
REKEY_MODES = {
    "software": ((), ()),
    "crypto-offload": (("--offload", "crypto", "--offload-dev", "{dev}"), ("hw_offload = yes",)),
    "packet-offload": (("--offload", "packet", "--offload-dev", "{dev}", "--offload-promote"), ("hw_offload = yes",)),
}


@pytest.mark.parametrize("mode", list(REKEY_MODES))
def test_xfrmd_soft_expiry_makes_charon_rekey_while_a_transfer_runs(tmp_path, mode):
    """charon installs its byte limits (rekey_bytes soft, life_bytes hard) into xfrmd; xfrmd counts the bytes and sends
    EXPIRE hard=0 at the soft limit; charon, listening on XFRMNLGRP_EXPIRE through the bridge, rekeys the CHILD_SA
    (new SAs into xfrmd, then the old ones deleted) while TCP keeps running, again and again. With the SAs in
    software, with simulated-NIC crypto offload, and with packet offload, where the NIC counts and the core learns
    the counts (and so the soft limit) through the device's stats sync."""
    daemon_args, offload_settings = REKEY_MODES[mode]
    # The hard limit far above the soft one: a CPU-starved charon still rekeys before any packet meets it.
    settings = (f"rekey_bytes = {REKEY_BYTES}", f"life_bytes = {16 * REKEY_BYTES}", "rand_bytes = 0",
                *offload_settings)
    with bridged_peers(tmp_path, "aes128gcm16", False, child_settings=settings,
                       daemon_args=daemon_args) as (pair, charons, diag):
        charons["a"].swanctl("--initiate", "--child", "net", "--timeout", "20", diag=diag)
        first = parse_swanctl_raw(charons["a"].swanctl("--list-sas", "--raw", diag=diag))["child"]
        limits = pair.xfrm("a", "-s state list")
        assert f"limit: soft {REKEY_BYTES}(bytes), hard {16 * REKEY_BYTES}(bytes)" in limits, limits
        check_offload(pair, mode)

        capture = tmp_path / "veth.pcap"
        dump = subprocess.Popen(["ip", "netns", "exec", pair.ns["b"], "tcpdump", "-ni", pair.dev["b"], "-w",
                                 str(capture), "-s", "96", WIRE_FILTER], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(1.0)
        try:
            transfer(pair, "a", "10.0.1.1", "10.0.2.1", 6 * REKEY_BYTES)  # hash checked at both ends
            transfer(pair, "b", "10.0.2.1", "10.0.1.1", 6 * REKEY_BYTES)
            time.sleep(1.0)
        finally:
            dump.send_signal(signal.SIGINT)
            dump.communicate(timeout=10)

        # The EXPIREs came from xfrmd's accounting and charon acted on them: rekeyed CHILD_SAs with new SPIs.
        log = charons["a"].log() + charons["b"].log()
        expires = len(re.findall(r"received a XFRM_MSG_EXPIRE", log))
        assert expires >= 4, (expires, diag())
        # A rekey may be under way when the transfers end (the old CHILD_SA listed DELETED, the new one not yet
        # INSTALLED): wait for it to finish.
        deadline = time.time() + 15
        while True:
            now = parse_swanctl_raw(charons["a"].swanctl("--list-sas", "--raw", diag=diag))["child"]
            if now.get("state") == "INSTALLED" or time.time() > deadline:
                break
            time.sleep(0.2)
        assert now["state"] == "INSTALLED" and now["spi-in"] != first["spi-in"], (first, now)
        # Each daemon ends with the current pair only: every old SA is deleted (charon keeps a rekeyed inbound SA
        # for delete_rekeyed_delay, 5 s, for packets still in flight).
        deadline = time.time() + 15
        while any(pair.xfrm(side, "state list").count("\tproto esp spi") != 2 for side in "ab"):
            assert time.time() < deadline, ([pair.xfrm(side, "state list") for side in "ab"], diag())
            time.sleep(0.2)
        assert f"spi 0x{now['spi-in']}" in pair.xfrm("a", "state list")
        check_offload(pair, mode)  # the rekeyed SAs are where the first ones were

        # Nothing left in clear: every frame between the hosts was ESP or IKE (UDP 500).
        listing = subprocess.run(["tcpdump", "-nr", str(capture)], capture_output=True, text=True,
                                 timeout=120).stdout.splitlines()
        assert len(listing) > 6 * REKEY_BYTES // 1400, len(listing)
        clear = [l for l in listing if ": ESP(spi=0x" not in l and ".500 > " not in l]
        assert not clear, clear[:5]
        spis = {l.split("ESP(spi=")[1][:10] for l in listing if "ESP(spi=" in l}
        assert len(spis) >= 4, spis
        # No packet met a missing or dead SA, a replay or an ICV failure on either side.
        for side in "ab":
            m = pair.metrics(side)
            moved = {k: v for k, v in m.items() if k.startswith("xfrm_stat_total{") and v}
            assert not moved, (side, moved)


def test_nat_t_port_shared_with_charon_against_strongswan_kernel_libipsec(tmp_path):
    """A: xfrmd --share-natt-port and charon through xfrm-bridge --share-natt-port, both on UDP 4500; B: charon with
    kernel-libipsec (its own userspace ESP, always in UDP 4500). IKE moves to 4500 and keeps working there (rekeys
    of the IKE SA and the CHILD_SA after traffic, dead-peer detection while idle) while A's ESP in UDP 4500 is
    xfrmd's: the kernel steers each datagram by its first four bytes, as UDP_ENCAP would."""
    require_tools()
    bridge = str(Path(os.environ["XFRM_TOOL"]).with_name("xfrm-bridge"))
    xfrmd = str(Path(os.environ["XFRM_TOOL"]).with_name("xfrmd"))
    tag = uuid.uuid4().hex[:6]
    ns = {"a": f"bnA{tag}", "b": f"bnB{tag}"}
    dev = {"a": f"na{tag}", "b": f"nb{tag}"}
    inner = {"a": "10.0.1.1", "b": "10.0.2.1"}
    d = Path(tempfile.mkdtemp(prefix="xbn-", dir="/tmp"))
    sock = d / "x.sock"
    procs, charons = [], {}

    def ip(side, *args):
        return run("ip", "-n", ns[side], *args)

    def diag():
        return "\n".join(f"--- charon {s} log (tail) ---\n" + "\n".join(c.log().splitlines()[-30:])
                         for s, c in charons.items())
    try:
        for n in ns.values():
            run("ip", "netns", "add", n)
        run("ip", "link", "add", dev["a"], "netns", ns["a"], "type", "veth", "peer", "name", dev["b"], "netns", ns["b"])
        for side, n in [("a", 1), ("b", 2)]:
            ip(side, "addr", "add", f"192.0.2.{n}/24", "dev", dev[side])
            ip(side, "link", "set", "lo", "up")
            ip(side, "link", "set", dev[side], "up")
        ip("b", "addr", "add", inner["b"] + "/32", "dev", "lo")
        procs.append(subprocess.Popen(["ip", "netns", "exec", ns["a"], xfrmd, "--socket", str(sock),
                                       "--share-natt-port", "--route-policies", "--metrics", "127.0.0.1:9117"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        deadline = time.time() + 10
        while not sock.exists():
            assert procs[0].poll() is None and time.time() < deadline, procs[0].stderr.read()
            time.sleep(0.05)
        ip("a", "addr", "add", inner["a"] + "/32", "dev", "xfrm0")
        ip("a", "link", "set", "xfrm0", "mtu", "1400")
        charons["a"] = Charon(ns["a"], d / "a", "a", "192.0.2.1", "192.0.2.2", "10.0.1.1/32", "10.0.2.1/32",
                              "aes128gcm16", plugins="", settings=("install_routes = no",),
                              wrapper=(bridge, "-S", str(sock), "--share-natt-port"), log_levels=("knl = 2", "net = 2"),
                              conn_settings=("dpd_delay = 1s",))
        charons["b"] = Charon(ns["b"], d / "b", "b", "192.0.2.2", "192.0.2.1", "10.0.2.1/32", "10.0.1.1/32",
                              "aes128gcm16", plugins="kernel-libipsec", log_levels=("net = 2",))
        for c in charons.values():
            c.load(diag=diag)
        charons["a"].swanctl("--initiate", "--child", "net", "--timeout", "20", diag=diag)
        child = parse_swanctl_raw(charons["b"].swanctl("--list-sas", "--raw", diag=diag))
        assert child["child"].get("encap") == "yes" and child["ike"].get("local-port") == "4500", (child, diag())
        states = run(os.environ["XFRM_TOOL"], "-S", str(sock), "state", "list").stdout
        assert states.count("encap type espinudp sport 4500 dport 4500") == 2, states

        capture = d / "veth.pcap"
        dump = subprocess.Popen(["ip", "netns", "exec", ns["b"], "tcpdump", "-ni", dev["b"], "-w", str(capture),
                                 "-s", "128", WIRE_FILTER], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(1.0)
        try:
            for src, dst in [("a", "b"), ("b", "a")]:
                r = run("ip", "netns", "exec", ns[src], "busybox", "ping", "-c", "3", "-W", "2", "-I", inner[src],
                        inner[dst], check=False)
                assert r.returncode == 0 and "3 packets received" in r.stdout, (src, r.stdout, diag())
            peers = types.SimpleNamespace(ns=ns, exec=lambda side, *argv, **kw: run("ip", "netns", "exec", ns[side],
                                                                                    *argv, **kw))
            transfer(peers, "a", inner["a"], inner["b"], 4 * 1024 * 1024)
            transfer(peers, "b", inner["b"], inner["a"], 4 * 1024 * 1024)
            # IKE over the shared port after ESP flowed: rekey the IKE SA (from A) and the CHILD_SA (from B).
            charons["a"].swanctl("--rekey", "--ike", "peer", diag=diag)
            charons["b"].swanctl("--rekey", "--child", "net", diag=diag)
            time.sleep(1.0)
            r = run("ip", "netns", "exec", ns["a"], "busybox", "ping", "-c", "3", "-W", "2", "-I", inner["a"],
                    inner["b"], check=False)
            assert r.returncode == 0 and "3 packets received" in r.stdout, (r.stdout, diag())
        finally:
            dump.send_signal(signal.SIGINT)
            dump.communicate(timeout=10)
        # Dead-peer detection over the shared port: idle, A's charon asks B every second and gets its answers.
        time.sleep(4)
        log_a = charons["a"].log()
        assert len(re.findall(r"sending DPD request", log_a)) >= 2, diag()
        assert not re.search(r"giving up|retransmit \d+ of request", log_a), diag()
        assert parse_swanctl_raw(charons["a"].swanctl("--list-sas", "--raw", diag=diag))["ike"]["state"] == \
            "ESTABLISHED", diag()
        # On the wire: UDP only (IKE on 500, then IKE and ESP on 4500), nothing in clear.
        listing = run("tcpdump", "-nr", str(capture)).stdout.splitlines()
        assert len(listing) > 1000, len(listing)  # xfrmd's ESP leaves as UDP GSO batches: one frame each here
        assert all(re.search(r" 192\.0\.2\.[12]\.(500|4500) > 192\.0\.2\.[12]\.(500|4500): ", l) for l in listing), \
            [l for l in listing if not re.search(r"\.(500|4500) > ", l)][:5]
        ike_4500 = [l for l in listing if ".4500 > " in l and "UDP-encap: ESP" not in l and "isakmp" in l.lower()]
        assert len(ike_4500) >= 4, ("IKE on 4500", listing[:20])
        # IKE never reached xfrmd (it would count ike_dropped) and ESP never reached charon (every packet counted).
        text = run("ip", "netns", "exec", ns["a"], "python3", "-c", "import urllib.request; print(urllib.request."
                   "urlopen('http://127.0.0.1:9117/metrics', timeout=5).read().decode())").stdout
        metrics = {l.rsplit(" ", 1)[0]: float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l and l[0] != "#"}
        assert metrics.get('xfrmd_datapath_packets_total{event="ike_dropped"}') == 0, metrics
        b_child = parse_swanctl_raw(charons["b"].swanctl("--list-sas", "--raw", diag=diag))["child"]
        assert b_child["state"] == "INSTALLED", b_child
        log_b = charons["b"].log()
        assert not re.search(r"ICV verification failed|sequence number verification failed", log_b), diag()
    finally:
        for c in charons.values():
            c.stop()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            try:
                p.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        for n in ns.values():
            run("ip", "netns", "del", n, check=False)
        shutil.rmtree(d, ignore_errors=True)
