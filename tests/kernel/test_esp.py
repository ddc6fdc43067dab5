"""ESP both ways between the real kernel (qemu) and `xfrm pcap`.

One boot. In the guest, namespace `a` holds the kernel's SAs and policies and is joined by a veth pair (va in a,
vb in the root namespace) to the wire, where tcpdump listens and the pcapinject helper writes frames.

- Kernel → xfrm: for each KERNEL_OUT flow the kernel has an SA and an OUT policy; pings through them become ESP
  on va; tcpdump on vb writes them to a pcap that comes back through the serial port (base64). On the host
  `xfrm pcap --input-path` with the mirror SA and an IN policy must decrypt every packet of the flow to the
  kernel's inner ICMP echo request, with no drop counted.
- xfrm → kernel: for each HOST_OUT flow `xfrm pcap --output-path` encrypts five ICMP echo requests; the pcap goes
  into the guest under /data/ and is written onto vb; the kernel (SA and IN policy in a) must count every packet
  on its SA with replay and integrity failures 0, /proc/net/xfrm_stat must stay all zero and the echo requests
  must reach ICMP.

Addresses: outer 192.0.2.1 (kernel) / 192.0.2.2 (peer) and 2001:db8::1 / 2001:db8::2; the kernel's inner side
198.51.100.1 and 2001:db8:1::1; the peer's inner side 203.0.113.K and 2001:db8:2:K::1.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import struct
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

import shared
from listings import state_blocks

MAC_A, MAC_B = "02:00:00:00:00:01", "02:00:00:00:00:02"

ALGOS = {
    "gcm128": "aead rfc4106(gcm(aes)) 0x{k20} 128",
    "gcm128-64": "aead rfc4106(gcm(aes)) 0x{k20} 64",
    "gcm256-96": "aead rfc4106(gcm(aes)) 0x{k36} 96",
    "chacha": "aead rfc7539esp(chacha20,poly1305) 0x{k36} 128",
    "gmac": "aead rfc4543(gcm(aes)) 0x{k20} 128",
    "cbc-sha1": "enc cbc(aes) 0x{k16} auth-trunc hmac(sha1) 0x{k20} 96",
    "cbc-sha256": "enc cbc(aes) 0x{k16} auth-trunc hmac(sha256) 0x{k32} 128",
    "cbc256-sha512": "enc cbc(aes) 0x{k32} auth-trunc hmac(sha512) 0x{k64} 256",
}


@dataclass(frozen=True)
class Flow:
    k: int  # 1..99; SPI 0x1000+k (kernel → peer) or 0x2000+k (peer → kernel), reqid k
    algo: str
    mode: str  # tunnel | transport
    inner: int  # 4 | 6
    outer: int  # 4 | 6 (transport: == inner)
    extra: str = ""  # more state options (flag esn replay-window 128, encap ...)
    tx: str = ""  # options for the sender's copy of the SA only (replay-oseq ...)
    rx: str = ""  # options for the receiver's copy only (replay-seq ...)
    big: bool = False  # inner packets of 1,500-1,700 bytes without DF: the outer ESP leaves as fragments

    @property
    def id(self) -> str:
        e = "-" + "-".join(w for w in self.extra.split() if w.isalpha() and w not in ("flag", "replay")) \
            if self.extra else ""
        if self.tx:
            e += "-across-2^32"
        if self.big:
            e += "-fragmented"
        return f"{self.mode}{self.inner}in{self.outer}-{self.algo}{e}" if self.mode == "tunnel" else \
            f"{self.mode}{self.inner}-{self.algo}{e}"

    def keys(self) -> dict[str, str]:
        seed = hashlib.sha256(f"flow{self.k}".encode()).digest() * 3
        return {f"k{n}": seed[:n].hex() for n in (16, 20, 32, 36, 64)}

    def algo_words(self) -> str:
        return ALGOS[self.algo].format(**self.keys())


KERNEL_OUT = [
    Flow(1, "gcm128", "tunnel", 4, 4),
    Flow(2, "chacha", "tunnel", 6, 6),
    Flow(3, "cbc-sha256", "transport", 4, 4),
    Flow(4, "gcm256-96", "transport", 6, 6),
    Flow(5, "cbc-sha1", "tunnel", 4, 6),
    Flow(6, "gcm128", "tunnel", 4, 4, "encap espinudp 4500 4500 0.0.0.0"),
    Flow(7, "gmac", "tunnel", 6, 6),
    Flow(8, "cbc256-sha512", "tunnel", 4, 4, "flag esn replay-window 64"),
    Flow(9, "gcm128-64", "transport", 4, 4, "flag esn replay-window 128"),
    # ESN across 2^32: the high half is only in the ICV; the receiver must infer it
    Flow(10, "gcm128", "tunnel", 4, 4, "flag esn replay-window 64", tx="replay-oseq 0xfffffffe",
         rx="replay-seq 0xfffffffd"),
    # 1,500-byte UDP datagrams without DF (pcapinject -u, IP_PMTUDISC_OMIT) into an IPv6 tunnel: the kernel seals
    # each whole and its IPv6 layer cuts the ESP packet (ip6_fragment on xfrm6_prepare_output's ignore_df);
    # `xfrm pcap` must join the fragments before ESP
    Flow(11, "gcm128", "tunnel", 4, 6, big=True),
    Flow(12, "cbc-sha256", "tunnel", 4, 6, big=True),
    # TFC padding (RFC 4303 §2.4): the kernel pads its pings to tfcpad, or to the largest inner packet its 1,500-byte
    # MTU takes; `xfrm pcap` must give back each ping without the zeros. NAT-T: only esp_output pads, and with
    # esp4_offload loaded a software SA without encap goes through esp_xmit instead (xfrm_dev_offload_ok), which
    # does not ("XXX: Add support for tfc padding here")
    Flow(13, "gcm128", "tunnel", 4, 4, "encap espinudp 4500 4500 0.0.0.0 tfcpad 900"),
    Flow(14, "cbc-sha256", "tunnel", 6, 4, "encap espinudp 4500 4500 0.0.0.0 tfcpad 65535"),
]
HOST_OUT = [
    Flow(21, "gcm128", "tunnel", 4, 4),
    Flow(22, "chacha", "tunnel", 6, 6),
    Flow(23, "cbc-sha256", "transport", 4, 4),
    Flow(24, "gcm256-96", "transport", 6, 6),
    Flow(25, "gmac", "tunnel", 4, 4),
    Flow(26, "cbc256-sha512", "tunnel", 6, 4),
    Flow(27, "gcm128-64", "tunnel", 4, 4, "flag esn replay-window 128"),
    Flow(28, "cbc-sha1", "transport", 4, 4),
    Flow(29, "chacha", "transport", 6, 6, "flag esn replay-window 64"),
    Flow(30, "cbc-sha256", "tunnel", 4, 4, "flag esn replay-window 64", tx="replay-oseq 0xfffffffd",
         rx="replay-seq 0xfffffffc"),
    # NAT-T: the kernel decapsulates ESP in UDP only on a socket with UDP_ENCAP set (pcapinject -l holds one)
    Flow(31, "gcm128", "tunnel", 4, 4, "encap espinudp 4500 4500 0.0.0.0"),
    # Too big for the wire once inside ESP, without DF: xfrm sends IPv4 fragments, which the kernel reassembles
    # before ESP (ip_defrag ahead of xfrm_input)
    Flow(32, "gcm128", "tunnel", 4, 4, big=True),
    Flow(33, "cbc-sha256", "transport", 4, 4, big=True),
    Flow(34, "chacha", "tunnel", 4, 4, "encap espinudp 4500 4500 0.0.0.0", big=True),
    # The same over IPv6: xfrm sends IPv6 fragments (RFC 8200 §4.5, a Fragment header after the IPv6 header), which
    # the kernel reassembles before ESP (ipv6_frag_rcv ahead of xfrm6_rcv)
    Flow(35, "gcm128", "tunnel", 4, 6, big=True),
    Flow(36, "cbc-sha256", "tunnel", 4, 6, big=True),
    # TFC padding: xfrm pads as the kernel would; the kernel strips the zeros by the inner header's length
    Flow(37, "gcm128", "tunnel", 4, 4, "tfcpad 900"),
    Flow(38, "cbc-sha256", "tunnel", 6, 6, "tfcpad 65535"),
]
PINGS = 3  # per kernel-outbound flow
BIG_UDP = 1500  # the kernel's big flows: IPv4 packets of this size
INJECT = 5  # per host-outbound flow


# (IV, ICV, alignment) of the suites the TFC flows use
ESP_SIZES = {"gcm128": (8, 16, 4), "cbc-sha256": (16, 16, 16)}


def tfc_pad_to(f: Flow) -> int:
    """The length the flow's SA pads inner packets to: its tfcpad, capped at the largest inner packet a 1,500-byte MTU
    takes after ESP (esp_output's min(tfcpad, xfrm_state_mtu)); 0 without tfcpad."""
    m = re.search(r"tfcpad (\d+)", f.extra)
    if not m:
        return 0
    iv, icv, align = ESP_SIZES[f.algo]
    header = (20 if f.outer == 4 else 40) + (8 if "espinudp" in f.extra else 0) + 8 + iv
    return min(int(m.group(1)), ((1500 - header - icv) & ~(align - 1)) - 2)


def tfc_esp_length(f: Flow, inner: int) -> int:
    """The IP length of the flow's ESP packet carrying an inner packet of `inner` bytes, TFC-padded."""
    iv, icv, align = ESP_SIZES[f.algo]
    plain = max(inner, tfc_pad_to(f)) + 2
    udp = 8 if "espinudp" in f.extra else 0
    return (20 if f.outer == 4 else 40) + udp + 8 + iv + (plain + align - 1) // align * align + icv


def addrs(f: Flow, kernel_side_sends: bool) -> dict[str, str]:
    """Outer and inner addresses of a flow, from the sender's point of view."""
    o_k, o_p = ("192.0.2.1", "192.0.2.2") if f.outer == 4 else ("2001:db8::1", "2001:db8::2")
    if f.mode == "transport":
        # the peer end of a transport flow is an extra address of the wire (vb / the host's eth0)
        o_p = f"192.0.2.{100 + f.k}" if f.outer == 4 else f"2001:db8::{100 + f.k:x}"
        i_k, i_p = o_k, o_p
    else:
        i_k, i_p = ("198.51.100.1", f"203.0.113.{f.k}") if f.inner == 4 else \
            ("2001:db8:1::1", f"2001:db8:2:{f.k:x}::1")
    if kernel_side_sends:
        return dict(osrc=o_k, odst=o_p, isrc=i_k, idst=i_p)
    return dict(osrc=o_p, odst=o_k, isrc=i_p, idst=i_k)


def spi(f: Flow, kernel_sends: bool) -> int:
    return (0x1000 if kernel_sends else 0x2000) + f.k


def state_line(f: Flow, kernel_sends: bool, sender: bool) -> str:
    """The flow's SA as `ip xfrm state add` words; the sender's and the receiver's copies differ only in
    f.tx / f.rx."""
    a = addrs(f, kernel_sends)
    sel = ""
    if f.mode == "tunnel" and f.inner != f.outer:
        any_ = "0.0.0.0/0" if f.inner == 4 else "::/0"
        sel = f" sel src {any_} dst {any_}"
    return (f"xfrm state add src {a['osrc']} dst {a['odst']} proto esp spi {spi(f, kernel_sends):#x} reqid {f.k} "
            f"mode {f.mode} {f.algo_words()} {f.extra} {f.tx if sender else f.rx}{sel}").replace("  ", " ").strip()


def policy_line(f: Flow, kernel_sends: bool, direction: str) -> str:
    a = addrs(f, kernel_sends)
    plen = 32 if f.inner == 4 else 128
    # the kernel's big flows send UDP (pcapinject -u); everything else is ICMP echo
    proto = "udp" if f.big and kernel_sends else "icmp" if f.inner == 4 else "ipv6-icmp"
    if f.mode == "tunnel":
        tmpl = f"tmpl src {a['osrc']} dst {a['odst']} proto esp reqid {f.k} mode tunnel"
    else:
        tmpl = f"tmpl proto esp reqid {f.k} mode transport"
    return f"xfrm policy add src {a['isrc']}/{plen} dst {a['idst']}/{plen} proto {proto} dir {direction} {tmpl}"


# ------------------------------------------------------------------------------------------------ pcap helpers

def read_pcap(data: bytes) -> tuple[int, list[bytes]]:
    magic, _, _, _, _, _, link = struct.unpack("<IHHiIII", data[:24])
    assert magic == 0xA1B2C3D4, hex(magic)
    out, off = [], 24
    while off + 16 <= len(data):
        _, _, incl, _ = struct.unpack("<IIII", data[off:off + 16])
        out.append(data[off + 16:off + 16 + incl])
        off += 16 + incl
    return link, out


def write_pcap(path: Path, link: int, packets: list[bytes]) -> None:
    with open(path, "wb") as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, link))
        for i, p in enumerate(packets):
            fh.write(struct.pack("<IIII", 1_700_000_000, i, len(p), len(p)) + p)


def esp_spi_of_frame(frame: bytes) -> int | None:
    """The SPI of an Ethernet frame carrying ESP (raw or in UDP 4500), else None."""
    etype = struct.unpack("!H", frame[12:14])[0]
    ip = frame[14:]
    if etype == 0x0800:
        proto, l4 = ip[9], ip[(ip[0] & 15) * 4:]
    elif etype == 0x86DD:
        proto, l4 = ip[6], ip[40:]
    else:
        return None
    if etype == 0x86DD and proto == 44 and struct.unpack("!H", ip[42:44])[0] & 0xFFF8 == 0:
        proto, l4 = ip[40], ip[48:]  # the first IPv6 fragment: the header after its Fragment header
    if proto == 17 and len(l4) >= 12 and struct.unpack("!H", l4[2:4])[0] == 4500:
        l4 = l4[8:]
        if l4[:4] == b"\0\0\0\0":
            return None
        proto = 50
    return struct.unpack("!I", l4[:4])[0] if proto == 50 else None


# ------------------------------------------------------------------------------------------------ host side

def host_setup(f: Flow, kernel_sends: bool, direction: str) -> str:
    """A batch for the peer (the host): its wire interface eth0, its inner network lan0, the SA and policy."""
    a = addrs(f, kernel_sends)
    peer_outer = a["odst"] if kernel_sends else a["osrc"]
    kern_outer = a["osrc"] if kernel_sends else a["odst"]
    peer_inner = a["idst"] if kernel_sends else a["isrc"]
    kern_inner = a["isrc"] if kernel_sends else a["idst"]
    oplen = 24 if f.outer == 4 else 64
    lines = ["link add eth0 type dummy", "link set eth0 up", f"addr add {peer_outer}/{oplen} dev eth0"]
    if f.mode == "tunnel":
        iplen = 24 if f.inner == 4 else 64
        lines += ["link add lan0 type dummy", "link set lan0 up", f"addr add {peer_inner}/{iplen} dev lan0"]
        if not kernel_sends:
            via = f" via {kern_outer}" if f.inner == f.outer else ""
            lines.append(f"route add {kern_inner}/{32 if f.inner == 4 else 128} dev eth0{via}")
    lines.append("ip " + state_line(f, kernel_sends, sender=not kernel_sends))
    lines.append("ip " + policy_line(f, kernel_sends, "in" if kernel_sends else "out"))
    return "\n".join(lines) + "\n"


def inner_packets(f: Flow) -> list[bytes]:
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
    from scapy.packet import Raw

    a = addrs(f, False)
    out = []
    for i in range(INJECT):
        payload = bytes((f.k + i + j) & 0xFF for j in range((1500 + 50 * i) if f.big else (40 + 17 * i)))
        if f.inner == 4:
            out.append(bytes(IP(src=a["isrc"], dst=a["idst"], id=0x100 + i) / ICMP(type=8, id=f.k, seq=i)
                             / Raw(payload)))
        else:
            out.append(bytes(IPv6(src=a["isrc"], dst=a["idst"]) / ICMPv6EchoRequest(id=f.k, seq=i) / Raw(payload)))
    return out


def xfrm_run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([os.environ["XFRM_TOOL"], *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def make_host_esp(workdir: Path) -> tuple[dict[int, bytes], dict[int, str]]:
    """xfrm pcap --output-path for every HOST_OUT flow -> ({k: raw IP pcap bytes}, {k: `-s state list` after})."""
    out, listings = {}, {}
    for f in HOST_OUT:
        d = workdir / f"host-out-{f.k}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "setup").write_text(host_setup(f, False, "out"))
        (d / "after").write_text("-s state list\n")
        write_pcap(d / "in.pcap", 101, inner_packets(f))
        p = xfrm_run(["pcap", "--batch", "setup", "--then", "after", "--output-path", "in.pcap", "out.pcap"], d)
        if p.returncode != 0:
            out[f.k] = b""
            (d / "error").write_text(p.stderr)
            continue
        out[f.k] = (d / "out.pcap").read_bytes()
        listings[f.k] = p.stdout
    return out, listings


def lifetime_bytes(block: str) -> int:
    """curlft bytes from one `ip -s xfrm state` block."""
    m = re.search(r"lifetime current:\n\s+(\d+)\(bytes\)", block)
    assert m, block
    return int(m.group(1))


# ------------------------------------------------------------------------------------------------ guest

def guest_script(host_pcaps: dict[int, bytes]) -> str:
    s = [r"""
set -u
A="ip -n a"
ip netns add a
ip link add va type veth peer name vb
ip link set va netns a
$A link set va address %(MAC_A)s; ip link set vb address %(MAC_B)s
$A link set lo up; $A link set va up; ip link set vb up
$A addr add 192.0.2.1/24 dev va; ip addr add 192.0.2.2/24 dev vb
$A addr add 2001:db8::1/64 dev va nodad; ip addr add 2001:db8::2/64 dev vb nodad
$A neigh add 192.0.2.2 lladdr %(MAC_B)s dev va; $A neigh add 2001:db8::2 lladdr %(MAC_B)s dev va
$A link add lan0 type dummy; $A link set lan0 up
$A addr add 198.51.100.1/24 dev lan0; $A addr add 2001:db8:1::1/64 dev lan0 nodad
$A route add 203.0.113.0/24 via 192.0.2.2; $A route add 2001:db8:2::/48 via 2001:db8::2
""" % dict(MAC_A=MAC_A, MAC_B=MAC_B)]
    for f in KERNEL_OUT + HOST_OUT:
        if f.mode == "transport":  # the peer's transport address on the wire
            if f.outer == 4:
                s.append(f"ip addr add 192.0.2.{100 + f.k}/24 dev vb; "
                         f"$A neigh add 192.0.2.{100 + f.k} lladdr {MAC_B} dev va")
            else:
                s.append(f"ip addr add 2001:db8::{100 + f.k:x}/64 dev vb nodad; "
                         f"$A neigh add 2001:db8::{100 + f.k:x} lladdr {MAC_B} dev va")
    batch = []
    for f in KERNEL_OUT:
        batch += [state_line(f, True, sender=True), policy_line(f, True, "out")]
    for f in HOST_OUT:
        batch += [state_line(f, False, sender=False), policy_line(f, False, "in")]
    s.append("cat >/tmp/setup <<'EOF'\n" + "\n".join(batch) + "\nEOF")
    s.append("$A -batch /tmp/setup || echo '@@SETUP-FAILED'")
    s.append("ip netns exec a pcapinject -l 4500 >/tmp/encap.log 2>&1 & ENCAP=$!")
    s.append("tcpdump -Z root -U -n -i vb -w /tmp/k.pcap 'esp or udp port 4500 or (ip6 and ip6[6] == 44)' "
             "2>/tmp/td.err & TD=$!")
    s.append("for i in $(seq 300); do grep -q listening /tmp/td.err && grep -q socket /tmp/encap.log && break; "
             "sleep 0.1; done")
    s.append("P=")
    for f in KERNEL_OUT:
        a = addrs(f, True)
        if f.big:
            s.append(f"ip netns exec a pcapinject -u {a['isrc']} {a['idst']} {BIG_UDP} {PINGS} "
                     f">/tmp/udp-{f.k}.log 2>&1 & P=\"$P $!\"")
            continue
        s.append(f"ip netns exec a ping -q -c {PINGS} -i 0.1 -w 3 -s {24 + f.k} -I {a['isrc']} {a['idst']} "
                 f">/dev/null 2>&1 & P=\"$P $!\"")
    s.append("wait $P; sleep 0.3; kill -INT $TD; wait $TD")
    for f in KERNEL_OUT:
        if f.big:  # what pcapinject -u said (its datagrams sent, or why not)
            s.append(f"echo '@@FILE udp-{f.k}'; cat /tmp/udp-{f.k}.log; echo '@@ENDFILE'")
    s.append("echo '@@FILE tcpdump.err'; cat /tmp/td.err; echo '@@ENDFILE'")
    s.append("echo '@@FILE k.pcap'; base64 /tmp/k.pcap; echo '@@ENDFILE'")
    for f in HOST_OUT:
        if host_pcaps.get(f.k):
            s.append(f"pcapinject vb {MAC_A} {MAC_B} /data/inj-{f.k}.pcap")
    s.append("sleep 0.5")
    s.append("echo '@@FILE state-s'; $A -s xfrm state list; echo '@@ENDFILE'")
    s.append("echo '@@FILE encap.log'; cat /tmp/encap.log; echo '@@ENDFILE'; kill $ENCAP")
    s.append("echo '@@FILE xfrm_stat'; ip netns exec a cat /proc/net/xfrm_stat; echo '@@ENDFILE'")
    s.append("echo '@@FILE snmp'; ip netns exec a cat /proc/net/snmp /proc/net/snmp6; echo '@@ENDFILE'")
    return "\n".join(s) + "\n"


def _build():
    import shutil

    import kvm

    work = kvm.WORK / "esp-host"  # what the host made, kept for a look after the run (one builder at a time)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pcaps, listings = make_host_esp(work)
    files = {f"inj-{k}.pcap": v for k, v in pcaps.items() if v}
    errors = {k: (work / f"host-out-{k}" / "error").read_text() for k, v in pcaps.items() if not v}

    def parse(output: str):
        from listings import files_of

        res = files_of(output)
        res["host_pcaps"] = {str(k): base64.b64encode(v).decode() for k, v in pcaps.items()}
        res["host_errors"] = {str(k): v for k, v in errors.items()}
        res["host_listings"] = {str(k): v for k, v in listings.items()}
        res["setup_failed"] = "@@SETUP-FAILED" in output
        res["output"] = output
        return res

    return guest_script(pcaps), files, parse


GROUP = "esp"
shared.register(GROUP, json.dumps([asdict(f) for f in KERNEL_OUT + HOST_OUT]) + guest_script({}), _build)


@pytest.fixture(scope="session")
def esp_run():
    r = shared.get(GROUP)["result"]
    assert not r["setup_failed"], f"the guest could not set up the SAs and policies:\n{r['output'][:4000]}"
    return r


# ------------------------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("flow", KERNEL_OUT, ids=[f.id for f in KERNEL_OUT])
def test_kernel_esp_decrypts_in_xfrm(flow: Flow, esp_run, tmp_path, xfrm):
    link, frames = read_pcap(base64.b64decode(esp_run["k.pcap"]))
    assert link == 1, f"tcpdump on vb should write Ethernet, got linktype {link}"
    mine = [fr for fr in frames if esp_spi_of_frame(fr) == spi(flow, True)]
    if flow.big:  # the rest of each packet: the IPv6 fragments with its first one's source and identification
        def key(fr: bytes) -> bytes:
            return fr[14 + 8:14 + 24] + fr[14 + 44:14 + 48]

        keys = {key(fr) for fr in mine}
        udp_log = esp_run.get(f"udp-{flow.k}", "")
        assert all(fr[14 + 6] == 44 for fr in mine) and len(keys) == PINGS, f"the kernel cut every packet: {udp_log}"
        rest = [fr for fr in frames if fr[12:14] == b"\x86\xdd" and fr[14 + 6] == 44 and key(fr) in keys
                and fr not in mine]
        assert len(rest) == PINGS, f"{len(rest)} further fragments"
        mine += rest
    assert len(mine) == PINGS * (2 if flow.big else 1), (f"the kernel sent {len(mine)} ESP packets with SPI {spi(flow, True):#x}, "
                                f"expected {PINGS * (2 if flow.big else 1)}; tcpdump: {esp_run['tcpdump.err']}; "
                                f"SPIs seen: {sorted({hex(esp_spi_of_frame(x) or 0) for x in frames})}")
    if tfc_pad_to(flow):  # busybox ping -s 24+k: the inner packet is headers + 8 + 24 + k bytes
        inner = (20 if flow.inner == 4 else 40) + 8 + 24 + flow.k
        lengths = [len(fr) - 14 for fr in mine]
        assert lengths == [tfc_esp_length(flow, inner)] * PINGS, (
            f"ESP lengths {lengths}, expected {tfc_esp_length(flow, inner)}; the kernel's SA:\n"
            f"{state_blocks(esp_run['state-s']).get(spi(flow, True))}")
    write_pcap(tmp_path / "k.pcap", 1, mine)
    (tmp_path / "setup").write_text(host_setup(flow, True, "in"))
    (tmp_path / "after").write_text("-s state list\nstat\n")
    _, out, _ = xfrm("pcap", "--batch", "setup", "--then", "after", "--input-path", "--dev", "eth0",
                     "k.pcap", "out.pcap")
    from scapy.layers.inet import ICMP, IP, UDP
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6

    a = addrs(flow, True)
    got = []
    for p in read_pcap((tmp_path / "out.pcap").read_bytes())[1]:
        pkt = IP(p) if p[0] >> 4 == 4 else IPv6(p)
        if pkt.src == a["isrc"] and pkt.dst == a["idst"] and (pkt.haslayer(ICMP) and pkt[ICMP].type == 8
                                                            or pkt.haslayer(ICMPv6EchoRequest)
                                                            or flow.big and pkt.haslayer(UDP)):
            got.append(pkt)
    stats = {w[0]: int(w[1]) for w in (line.split() for line in out.splitlines()) if len(w) == 2
             and w[0].startswith("Xfrm")}
    nonzero = {k: v for k, v in stats.items() if v}
    assert len(got) == PINGS and not nonzero, (
        f"xfrm decrypted {len(got)} of the kernel's {PINGS} echo requests ({a['isrc']} -> {a['idst']}); "
        f"non-zero counters: {nonzero}\nsetup:\n{(tmp_path / 'setup').read_text()}\nxfrm output:\n{out}")
    # busybox ping's payload: the ICMP data is 24 + k bytes (-s), so the inner packet is the kernel's own;
    # pcapinject -u's datagram i carries bytes (31 i + j) mod 256, without DF
    for i, pkt in enumerate(got):
        if flow.big:
            assert len(pkt) == BIG_UDP and not pkt[IP].flags.DF, pkt.summary()
            assert bytes(pkt[UDP].payload) == bytes((31 * i + j) & 0xFF for j in range(BIG_UDP - 28)), f"datagram {i}"
            continue
        data = bytes(pkt[ICMP].payload) if flow.inner == 4 else bytes(pkt[ICMPv6EchoRequest].data)
        assert len(data) == 24 + flow.k
    blk = state_blocks(out)[spi(flow, True)]
    assert f"{PINGS}(packets)" in blk and "replay 0 failed 0" in blk, blk
    # curlft bytes: what ESP carried (tunnel: the inner packet; transport: the payload after the IP header) is
    # counted alike by the kernel's output (after xfrm4/6_transport_output pulls the header) and our input.
    kernel_blk = state_blocks(esp_run["state-s"]).get(spi(flow, True))
    assert kernel_blk, esp_run["state-s"]
    # TFC padding: a receiver counts it (it is still there after esp_input_done2), the sender does not.
    tfc = PINGS * max(0, tfc_pad_to(flow) - lifetime_bytes(kernel_blk) // PINGS)
    assert lifetime_bytes(blk) == lifetime_bytes(kernel_blk) + tfc, (
        f"bytes: xfrm's inbound SA\n{blk}\nthe kernel's outbound SA\n{kernel_blk}\nTFC bytes {tfc}")
    if flow.tx:  # the sequence crossed 2^32: the receiver moved its high half
        assert "seq-hi 0x1," in blk, blk


def fragment_offset(p: bytes) -> int | None:
    """The fragment offset in bytes of an IPv4 fragment or of an IPv6 packet with a Fragment header right after its
    header; None for a whole packet."""
    if p[0] >> 4 == 4:
        field = struct.unpack("!H", p[6:8])[0]
        return (field & 0x1FFF) * 8 if field & 0x3FFF else None
    return struct.unpack("!H", p[42:44])[0] & 0xFFF8 if p[6] == 44 else None


@pytest.mark.parametrize("flow", HOST_OUT, ids=[f.id for f in HOST_OUT])
def test_xfrm_esp_accepted_by_kernel(flow: Flow, esp_run):
    assert not esp_run["host_errors"].get(str(flow.k)), \
        f"xfrm pcap --output-path failed:\n{esp_run['host_errors'][str(flow.k)]}"
    link, pkts = read_pcap(base64.b64decode(esp_run["host_pcaps"][str(flow.k)]))
    # Fragments (IPv4, or IPv6 with a Fragment header): the first of each datagram has offset 0 (a whole packet
    # too); the others are its pieces.
    frags = [p for p in pkts if fragment_offset(p) is not None]
    firsts = [p for p in pkts if not fragment_offset(p)]
    assert len(firsts) == INJECT, f"xfrm pcap wrote {len(firsts)} datagrams, expected {INJECT}"
    assert len(frags) == (2 * INJECT if flow.big else 0), f"{len(frags)} fragments"
    assert all(p[0] >> 4 == flow.outer for p in pkts)
    assert all(len(p) <= 1500 for p in pkts)
    for p in pkts:  # what went to the kernel is ESP (in UDP 4500 for NAT-T), never the clear inner packet
        proto = p[9] if p[0] >> 4 == 4 else (p[40] if p[6] == 44 else p[6])
        assert proto == (17 if "espinudp" in flow.extra else 50), p.hex()
    blocks = state_blocks(esp_run["state-s"])
    blk = blocks.get(spi(flow, False))
    assert blk, f"no kernel SA {spi(flow, False):#x}:\n{esp_run['state-s']}"
    m = re.search(r"lifetime current:\n\s+(\d+)\(bytes\), (\d+)\(packets\)", blk)
    st = re.search(r"stats:\n\s+replay-window (\d+) replay (\d+) failed (\d+)", blk)
    assert m and st, blk
    assert (int(m.group(2)), st.groups()) == (INJECT, ("0", "0", "0")), (
        f"the kernel's SA after {INJECT} ESP packets from xfrm pcap (packets; replay-window, replay, failed):\n"
        f"{blk}\nxfrm_stat:\n{esp_run['xfrm_stat']}\nline: {state_line(flow, False, sender=False)}\n"
        f"encap socket: {esp_run['encap.log']}")
    # curlft bytes: our output counts what the kernel's input counts for the same packets.
    ours = state_blocks(esp_run["host_listings"][str(flow.k)]).get(spi(flow, False))
    assert ours, esp_run["host_listings"][str(flow.k)]
    inners = [len(p) for p in inner_packets(flow)]
    tfc = sum(max(0, tfc_pad_to(flow) - n) for n in inners)  # counted by the receiver only
    assert lifetime_bytes(ours) + tfc == int(m.group(1)), (
        f"bytes: xfrm's outbound SA\n{ours}\nthe kernel's inbound SA\n{blk}\nTFC bytes {tfc}")
    if tfc_pad_to(flow):
        assert [len(p) for p in pkts] == [tfc_esp_length(flow, n) for n in inners], [len(p) for p in pkts]
    if flow.tx:  # the sequence crossed 2^32: the kernel inferred the high half from the ICV
        assert "seq-hi 0x1," in blk, blk


def test_kernel_counted_no_xfrm_errors_and_icmp_got_every_echo(esp_run):
    stat = {w[0]: int(w[1]) for w in (line.split() for line in esp_run["xfrm_stat"].splitlines()) if len(w) == 2}
    assert stat and not {k: v for k, v in stat.items() if v}, esp_run["xfrm_stat"]
    snmp = esp_run["snmp"].splitlines()
    hdr = next(line.split() for line in snmp if line.startswith("Icmp: InMsgs"))
    val = next(line.split() for line in snmp if line.startswith("Icmp: ") and line.split()[1].isdigit())
    in_echos = int(val[hdr.index("InEchos")])
    in6 = int(next(line.split()[1] for line in snmp if line.startswith("Icmp6InEchos ")))
    want4 = INJECT * sum(1 for f in HOST_OUT if f.inner == 4)
    want6 = INJECT * sum(1 for f in HOST_OUT if f.inner == 6)
    assert (in_echos, in6) == (want4, want6), "echo requests delivered to ICMP (v4, v6)"
