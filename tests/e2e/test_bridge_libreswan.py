"""Unmodified libreswan programs xfrmd over XFRM netlink: in each of two namespaces an xfrmd and a pluto (Debian 12's
libreswan 4.10, its XFRM kernel backend) started through `xfrm-bridge`, so pluto's NETLINK_XFRM sockets talk to the
daemon while its routes, addresses and IKE sockets stay with the kernel. IKEv2 with a PSK negotiates one Child SA
for 10.0.1.0/24 ⟷ 10.0.2.0/24 (2001:db8:1::/64 ⟷ 2001:db8:2::/64 over IPv6); each pluto installs it into its xfrmd
(GETSPI, NEWSA, UPDSA, policies with UPDPOLICY), and the data plane is xfrmd's alone.

Debian's libreswan package conflicts with strongSwan's (strongswan-starter, strongswan-libcharon), so it is not
installed: scripts/test.sh unpacks its .deb under .build/libreswan (env LIBRESWAN_ROOT) and installs the libraries
it links. pluto runs its own `addconn` from the compiled-in /usr/libexec/ipsec, so each pluto sees the unpacked
tree there through an overlay mount in its own mount namespace (`ip netns exec` gives it one). No NAT: ESP is raw
(IP protocol 50), IKE stays on UDP 500, the daemons leave 4500 to pluto (--udp-port 14500); pluto's updown is off
(leftupdown=/bin/true: it would route the peer's subnet to the veth), the daemons route what their OUT policies
protect into their TUN devices (`xfrmd --route-policies`).

Checked per ESP proposal: the SAs in xfrmd carry pluto's SPIs, algorithm and keys, its selectors as out/in/fwd
policies; ping and a TCP transfer both ways with a verified hash; the veth carried only ESP on those SPIs, sequence
numbers one by one, and tshark decrypted every packet with its ICV good (ChaCha20-Poly1305: tshark has no decoder,
the other checks stand); `whack --trafficstatus` shows xfrmd's byte counters (pluto reads them with GETSA);
`whack --terminate` removes every SA and Child SA policy from both daemons (the bypass policies pluto installs for
IPv6 neighbour discovery at start stay, as they would in the kernel); nothing reached the kernel's own SPD."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from daemonlib import Pair, check_tunnel, run

REPO = Path(__file__).resolve().parents[2]
LIBRESWAN = Path(os.environ.get("LIBRESWAN_ROOT", REPO / ".build" / "libreswan"))
EXECDIR = LIBRESWAN / "usr" / "libexec" / "ipsec"
PSK = "swift-xfrm-live-interop-psk-0123456789"
SIZE = 100 * 1000 * 1000  # bytes per TCP transfer, each way: the 100 MB of the charon tests
OUTER = {False: {"a": "192.0.2.1", "b": "192.0.2.2"}, True: {"a": "2001:db8::1", "b": "2001:db8::2"}}
SUBNET = {False: {"a": "10.0.1.0/24", "b": "10.0.2.0/24"}, True: {"a": "2001:db8:1::/64", "b": "2001:db8:2::/64"}}
# libreswan's esp= → what pluto reports it negotiated, and how xfrmd lists the SA's algorithms and keys.
PROPOSALS = {
    "aes_gcm128": ("AES_GCM_16_128-NONE", [r"\taead rfc4106\(gcm\(aes\)\) 0x[0-9a-f]{40} 128\n"]),
    "aes128-sha2_256": ("AES_CBC_128-HMAC_SHA2_256_128",
                        [r"\tenc cbc\(aes\) 0x[0-9a-f]{32}\n", r"\tauth-trunc hmac\(sha256\) 0x[0-9a-f]{64} 128\n"]),
    "chacha20_poly1305": ("CHACHA20_POLY1305-NONE", [r"\taead rfc7539esp\(chacha20,poly1305\) 0x[0-9a-f]{72} 128\n"]),
}


def require_libreswan():
    """The suite never skips: a missing piece is a failure that says how to get it."""
    missing = [str(EXECDIR / t) for t in ("pluto", "whack", "addconn") if not os.access(EXECDIR / t, os.X_OK)]
    missing += [t for t in ("certutil", "tcpdump", "busybox", "tshark") if shutil.which(t) is None]
    if not missing:
        # Unpacked, not installed: its libraries are apt's business (scripts/test.sh installs them).
        v = run(str(EXECDIR / "pluto"), "--version", check=False)
        if v.returncode != 0 or "Libreswan 4." not in v.stdout + v.stderr:
            missing.append(f"a pluto that runs ({v.stdout}{v.stderr})")
    if missing:
        pytest.fail("libreswan cannot run, missing: " + ", ".join(missing) + f" (LIBRESWAN_ROOT={LIBRESWAN}; "
                    "scripts/test.sh unpacks Debian's libreswan .deb there, `apt-get download libreswan && dpkg-deb "
                    "-x libreswan_*.deb .build/libreswan`, and installs libnss3-tools libldns3 "
                    "libevent-pthreads-2.1-7; `apt-get install libreswan` would remove strongSwan)", pytrace=False)


class Pluto:
    """One pluto in namespace `ns` through `wrapper` (xfrm-bridge), its files in `d` (ipsec.conf, ipsec.secrets, NSS
    db, run/pluto.ctl, pluto.log), one connection `net`: IKEv2, PSK, tunnel mode, `esp`."""

    def __init__(self, ns, d: Path, side, local, remote, local_net, remote_net, esp, esn, wrapper):
        self.ns, self.dir, self.side = ns, d, side
        for sub in ("run", "nss", "ipsec.d"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        run("certutil", "-N", "-d", f"sql:{d / 'nss'}", "--empty-password")
        peer = "b" if side == "a" else "a"
        (d / "ipsec.conf").write_text("\n\t".join([
            "config setup", "plutodebug=all", f"nssdir={d / 'nss'}", f"secretsfile={d / 'ipsec.secrets'}",
            f"ipsecdir={d / 'ipsec.d'}", f"dumpdir={d / 'run'}"]) + "\n\n" + "\n\t".join([
            "conn net", "ikev2=insist", "authby=secret", "type=tunnel", "ike=aes128-sha2_256;modp2048", f"esp={esp}",
            f"esn={esn}", f"left={local}", f"leftid=@{side}.example", f"leftsubnet={local_net}", "leftupdown=/bin/true",
            f"right={remote}", f"rightid=@{peer}.example", f"rightsubnet={remote_net}", "rightupdown=/bin/true",
            "auto=add"]) + "\n")
        (d / "ipsec.secrets").write_text(f'@{side}.example @{peer}.example : PSK "{PSK}"\n')
        # `ip netns exec` gives pluto a mount namespace of its own: the overlay (the unpacked libexec over the
        # host's) is pluto's alone. exec all the way down: the Popen's pid is pluto's.
        mount = f"mount -t overlay overlay -o lowerdir={LIBRESWAN / 'usr' / 'libexec'}:/usr/libexec /usr/libexec"
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "sh", "-c", f'{mount} && exec {" ".join(wrapper)} "$@"', "pluto",
             str(EXECDIR / "pluto"), "--nofork", "--stderrlog", "--config", str(d / "ipsec.conf"),
             "--rundir", str(d / "run"), "--nssdir", str(d / "nss"), "--secretsfile", str(d / "ipsec.secrets"),
             "--ipsecdir", str(d / "ipsec.d"), "--dumpdir", str(d / "run")],
            stdout=open(d / "pluto.log", "w"), stderr=subprocess.STDOUT)

    @property
    def ctl(self) -> Path:
        return self.dir / "run" / "pluto.ctl"

    def log(self) -> str:
        p = self.dir / "pluto.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def load(self, diag=lambda: ""):
        """Waits for the control socket and for pluto's own `addconn --autoall` to have added `net`."""
        deadline = time.time() + 20
        while "\"net\":" not in self.whack("--status", check=False):
            assert self.proc.poll() is None, f"pluto {self.side} exited\n{diag()}"
            assert time.time() < deadline, f"pluto {self.side} never added its connection\n{diag()}"
            time.sleep(0.2)

    def whack(self, *args, timeout=60, check=True, diag=lambda: ""):
        r = run("ip", "netns", "exec", self.ns, str(EXECDIR / "whack"), "--ctlsocket", str(self.ctl), *args,
                check=False, timeout=timeout)
        assert not check or r.returncode == 0, (f"whack {' '.join(args)} on {self.side} failed", r.stdout, r.stderr,
                                                diag())
        return r.stdout + r.stderr

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()  # nothing to say goodbye to: the namespaces go next
        self.proc.wait(timeout=10)


def tshark_sas(listing: str) -> list:
    """xfrmd's `state list` (keys shown) → the SAs as tshark's ESP SA table takes them; [] for ChaCha20-Poly1305."""
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
def bridged_plutos(tmp_path, esp, outer6, esn):
    """Two namespaces, each with an xfrmd and a pluto started through xfrm-bridge, connection added; yields
    (pair, plutos, diag)."""
    require_libreswan()
    bridge = str(Path(os.environ["XFRM_TOOL"]).with_name("xfrm-bridge"))
    # Short: pluto's control socket is a Unix socket (108-byte paths), which pytest's tmp_path can exceed.
    d = Path(tempfile.mkdtemp(prefix="xbl-", dir="/tmp"))
    pair = Pair(tmp_path, daemon_args=["--udp-port", "14500", "--route-policies"], routes=False)
    plutos = {}

    def diag():
        return "\n".join(f"--- pluto {s} log (tail, no debug lines) ---\n" +
                         "\n".join([l for l in p.log().splitlines() if ": | " not in l][-40:])
                         for s, p in plutos.items())
    try:
        outer, net = OUTER[outer6], SUBNET[outer6]
        for side, peer in [("a", "b"), ("b", "a")]:
            plutos[side] = Pluto(pair.ns[side], d / side, side, outer[side], outer[peer], net[side], net[peer], esp,
                                 esn, wrapper=(bridge, "-S", str(pair.sock[side])))
        for p in plutos.values():
            p.load(diag=diag)
        yield pair, plutos, diag
    finally:
        for p in plutos.values():
            p.stop()
        pair.close()
        shutil.rmtree(d, ignore_errors=True)


def larval(block, src, dst):
    """An SA entry that is the larval state an ACQUIRE left for a packet from src to dst."""
    return re.match(rf"src {re.escape(src)} dst {re.escape(dst)}\n\tproto esp spi 0x00000000 reqid 0 mode transport",
                    block) is not None


def traffic(plutos, diag):
    """whack --trafficstatus of side a → (inBytes, outBytes) of its one Child SA."""
    status = plutos["a"].whack("--trafficstatus", diag=diag)
    m = re.search(r"type=ESP, add_time=\d+, inBytes=(\d+), outBytes=(\d+)", status)
    assert m, status
    return int(m[1]), int(m[2])


def check_esn_gcm(capture, listing, outer6):
    """Every ESP packet in `capture` authenticates under its SA's AES-GCM key only with the extended sequence
    number's high half in the AAD (RFC 4303 §2.2.1, RFC 4106 §5: SPI ‖ seq-hi ‖ seq-lo), never with the 32-bit
    AAD: tshark (4.0) knows no ESN, so the ICVs are checked here with `cryptography`."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6
    from scapy.utils import rdpcap
    keys = {}
    for block in re.split(r"(?m)^(?=src )", listing):
        spi = re.search(r"spi 0x([0-9a-f]{8})", block)
        key = re.search(r"aead rfc4106\(gcm\(aes\)\) 0x([0-9a-f]{40}) 128", block)
        if spi and key:
            assert re.search(r"flag .*\besn\b", block), block  # pluto asked for ESN (XFRM_STATE_ESN)
            k = bytes.fromhex(key[1])
            keys[spi[1]] = (AESGCM(k[:16]), k[16:])
    assert len(keys) == 2, listing
    checked = 0
    for frame in rdpcap(str(capture)):
        ip = frame.getlayer(IPv6 if outer6 else IP)
        if ip is None or (ip.nh if outer6 else ip.proto) != 50:
            continue
        esp = bytes(ip.payload)
        spi, seq, iv, sealed = esp[:4], esp[4:8], esp[8:16], esp[16:]
        gcm, salt = keys[spi.hex()]
        gcm.decrypt(salt + iv, sealed, spi + b"\0\0\0\0" + seq)  # raises InvalidTag on a bad ICV
        with pytest.raises(InvalidTag):
            gcm.decrypt(salt + iv, sealed, spi + seq)
        checked += 1
    assert checked > 50, checked


# (esp=, outer IPv6, esn=): tshark checks every ICV of the esn=no cases; the ESN case is checked by check_esn_gcm.
CASES = [("aes_gcm128", False, "no"), ("aes_gcm128", True, "no"), ("aes128-sha2_256", False, "no"),
         ("chacha20_poly1305", False, "no"), ("aes_gcm128", False, "yes")]


@pytest.mark.parametrize("esp,outer6,esn", CASES,
                         ids=[f"{e}-{'ipv6' if o else 'ipv4'}{'-esn' if n == 'yes' else ''}" for e, o, n in CASES])
def test_pluto_through_the_bridge_programs_xfrmd_and_traffic_flows(tmp_path, esp, outer6, esn):
    with bridged_plutos(tmp_path, esp, outer6, esn) as (pair, plutos, diag):
        outer, net = OUTER[outer6], SUBNET[outer6]
        up = plutos["a"].whack("--name", "net", "--initiate", diag=diag)
        assert "initiator established Child SA" in up and f"xfrm={PROPOSALS[esp][0]} " in up, (up, diag())
        assert ("{ESP/ESN=>0x" in up) == (esn == "yes"), up
        # The SPIs pluto negotiated, from both ends' status (`esp.OUT@peer esp.IN@me`, `esp:` with IPv6, in hex
        # without leading zeros): a's outbound is b's inbound and the other way round.
        spis = {}
        for side, p in plutos.items():
            deadline = time.time() + 5
            while not (m := re.search(r'"net" esp[.:]([0-9a-f]{1,8})@\S+ esp[.:]([0-9a-f]{1,8})@',
                                      status := p.whack("--status", diag=diag))):
                assert time.time() < deadline, (side, [l for l in status.splitlines() if '"net"' in l])
                time.sleep(0.2)
            spis[side] = (m[1].zfill(8), m[2].zfill(8))  # pluto drops leading zeros
        assert spis["a"] == spis["b"][::-1] and spis["a"][0] != spis["a"][1], spis
        spi_ab, spi_ba = spis["a"]

        for side in "ab":
            # What pluto installed is in each daemon: its SPIs between the outer addresses, with its algorithm.
            states = pair.xfrm(side, "state list")
            for spi, src, dst in [(spi_ab, outer["a"], outer["b"]), (spi_ba, outer["b"], outer["a"])]:
                block = re.search(rf"src {re.escape(src)} dst {re.escape(dst)}\n\tproto esp spi 0x{spi} reqid \d+ "
                                  r"mode tunnel\n(\t.*\n)*", states + "\n")
                assert block and all(re.search(r, block[0]) for r in PROPOSALS[esp][1]), (side, spi, states.splitlines())
            # Its selectors as policies: out, in and fwd, each with a tunnel template between the outer addresses.
            policies = pair.xfrm(side, "policy list")
            me, peer = ("a", "b") if side == "a" else ("b", "a")
            for src, dst, direction, tsrc, tdst in [(net[me], net[peer], "out", outer[me], outer[peer]),
                                                    (net[peer], net[me], "in", outer[peer], outer[me]),
                                                    (net[peer], net[me], "fwd", outer[peer], outer[me])]:
                assert re.search(rf"src {re.escape(src)} dst {re.escape(dst)} \n\tdir {direction} priority \d+ "
                                 rf"ptype main \n\ttmpl src {re.escape(tsrc)} dst {re.escape(tdst)}\n\t\tproto esp "
                                 r"reqid \d+ mode tunnel", policies), (side, direction, policies)
            # --route-policies: the peer's subnet routed into the TUN.
            routes = pair.ip(side, "-6" if outer6 else "-4", "route", "show", "dev", "xfrm0").stdout
            assert f"{net[peer]} proto static" in routes, (side, routes)

        # The data plane: ping, TCP both ways, only ESP on the wire, every ICV good, counters clean.
        listing = pair.xfrm("b", "state list")
        check_tunnel(pair, tmp_path, natt=False, outer6=outer6, inner6=outer6, size=SIZE, gso=False,
                     sas=[] if esn == "yes" else tshark_sas(listing))
        if esn == "yes":
            check_esn_gcm(tmp_path / "veth.pcap", listing, outer6)

        # pluto reads its Child SA's counters from xfrmd (GETSA): the transfers are in them, both ways.
        inbytes, outbytes = traffic(plutos, diag)
        assert inbytes > SIZE and outbytes > SIZE, (inbytes, outbytes)

        # Terminating removes both SAs from both daemons (the peer's pluto hears the Delete) and the Child SA's
        # in/fwd policies; each pluto leaves its OUT policy as a trap, a template without addresses or SA (reqid 0),
        # as it would in the kernel.
        plutos["a"].whack("--name", "net", "--terminate", diag=diag)
        any_addr = "::" if outer6 else "0.0.0.0"
        deadline = time.time() + 10
        while any(pair.xfrm(s, "state list") or re.search(r"dir (in|fwd) priority \d+ ptype main \n\ttmpl",
                                                          pair.xfrm(s, "policy list")) for s in "ab"):
            assert time.time() < deadline, "\n".join(pair.xfrm(s, "state list") + pair.xfrm(s, "policy list")
                                                     for s in "ab")
            time.sleep(0.1)
        for side, peer in [("a", "b"), ("b", "a")]:
            policies = pair.xfrm(side, "policy list")
            assert re.search(rf"src {re.escape(net[side])} dst {re.escape(net[peer])} \n\tdir out priority \d+ "
                             rf"ptype main \n\ttmpl src {any_addr} dst {any_addr}\n\t\tproto esp reqid 0 mode "
                             r"transport", policies), (side, policies)

        # On demand: a's next packets to b meet the trap; xfrmd sends XFRM_MSG_ACQUIRE (XFRMNLGRP_ACQUIRE, through
        # the bridge), pluto negotiates a new Child SA for it and installs it in both daemons; the ping gets through.
        # The packet reaches xfrmd by the route --route-policies keeps for the trap (its template has no addresses:
        # the selector's subnet, not a host that could be the peer, is routed).
        me, peer = ("2001:db8:1::1", "2001:db8:2::1") if outer6 else ("10.0.1.1", "10.0.2.1")
        routes = pair.ip("a", "-6" if outer6 else "-4", "route", "show", "dev", "xfrm0").stdout
        assert f"{net['b']} proto static" in routes, routes
        deadline = time.time() + 20
        while pair.exec("a", "busybox", "ping6" if outer6 else "ping", "-c", "1", "-W", "1", "-I", me, peer,
                        check=False).returncode != 0:
            assert time.time() < deadline, (pair.xfrm("a", "state list"), pair.xfrm("a", "policy list"),
                                            pair.ip("a", "route").stdout, diag())
        assert "XFRM_MSG_ACQUIRE message" in plutos["a"].log(), diag()
        for side in "ab":
            states = [b for b in re.split(r"(?m)^(?=src )", pair.xfrm(side, "state list")) if b.strip()]
            keyed = [b for b in states if re.search(r"spi 0x(?!0{8})[0-9a-f]{8} reqid [1-9]\d* mode tunnel", b)]
            assert len(keyed) == 2 and not any(spi_ab in b or spi_ba in b for b in keyed), (side, states)
            # Besides, on a, the larval SA the ACQUIRE left (SPI 0, reqid 0, the packet's addresses), which goes by
            # itself after 30 s, as the kernel's (XFRM_ACQ_EXPIRES).
            assert all(b in keyed or larval(b, me, peer) for b in states), (side, states)
        inbytes, outbytes = traffic(plutos, diag)
        assert inbytes > 0 and outbytes > 0, (inbytes, outbytes)

        # Deleting the connection on both ends removes everything it installed: what stays is the bypass for IPv6
        # neighbour discovery that pluto puts in at start.
        for p in plutos.values():
            p.whack("--name", "net", "--delete", diag=diag)
        def gone(side):
            states = [b for b in re.split(r"(?m)^(?=src )", pair.xfrm(side, "state list")) if b.strip()]
            return all(larval(b, me, peer) for b in states) and "tmpl" not in pair.xfrm(side, "policy list")
        deadline = time.time() + 10
        while not all(gone(s) for s in "ab"):
            assert time.time() < deadline, "\n".join(pair.xfrm(s, "state list") + pair.xfrm(s, "policy list")
                                                     for s in "ab")
            time.sleep(0.1)
        for side in "ab":
            left = [b for b in re.split(r"(?m)^(?=src )", pair.xfrm(side, "policy list")) if b.strip()]
            assert len(left) == 6 and all(re.match(r"src ::/0 dst ::/0 proto ipv6-icmp type 13[56] \n\tdir "
                                                   r"(in|out|fwd) priority 1 ", b) for b in left), (side, left)
            # With the policies gone, so is the daemon's route.
            assert "proto static" not in pair.ip(side, "-6" if outer6 else "-4", "route", "show", "dev",
                                                 "xfrm0").stdout, side
            # No SPD entry went to the kernel's own XFRM tables.
            kernel = pair.ip(side, "xfrm", "policy", "list").stdout
            assert "\tdir " not in kernel, (side, kernel)
