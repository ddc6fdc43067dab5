"""Live interop with a real IKEv2 implementation: strongSwan 5.9.8's charon with kernel-libipsec (its own userspace
ESP over a TUN device) as the peer of xfrmd.

Two network namespaces, A and B, joined by a veth pair (192.0.2.1 ⟷ 192.0.2.2, or 2001:db8::1 ⟷ 2001:db8::2), each
with an inner host address on lo (198.51.100.1 in A, 203.0.113.1 in B). A charon in each namespace negotiates one
CHILD_SA by IKEv2 (PSK). Then A's charon is killed with SIGKILL, so it sends no DELETE and B keeps the CHILD_SA, and
xfrmd takes over A's data plane: its SAs get the SPIs and the keys A's charon negotiated, read from A's charon log
(`chd = 4` prints the CHILD_SA keys), its policies the traffic selectors. From then on every packet between the inner
hosts crosses xfrmd on one side and libipsec on the other, as ESP in UDP 4500 (libipsec always uses NAT-T).

Checked per algorithm: ping both ways, a TCP transfer both ways with its SHA-256 verified, B's CHILD_SA counters
(bytes and packets, in and out) advanced, B's charon logged no ICV or sequence number failure, the veth carried
nothing but ESP-in-UDP with the negotiated SPIs, and xfrmd's SAs counted the packets with no replay or integrity
failure. Recipe and facts: ../shared/interop/README.md §4.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from charonlib import Charon, parse_swanctl_raw, require_tools, run
from daemonlib import CLIENT, SERVER, split_gso

INNER = {"a": "198.51.100.1", "b": "203.0.113.1"}
OUTER = {False: {"a": "192.0.2.1", "b": "192.0.2.2"}, True: {"a": "2001:db8::1", "b": "2001:db8::2"}}
TRANSFER = 3 * 1024 * 1024


# strongSwan's ESP proposal → what `swanctl --list-sas` reports for it, and the ALGO-LIST words of
# `xfrm state add` built from the keys charon logged (for the AEADs the logged key is key || 4-byte salt, which is
# exactly what rfc4106 and rfc7539esp take).
ALGORITHMS = {
    "aes128gcm16": ({"encr-alg": "AES_GCM_16", "encr-keysize": "128"}, 20, 0,
                    lambda enc, integ: f"aead rfc4106(gcm(aes)) 0x{enc.hex()} 128"),
    "aes256gcm16": ({"encr-alg": "AES_GCM_16", "encr-keysize": "256"}, 36, 0,
                    lambda enc, integ: f"aead rfc4106(gcm(aes)) 0x{enc.hex()} 128"),
    "chacha20poly1305": ({"encr-alg": "CHACHA20_POLY1305"}, 36, 0,
                         lambda enc, integ: f"aead rfc7539esp(chacha20,poly1305) 0x{enc.hex()} 128"),
    "aes128-sha256": ({"encr-alg": "AES_CBC", "encr-keysize": "128", "integ-alg": "HMAC_SHA2_256_128"}, 16, 32,
                      lambda enc, integ: f"enc cbc(aes) 0x{enc.hex()} auth-trunc hmac(sha256) 0x{integ.hex()} 128"),
}


def parse_child_keys(log: str) -> tuple[dict, dict]:
    """A charon log at `chd = 4` → ({("encryption"|"integrity", "initiator"|"responder"): key bytes},
    {"inbound"|"outbound": (spi, src, dst)}). Keys are printed as strongSwan hex dumps:
        10[CHD] encryption initiator key => 20 bytes @ 0x5641…
        10[CHD]    0: 41 0A 7F 0A 35 CA 38 DB 93 0E 00 90 12 10 A7 8D  A...5.8.........
        10[CHD]   16: B7 3A 02 5D                                      .:.]
    and each SA as `adding inbound ESP SA` followed by `  SPI 0x2bc78ba7, src 192.0.2.2 dst 192.0.2.1`."""
    keys, sas = {}, {}
    lines = log.splitlines()
    i = 0
    while i < len(lines):
        m = re.search(r"^\s*(\d+)\[CHD\] (encryption|integrity) (initiator|responder) key => (\d+) bytes", lines[i])
        if m:
            thread, size, key = m[1], int(m[4]), b""
            i += 1
            while len(key) < size:
                d = re.search(rf"^\s*{thread}\[CHD\]\s+(\d+): (.*)$", lines[i])
                assert d and int(d[1]) == len(key), f"unexpected hex dump line in the charon log: {lines[i]!r}"
                take = min(16, size - len(key))
                key += bytes.fromhex(d[2][:3 * take])
                i += 1
            assert (m[2], m[3]) not in keys, "one CHILD_SA expected, the log has several key sets"
            keys[(m[2], m[3])] = key
            continue
        m = re.search(r"\[CHD\] adding (inbound|outbound) ESP SA", lines[i])
        if m:
            d = re.search(r"SPI 0x([0-9a-f]{8}), src (\S+) dst (\S+)", lines[i + 1])
            assert d, f"no SPI line after {lines[i]!r}: {lines[i + 1]!r}"
            sas[m[1]] = (int(d[1], 16), d[2], d[3])
        i += 1
    return keys, sas


class LivePeers:
    """Two namespaces with a charon each, the CHILD_SA negotiated, then A's charon killed and xfrmd in its place."""

    def __init__(self, proposal: str, outer6: bool):
        self.proposal, self.outer6 = proposal, outer6
        self.outer = OUTER[outer6]
        tag = uuid.uuid4().hex[:8]
        self.ns = {"a": f"ssA{tag}", "b": f"ssB{tag}"}
        self.dev = {"a": f"sa{tag}", "b": f"sb{tag}"}
        # Short: the vici and control sockets are Unix sockets (108-byte paths), which pytest's tmp_path can exceed.
        self.dir = Path(tempfile.mkdtemp(prefix="xss-", dir="/tmp"))
        self.charons: dict[str, Charon] = {}
        self.xfrmd: subprocess.Popen | None = None
        self.xfrmd_log = ""
        self.sock = self.dir / "xfrmd.sock"
        try:
            self._network()
            self._charons()
        except BaseException:
            self.close()  # a half-built setup leaves no namespace, daemon or directory behind
            raise

    # ------------------------------------------------------------------ plumbing
    def ip(self, side, *args, check=True):
        return run("ip", "-n", self.ns[side], *args, check=check)

    def exec(self, side, *argv, **kw):
        return run("ip", "netns", "exec", self.ns[side], *argv, **kw)

    def swanctl(self, side, *args, timeout=30):
        return self.charons[side].swanctl(*args, timeout=timeout, diag=self.diag)

    def log(self, side) -> str:
        return self.charons[side].log() if side in self.charons else ""

    def diag(self) -> str:
        """The tails of both charon logs and xfrmd's output, for assertion messages."""
        out = []
        for side in "ab":
            out.append(f"--- charon {side} log (tail) ---\n" + "\n".join(self.log(side).splitlines()[-40:]))
        if self.xfrmd is not None and self.xfrmd.poll() is not None:
            self.xfrmd_log = self.xfrmd_log or self.xfrmd.stderr.read()
        out.append("--- xfrmd ---\n" + self.xfrmd_log[-3000:])
        return "\n".join(out)

    def _network(self):
        for n in self.ns.values():
            run("ip", "netns", "add", n)
        run("ip", "link", "add", self.dev["a"], "netns", self.ns["a"], "type", "veth", "peer", "name", self.dev["b"],
            "netns", self.ns["b"])
        for side, n in [("a", 1), ("b", 2)]:
            self.ip(side, "addr", "add", f"192.0.2.{n}/24", "dev", self.dev[side])
            self.ip(side, "addr", "add", f"2001:db8::{n}/64", "dev", self.dev[side], "nodad")
            self.ip(side, "addr", "add", INNER[side] + "/32", "dev", "lo")
            self.ip(side, "link", "set", "lo", "up")
            self.ip(side, "link", "set", self.dev[side], "up")

    def _charons(self):
        for side, peer in [("a", "b"), ("b", "a")]:
            self.charons[side] = Charon(self.ns[side], self.dir / side, side, self.outer[side], self.outer[peer],
                                        f"{INNER[side]}/32", f"{INNER[peer]}/32", self.proposal, "kernel-libipsec")
        for side in "ab":
            self.charons[side].load(diag=self.diag)

    # ------------------------------------------------------------------ the negotiation and the takeover
    def negotiate(self):
        """A initiates; returns (A's outbound SA, A's inbound SA) as (spi, src, dst, ALGO-LIST words), and checks
        both charons agree on them."""
        self.swanctl("a", "--initiate", "--child", "net", "--timeout", "20")
        listed = {side: parse_swanctl_raw(self.swanctl(side, "--list-sas", "--raw")) for side in "ab"}
        expect, enc_len, integ_len, words = ALGORITHMS[self.proposal]
        for side in "ab":
            child = listed[side]["child"]
            assert child.get("state") == "INSTALLED" and child.get("mode") == "TUNNEL" \
                and child.get("encap") == "yes", (side, listed[side])
            assert {k: child.get(k) for k in expect} == expect, (side, child)
        a, b = listed["a"]["child"], listed["b"]["child"]
        assert a["spi-out"] == b["spi-in"] and a["spi-in"] == b["spi-out"], (a, b)
        keys, sas = parse_child_keys(self.log("a"))
        # The initiator (A) sends with the initiator keys and receives with the responder keys (RFC 7296 §2.17).
        out_spi, out_src, out_dst = sas["outbound"]
        in_spi, in_src, in_dst = sas["inbound"]
        assert (f"{out_spi:08x}", f"{in_spi:08x}") == (a["spi-out"], a["spi-in"]), (sas, a)
        assert (out_src, out_dst, in_src, in_dst) == (self.outer["a"], self.outer["b"], self.outer["b"],
                                                      self.outer["a"]), sas
        out_enc, in_enc = keys[("encryption", "initiator")], keys[("encryption", "responder")]
        assert len(out_enc) == len(in_enc) == enc_len and out_enc != in_enc, keys
        out_integ = keys.get(("integrity", "initiator"), b"")
        in_integ = keys.get(("integrity", "responder"), b"")
        assert len(out_integ) == len(in_integ) == integ_len, keys
        self.spi = {"ab": out_spi, "ba": in_spi}
        return ((out_spi, out_src, out_dst, words(out_enc, out_integ)),
                (in_spi, in_src, in_dst, words(in_enc, in_integ)))

    def take_over(self, outbound, inbound):
        """SIGKILL A's charon (no DELETE reaches B), start xfrmd in A with the same SAs, policies from the traffic
        selectors, and a route into its TUN."""
        self.charons["a"].stop()
        # libipsec's TUN (and its routes in table 220) went with the process; UDP 4500 is free for xfrmd.
        deadline = time.time() + 5
        while "ipsec0" in self.ip("a", "-o", "link").stdout:
            assert time.time() < deadline, "A's libipsec TUN outlived its charon"
            time.sleep(0.05)
        xfrmd = str(Path(os.environ["XFRM_TOOL"]).with_name("xfrmd"))
        assert os.access(xfrmd, os.X_OK), f"xfrmd not found beside XFRM_TOOL: {xfrmd}"
        self.xfrmd = subprocess.Popen(["ip", "netns", "exec", self.ns["a"], xfrmd, "--socket", str(self.sock),
                                       "--tun", "xfrm0", "--metrics", "127.0.0.1:9117"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 10
        while not self.sock.exists():
            assert self.xfrmd.poll() is None, f"xfrmd exited\n{self.diag()}"
            assert time.time() < deadline, "xfrmd's control socket never appeared"
            time.sleep(0.05)
        # Below the veth MTU minus the ESP-in-UDP overhead, as libipsec's own TUN (1400).
        self.ip("a", "link", "set", "xfrm0", "mtu", "1400")
        self.ip("a", "link", "set", "xfrm0", "up")
        self.ip("a", "route", "add", INNER["b"] + "/32", "dev", "xfrm0", "src", INNER["a"])
        encap = f"encap espinudp 4500 4500 {'::' if self.outer6 else '0.0.0.0'}"
        for (spi, src, dst, words), reqid in [(outbound, 1), (inbound, 2)]:
            self.xfrm(f"state add src {src} dst {dst} proto esp spi 0x{spi:08x} reqid {reqid} mode tunnel "
                      f"{words} replay-window 32 {encap}")
        a, b = INNER["a"] + "/32", INNER["b"] + "/32"
        ab = f"tmpl src {self.outer['a']} dst {self.outer['b']} proto esp reqid 1 mode tunnel"
        ba = f"tmpl src {self.outer['b']} dst {self.outer['a']} proto esp reqid 2 mode tunnel"
        self.xfrm(f"policy add src {a} dst {b} dir out {ab}")
        self.xfrm(f"policy add src {b} dst {a} dir in {ba}")

    def xfrm(self, line):
        r = run(os.environ["XFRM_TOOL"], "-S", str(self.sock), *line.split(), check=False)
        assert r.returncode == 0, (line, r.stdout, r.stderr, self.diag())
        return r.stdout

    def metrics(self) -> dict:
        text = self.exec("a", "python3", "-c", "import urllib.request; print(urllib.request.urlopen("
                         "'http://127.0.0.1:9117/metrics', timeout=5).read().decode())").stdout
        return {l.rsplit(" ", 1)[0]: float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l and l[0] != "#"}

    def close(self):
        if self.xfrmd is not None:
            if self.xfrmd.poll() is None:
                self.xfrmd.send_signal(signal.SIGTERM)
            try:
                _, err = self.xfrmd.communicate(timeout=10)
                self.xfrmd_log = self.xfrmd_log or err or ""
            except subprocess.TimeoutExpired:
                self.xfrmd.kill()
                self.xfrmd.communicate()
        for c in self.charons.values():
            c.stop()
        for n in self.ns.values():
            run("ip", "netns", "del", n, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def tcp_transfer(peers: LivePeers, sender: str, receiver: str, size: int):
    """size random bytes over TCP from sender's inner address to receiver's; both ends hash what they saw."""
    server = subprocess.Popen(["ip", "netns", "exec", peers.ns[receiver], "python3", "-c", SERVER, INNER[receiver]],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "listening", server.stderr.read()
        client = peers.exec(sender, "python3", "-c", CLIENT, str(size), INNER[sender], INNER[receiver], timeout=40,
                            check=False)
        assert client.returncode == 0, (f"TCP {sender}→{receiver} failed", client.stderr, peers.diag())
        sent_hash, echoed = client.stdout.split()
        out, err = server.communicate(timeout=30)
        n, got_hash = out.split()
        assert int(n) == size and got_hash == sent_hash == echoed, (out, err, client.stdout)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()


def ping(peers: LivePeers, src: str, dst: str, count: int = 5):
    r = peers.exec(src, "busybox", "ping", "-A", "-c", str(count), "-W", "3", "-w", "6", "-I", INNER[src], INNER[dst],
                   check=False)
    assert r.returncode == 0 and f"{count} packets received" in r.stdout, (r.stdout, r.stderr, peers.diag())


# The links' own housekeeping (ARP, IPv6 neighbour discovery, MLD and router solicitations) is not tunnel traffic.
WIRE_FILTER = ("not arp and not (ip6 and (src net fe80::/10 or src host :: or dst net ff00::/8 or "
               "(icmp6 and (ip6[40] == 135 or ip6[40] == 136))))")

# Every algorithm over both outer families (inner traffic is IPv4 198.51.100.1 ⟷ 203.0.113.1 in all of them).
CASES = [pytest.param((p, outer6), id=f"{p}-ipv{6 if outer6 else 4}-outer") for outer6 in (False, True)
         for p in ALGORITHMS]


@pytest.fixture
def peers(request):
    require_tools()
    proposal, outer6 = request.param
    p = LivePeers(proposal, outer6)
    yield p
    p.close()


@pytest.mark.parametrize("peers", CASES, indirect=True)
def test_xfrmd_carries_traffic_with_strongswan_on_the_sas_charon_negotiated(peers):
    outbound, inbound = peers.negotiate()
    before = parse_swanctl_raw(peers.swanctl("b", "--list-sas", "--raw"))["child"]
    assert before["packets-in"] == before["packets-out"] == "0", before  # nothing went through the charons
    blog_start = len(peers.log("b"))
    peers.take_over(outbound, inbound)

    capture = peers.dir / "veth.pcap"
    dump = subprocess.Popen(["ip", "netns", "exec", peers.ns["b"], "tcpdump", "-ni", peers.dev["b"], "-B", "16384",
                             "-U", "-w", str(capture), WIRE_FILTER],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert "listening on" in dump.stderr.readline(), "tcpdump did not start"
        ping(peers, "a", "b")
        ping(peers, "b", "a")
        tcp_transfer(peers, "a", "b", TRANSFER)
        tcp_transfer(peers, "b", "a", TRANSFER)
        time.sleep(0.2)
    finally:
        dump.send_signal(signal.SIGINT)
        dump.communicate(timeout=10)

    # B's libipsec decrypted what xfrmd sent and xfrmd decrypted what B sent: B's CHILD_SA (the same one, never
    # rekeyed or deleted) counted both directions, TCP payload included.
    after = parse_swanctl_raw(peers.swanctl("b", "--list-sas", "--raw"))["child"]
    assert (after["spi-in"], after["spi-out"]) == (before["spi-in"], before["spi-out"]), (before, after)
    for d in ("in", "out"):
        assert int(after[f"packets-{d}"]) > TRANSFER // 1400 and int(after[f"bytes-{d}"]) > TRANSFER, after
    # Nor did B's charon log any trouble since the takeover: an ICV or sequence number failure ("ESP decryption or
    # ICV verification failed", "ESP sequence number verification failed"), a packet for no SA, a drop, a DELETE.
    # (B's kernel sends its own IPv6 router solicitations, fe80::… → ff02::2, into libipsec's TUN, which finds no
    # policy for them: not tunnel traffic.)
    trouble = [l for l in peers.log("b")[blog_start:].splitlines()
               if re.search(r"failed|invalid|dropping|discarding|does not belong|no matching|DELETE|deleting", l)
               and not re.search(r"no matching outbound IPsec policy for fe80:\S* == ff02:", l)]
    assert not trouble, (trouble[:10], peers.diag())

    # On the wire: only ESP in UDP 4500 ⟷ 4500 between the outer addresses, on the negotiated SPIs (and possibly a
    # NAT-T keepalive from B's charon). xfrmd sends ESP in UDP as GSO batches, which the tap on the veth sees as one
    # frame each: cut them back into their datagrams first (each must start with the SPI and the next number).
    split = peers.dir / "split.pcap"
    split_gso(capture, split, limit=10**9)
    listing = run("tcpdump", "-nr", str(split)).stdout.splitlines()
    assert len(listing) > 2 * TRANSFER // 1400, len(listing)
    a, b = peers.outer["a"], peers.outer["b"]
    spis = {"ab": 0, "ba": 0}
    for line in listing:
        m = re.search(r" IP6? (\S+)\.4500 > (\S+)\.4500: UDP-encap: ESP\(spi=0x([0-9a-f]{8}),", line)
        if m and (m[1], m[2], int(m[3], 16)) == (a, b, peers.spi["ab"]):
            spis["ab"] += 1
        elif m and (m[1], m[2], int(m[3], 16)) == (b, a, peers.spi["ba"]):
            spis["ba"] += 1
        else:
            assert f" {b}.4500 > {a}.4500: " in line and re.search("keep-?alive", line), line
    assert min(spis.values()) > TRANSFER // 1400, spis

    # xfrmd's side: both SAs counted packets, no replay window or integrity failure, no error counter moved.
    stats = peers.xfrm("-s state list")
    for spi in peers.spi.values():
        assert f"spi 0x{spi:08x}" in stats, stats
    assert stats.count("replay-window 0 replay 0 failed 0") == 2, stats
    assert " 0(packets)" not in stats, stats
    m = peers.metrics()
    sa_packets = [v for k, v in m.items() if k.startswith("xfrm_sa_packets{")]
    assert len(sa_packets) == 2 and all(v > TRANSFER // 1400 for v in sa_packets), m
    errors = {k: v for k, v in m.items() if k.startswith("xfrm_stat_total{") and v != 0}
    assert not errors, errors
