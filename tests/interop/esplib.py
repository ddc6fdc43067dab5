"""Helpers for the esp-tool interoperability tests.

scapy's ``SecurityAssociation`` plays the independent ESP peer.  This module
knows how to describe one SA both ways (our ``SA.json`` and scapy's
constructor arguments), how to read and write classic pcap files, how to run
``esp-tool`` and parse what it prints, and how to build the inner packets the
tests send.  Nothing here is copied from scapy; only its public API is used.

Known scapy 2.8.0 quirks we steer around (see shared/interop/README.md):
- an SPI of 0 is parsed as a NAT-T non-ESP marker, so no test uses SPI 0;
- ``seq_num=0`` / ``esn=0`` fall back to the SA's own value, so we never pass 0;
- ``decrypt`` mutates the packet it is given, so every decrypt gets a fresh parse;
- an empty ESP payload decrypts to a default ICMP header, so those cases use
  the low-level ``crypt_algo.decrypt`` and compare raw bytes.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shlex
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.packet import Raw

DEFAULT_ESP_TOOL = str(Path(__file__).resolve().parents[2] / ".build" / "debug" / "esp-tool")

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101

IPPROTO_ESP = 50
IPPROTO_UDP = 17


def esp_tool_path() -> str:
    return os.environ.get("ESP_TOOL", DEFAULT_ESP_TOOL)


# ---------------------------------------------------------------------------
# Algorithms


@dataclass(frozen=True)
class Algo:
    """One ESP transform, as scapy names it and as our SA.json names it."""

    id: str
    scapy_crypt: str
    scapy_auth: Optional[str]
    enc_name: str  # xfrm name: aead name or enc name
    enc_key_len: int  # cipher key bytes, salt excluded
    salt_len: int  # 4 for GCM/GMAC/ChaCha, 0 otherwise
    iv_len: int  # explicit IV on the wire
    align: int  # ESP payload alignment (lcm(block, 4))
    icv_len: int
    auth_name: Optional[str] = None
    auth_key_len: int = 0

    @property
    def is_aead(self) -> bool:
        return self.scapy_auth is None

    @property
    def counter_iv(self) -> bool:
        """GCM, GMAC and ChaCha: our stack puts the 64-bit seq in the IV."""
        return self.salt_len == 4


ALGOS: dict[str, Algo] = {
    a.id: a
    for a in [
        Algo("gcm128", "AES-GCM", None, "rfc4106(gcm(aes))", 16, 4, 8, 4, 16),
        Algo("gcm192", "AES-GCM", None, "rfc4106(gcm(aes))", 24, 4, 8, 4, 16),
        Algo("gcm256", "AES-GCM", None, "rfc4106(gcm(aes))", 32, 4, 8, 4, 16),
        Algo("chacha", "CHACHA20-POLY1305", None, "rfc7539esp(chacha20,poly1305)", 32, 4, 8, 4, 16),
        Algo("gmac128", "AES-NULL-GMAC", None, "rfc4543(gcm(aes))", 16, 4, 8, 4, 16),
        Algo("gmac256", "AES-NULL-GMAC", None, "rfc4543(gcm(aes))", 32, 4, 8, 4, 16),
        Algo("cbc128-sha1", "AES-CBC", "HMAC-SHA1-96", "cbc(aes)", 16, 0, 16, 16, 12, "hmac(sha1)", 20),
        Algo("cbc256-sha256", "AES-CBC", "SHA2-256-128", "cbc(aes)", 32, 0, 16, 16, 16, "hmac(sha256)", 32),
        Algo("cbc192-sha384", "AES-CBC", "SHA2-384-192", "cbc(aes)", 24, 0, 16, 16, 24, "hmac(sha384)", 48),
        Algo("cbc256-sha512", "AES-CBC", "SHA2-512-256", "cbc(aes)", 32, 0, 16, 16, 32, "hmac(sha512)", 64),
        Algo("null-sha1", "NULL", "HMAC-SHA1-96", "ecb(cipher_null)", 0, 0, 0, 4, 12, "hmac(sha1)", 20),
        Algo("null-sha256", "NULL", "SHA2-256-128", "ecb(cipher_null)", 0, 0, 0, 4, 16, "hmac(sha256)", 32),
    ]
}

ALGO_IDS = list(ALGOS)


def _key_bytes(label: str, n: int) -> bytes:
    out = b""
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{label}/{counter}".encode()).digest()
        counter += 1
    return out[:n]


# ---------------------------------------------------------------------------
# Modes: where the ESP goes and what the inner packets are


@dataclass(frozen=True)
class Mode:
    id: str
    tunnel: bool
    inner_version: int
    outer_version: int  # for transport, equal to inner_version


MODES: dict[str, Mode] = {
    m.id: m
    for m in [
        Mode("transport4", False, 4, 4),
        Mode("transport6", False, 6, 6),
        Mode("tunnel4in4", True, 4, 4),
        Mode("tunnel6in6", True, 6, 6),
        Mode("tunnel4in6", True, 4, 6),
        Mode("tunnel6in4", True, 6, 4),
    ]
}
MODE_IDS = list(MODES)

OUTER4 = ("192.0.2.1", "192.0.2.2")
OUTER6 = ("2001:db8::1", "2001:db8::2")
INNER4 = ("198.51.100.7", "203.0.113.9")
INNER6 = ("2001:db8:a::7", "2001:db8:b::9")


@dataclass
class SAParams:
    """Everything that defines one SA, for both esp-tool and scapy."""

    algo: Algo
    mode: Mode
    spi: int = 0x1000
    esn: bool = False
    seq: int = 1  # encap: first 64-bit outbound sequence number
    replay_window: int = 32
    replay_seq: int = 0
    natt: Optional[tuple[int, int]] = None  # (sport, dport)
    fixed_iv: Optional[bytes] = None
    key_label: str = ""

    # -- keys ---------------------------------------------------------------
    @property
    def _label(self) -> str:
        return self.key_label or self.algo.id

    @property
    def crypt_key(self) -> bytes:
        """Cipher key || salt (scapy's and xfrm's layout)."""
        return _key_bytes("enc/" + self._label, self.algo.enc_key_len + self.algo.salt_len)

    @property
    def auth_key(self) -> bytes:
        return _key_bytes("auth/" + self._label, self.algo.auth_key_len)

    # -- outer addresses ----------------------------------------------------
    @property
    def outer_addrs(self) -> tuple[str, str]:
        return OUTER4 if self.mode.outer_version == 4 else OUTER6

    # -- our SA.json --------------------------------------------------------
    def sa_json(self) -> dict:
        d: dict = {"spi": self.spi, "mode": "tunnel" if self.mode.tunnel else "transport"}
        if self.algo.is_aead:
            d["aead"] = {"name": self.algo.enc_name, "key": self.crypt_key.hex(), "icv_bits": self.algo.icv_len * 8}
        else:
            d["enc"] = {"name": self.algo.enc_name, "key": self.crypt_key.hex()}
            d["auth"] = {"name": self.algo.auth_name, "key": self.auth_key.hex(), "trunc_bits": self.algo.icv_len * 8}
        d["esn"] = self.esn
        d["seq"] = self.seq
        d["replay_window"] = self.replay_window
        d["replay_seq"] = self.replay_seq
        if self.mode.tunnel:
            src, dst = self.outer_addrs
            d["tunnel"] = {"src": src, "dst": dst}
        if self.natt:
            d["encap"] = {"sport": self.natt[0], "dport": self.natt[1]}
        if self.fixed_iv is not None:
            d["iv"] = self.fixed_iv.hex()
        return d

    def write_sa(self, path: Path) -> Path:
        path.write_text(json.dumps(self.sa_json(), indent=1))
        return path

    # -- scapy --------------------------------------------------------------
    def scapy_sa(self, esn_high: Optional[int] = None) -> SecurityAssociation:
        kw: dict = dict(spi=self.spi, crypt_algo=self.algo.scapy_crypt)
        if self.algo.enc_key_len or self.algo.salt_len:
            kw["crypt_key"] = self.crypt_key
        if self.algo.scapy_auth:
            kw["auth_algo"] = self.algo.scapy_auth
            kw["auth_key"] = self.auth_key
        if self.mode.tunnel:
            src, dst = self.outer_addrs
            kw["tunnel_header"] = IP(src=src, dst=dst) if self.mode.outer_version == 4 else IPv6(src=src, dst=dst)
        if self.natt:
            kw["nat_t_header"] = UDP(sport=self.natt[0], dport=self.natt[1])
        if self.esn:
            hi = (self.seq >> 32) if esn_high is None else esn_high
            # scapy treats esn=0 as "use the SA value" (which is 0 anyway): fine.
            kw["esn_en"] = True
            kw["esn"] = hi
        return SecurityAssociation(ESP, **kw)

    def describe(self) -> str:
        parts = [self.algo.id, self.mode.id, f"spi=0x{self.spi:x}"]
        if self.esn:
            parts.append(f"esn seq=0x{self.seq:x} replay_seq=0x{self.replay_seq:x}")
        if self.natt:
            parts.append(f"natt={self.natt}")
        parts.append(f"window={self.replay_window}")
        return " ".join(parts)


def make_params(algo_id: str, mode_id: str, **kw) -> SAParams:
    return SAParams(algo=ALGOS[algo_id], mode=MODES[mode_id], **kw)


# ---------------------------------------------------------------------------
# Packet parsing by version nibble


def parse_ip(data: bytes):
    """Parse raw IP bytes into an scapy IP or IPv6 packet (fresh object)."""
    if not data:
        raise ValueError("empty packet")
    v = data[0] >> 4
    if v == 4:
        return IP(data)
    if v == 6:
        return IPv6(data)
    raise ValueError(f"not an IP packet (version nibble {v}): {data[:16].hex()}")


def ip_class(version: int):
    return IP if version == 4 else IPv6


# ---------------------------------------------------------------------------
# Inner packets


def inner_packets(version: int, align: int = 16, big: bool = True) -> list[bytes]:
    """A spread of inner packets: ICMP, UDP and TCP, empty payloads included,
    and `align` consecutive sizes so that every pad length occurs whatever
    header the ESP payload starts with."""
    if version == 4:
        src, dst = INNER4

        def ip(**kw):
            return IP(src=src, dst=dst, **kw)

        def echo(n, i):
            return ICMP(type=8, id=0x4242, seq=i) / Raw(bytes((i + k) & 0xFF for k in range(n)))
    else:
        src, dst = INNER6

        def ip(**kw):
            return IPv6(src=src, dst=dst, **kw)

        def echo(n, i):
            return ICMPv6EchoRequest(id=0x4242, seq=i, data=bytes((i + k) & 0xFF for k in range(n)))

    pkts = []
    for i, n in enumerate(range(0, max(align, 4))):
        pkts.append(ip() / echo(n, i))
    pkts.append(ip() / UDP(sport=40000, dport=7777))  # empty UDP payload
    pkts.append(ip() / UDP(sport=40001, dport=7777) / Raw(b"\x01"))
    pkts.append(ip() / TCP(sport=40002, dport=443, flags="S", seq=12345))  # empty TCP payload
    pkts.append(ip() / TCP(sport=40003, dport=443, flags="PA", seq=1, ack=1) / Raw(b"GET / HTTP/1.1\r\n\r\n"))
    if version == 4:
        pkts.append(IP(src=src, dst=dst, tos=0xB8, ttl=17, id=0xBEEF, flags="DF") / UDP(sport=5000, dport=7777) / Raw(b"x" * 77))
    else:
        pkts.append(IPv6(src=src, dst=dst, tc=0xB8, fl=0x12345, hlim=17) / UDP(sport=5000, dport=7777) / Raw(b"x" * 77))
    if big:
        pkts.append(ip() / echo(1000, 99))
        pkts.append(ip() / UDP(sport=5001, dport=7777) / Raw(bytes(range(256)) * 5 + b"tail"))
    # Serialise once so every length and checksum field is filled in.
    return [bytes(p) for p in pkts]


# ---------------------------------------------------------------------------
# pcap


def write_pcap(path: Path, packets: Iterable[bytes], linktype: int = LINKTYPE_RAW, eth_trailer: bytes = b"") -> Path:
    """Classic pcap.  With Ethernet, `eth_trailer` is appended to each frame after
    the IP packet (as Ethernet minimum-size padding or a captured FCS would be)."""
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, linktype))
        for i, p in enumerate(packets):
            if linktype == LINKTYPE_ETHERNET:
                ethertype = 0x0800 if p[0] >> 4 == 4 else 0x86DD
                p = bytes.fromhex("020000000002" "020000000001") + struct.pack("!H", ethertype) + p + eth_trailer
            elif linktype != LINKTYPE_RAW:
                raise ValueError(linktype)
            f.write(struct.pack("<IIII", 1700000000 + i, 0, len(p), len(p)))
            f.write(p)
    return path


def read_pcap(path: Path) -> tuple[int, list[bytes]]:
    """Returns (linktype, records). Understands both byte orders and ns pcap."""
    data = Path(path).read_bytes()
    if len(data) < 24:
        raise ValueError(f"{path}: {len(data)} bytes, no pcap header")
    magic_le = struct.unpack("<I", data[:4])[0]
    if magic_le in (0xA1B2C3D4, 0xA1B23C4D):
        e = "<"
    elif struct.unpack(">I", data[:4])[0] in (0xA1B2C3D4, 0xA1B23C4D):
        e = ">"
    else:
        raise ValueError(f"{path}: not a classic pcap (magic {data[:4].hex()})")
    linktype = struct.unpack(e + "I", data[20:24])[0] & 0x0FFFFFFF
    off = 24
    recs = []
    while off < len(data):
        if off + 16 > len(data):
            raise ValueError(f"{path}: truncated record header at {off}")
        _, _, incl, orig = struct.unpack(e + "IIII", data[off:off + 16])
        off += 16
        if off + incl > len(data):
            raise ValueError(f"{path}: truncated record at {off}")
        if incl != orig:
            raise ValueError(f"{path}: record snapped ({incl} of {orig} bytes)")
        recs.append(data[off:off + incl])
        off += incl
    return linktype, recs


# ---------------------------------------------------------------------------
# Running esp-tool


@dataclass
class ToolResult:
    argv: list
    returncode: int
    stdout: str
    stderr: str
    lines: list = field(default_factory=list)  # per-packet verdict lines
    counters: dict = field(default_factory=dict)
    out_linktype: Optional[int] = None
    out_packets: list = field(default_factory=list)

    def explain(self) -> str:
        return (
            f"$ {shlex.join(self.argv)}\nexit={self.returncode}\n"
            f"--- stdout ---\n{self.stdout}--- stderr ---\n{self.stderr}"
        )


def run_esp_tool(command: str, params: SAParams, packets: Sequence[bytes], workdir: Path,
                 linktype: int = LINKTYPE_RAW, name: str = "case", sa_override: Optional[dict] = None,
                 check_ok: bool = True, eth_trailer: bytes = b"") -> ToolResult:
    """Write packets to a pcap, run `esp-tool COMMAND`, parse and sanity-check its output."""
    workdir.mkdir(parents=True, exist_ok=True)
    sa_path = workdir / f"{name}.sa.json"
    if sa_override is not None:
        sa_path.write_text(json.dumps(sa_override, indent=1))
    else:
        params.write_sa(sa_path)
    in_path = write_pcap(workdir / f"{name}.in.pcap", packets, linktype, eth_trailer)
    out_path = workdir / f"{name}.out.pcap"
    argv = [esp_tool_path(), command, "--sa", str(sa_path), str(in_path), str(out_path)]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    res = ToolResult(argv, p.returncode, p.stdout, p.stderr)
    if not check_ok:
        return res
    # Every case runs once per crypto backend (scripts/test.sh sets XFRM_CRYPTO): make sure the one asked for did
    # the work (ipsec-mb hands ecb(cipher_null) to OpenSSL).
    wanted = os.environ.get("XFRM_CRYPTO")
    if wanted:
        served = "openssl" if params.algo.enc_name == "ecb(cipher_null)" else wanted
        assert f"esp-tool: crypto {served}\n" in p.stderr, f"expected crypto backend {served}\n" + res.explain()
    assert p.returncode == 0, "esp-tool failed\n" + res.explain()
    out_lines = p.stdout.splitlines()
    assert out_lines and out_lines[-1].startswith("counters "), "no final 'counters' line\n" + res.explain()
    try:
        res.counters = json.loads(out_lines[-1][len("counters "):])
    except json.JSONDecodeError as e:
        raise AssertionError(f"counters line is not JSON ({e})\n" + res.explain())
    assert isinstance(res.counters, dict), res.explain()
    res.lines = out_lines[:-1]
    assert len(res.lines) == len(packets), (
        f"expected one verdict line per input packet ({len(packets)}), got {len(res.lines)}\n" + res.explain())
    res.out_linktype, res.out_packets = read_pcap(out_path)
    assert res.out_linktype == LINKTYPE_RAW, f"output linktype {res.out_linktype}, want 101\n" + res.explain()
    n_ok = sum(1 for ln in res.lines if ln == "ok")
    assert len(res.out_packets) == n_ok, (
        f"{n_ok} 'ok' lines but {len(res.out_packets)} packets in OUT.pcap\n" + res.explain())
    return res


def assert_all_ok(res: ToolResult, params: SAParams):
    bad = [(i, ln) for i, ln in enumerate(res.lines) if ln != "ok"]
    assert not bad, f"[{params.describe()}] packets not ok: {bad[:8]}\n" + res.explain()


# ---------------------------------------------------------------------------
# Checksums and header checks


def inet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def ipv4_header_ok(pkt: bytes) -> bool:
    ihl = (pkt[0] & 0x0F) * 4
    return inet_checksum(pkt[:ihl]) == 0


def udp_checksum_ok(pkt: bytes, l4_off: int) -> bool:
    """Verify a UDP checksum over its pseudo header (v4 or v6)."""
    udp = pkt[l4_off:]
    if pkt[0] >> 4 == 4:
        pseudo = pkt[12:20] + struct.pack("!BBH", 0, IPPROTO_UDP, len(udp))
    else:
        pseudo = pkt[8:40] + struct.pack("!I3xB", len(udp), IPPROTO_UDP)
    return inet_checksum(pseudo + udp) == 0


def ip_header_len(pkt: bytes) -> int:
    return (pkt[0] & 0x0F) * 4 if pkt[0] >> 4 == 4 else 40


def ip_proto(pkt: bytes) -> int:
    return pkt[9] if pkt[0] >> 4 == 4 else pkt[6]


def transport_split(pkt: bytes) -> tuple[int, int]:
    """Where transport-mode ESP goes in an IP packet: (offset of the ESP header,
    offset of the next-header byte that will point at it).

    IPv6: after Hop-by-Hop, Routing, and Destination Options that come before
    a Routing header (the placement Linux and scapy use; RFC 4303 3.1.1)."""
    if pkt[0] >> 4 == 4:
        return ip_header_len(pkt), 9
    off, nh_off, nh, seen_routing = 40, 6, pkt[6], False
    while nh in (0, 43, 60):
        if nh == 60 and seen_routing:
            break
        seen_routing |= nh == 43
        nh_off, nh = off, pkt[off]
        off += (pkt[off + 1] + 1) * 8
    return off, nh_off


@dataclass
class OuterInfo:
    esp: bytes  # from SPI to end of ICV
    spi: int
    seq: int
    udp: Optional[tuple[int, int]]


def check_outer(pkt: bytes, params: SAParams, inner: bytes) -> OuterInfo:
    """Structural checks on an ESP packet esp-tool wrote; returns its ESP part."""
    v = pkt[0] >> 4
    assert v == params.mode.outer_version, f"outer IP version {v}, want {params.mode.outer_version}"
    hl = ip_header_len(pkt)
    if v == 4:
        assert len(pkt) >= 20
        assert struct.unpack("!H", pkt[2:4])[0] == len(pkt), "IPv4 total length does not match the packet"
        assert ipv4_header_ok(pkt), "bad IPv4 header checksum"
        assert struct.unpack("!H", pkt[6:8])[0] & 0x1FFF == 0 and not pkt[6] & 0x20, "outer packet is a fragment"
        assert pkt[8] > 0, "TTL 0"
    else:
        assert struct.unpack("!H", pkt[4:6])[0] == len(pkt) - 40, "IPv6 payload length does not match the packet"
        assert pkt[7] > 0, "hop limit 0"
    src, dst = parse_ip(pkt).src, parse_ip(pkt).dst
    if params.mode.tunnel:
        want_src, want_dst = params.outer_addrs
        assert ipaddress.ip_address(src) == ipaddress.ip_address(want_src), f"outer src {src}, want {want_src}"
        assert ipaddress.ip_address(dst) == ipaddress.ip_address(want_dst), f"outer dst {dst}, want {want_dst}"
    else:
        # Transport: the original header, except protocol/length/checksum (v4)
        # or next header/payload length (v6).
        hl, nh_off = transport_split(inner)
        if v == 4:
            assert pkt[0] == inner[0], "IPv4 version/IHL changed"
            assert pkt[1] == inner[1], "TOS changed"
            assert pkt[4:9] == inner[4:9], "id/flags/fragment offset/TTL changed"
            assert pkt[12:hl] == inner[12:hl], "addresses/options changed"
        else:
            assert pkt[0:4] == inner[0:4], "version/traffic class/flow label changed"
            assert pkt[7:40] == inner[7:40], "hop limit/addresses changed"
            # Extension headers before ESP: unchanged except the next-header byte pointing at ESP.
            ext_got, ext_want = bytearray(pkt[40:hl]), bytearray(inner[40:hl])
            if nh_off != 6:
                ext_got[nh_off - 40] = ext_want[nh_off - 40] = 0
            assert ext_got == ext_want, "IPv6 extension headers before ESP changed"
    proto = ip_proto(pkt) if params.mode.tunnel else pkt[nh_off]
    udp = None
    if params.natt:
        assert proto == IPPROTO_UDP, f"NAT-T: outer protocol {proto}, want 17"
        u = pkt[hl:hl + 8]
        sport, dport, ulen, csum = struct.unpack("!HHHH", u)
        assert (sport, dport) == params.natt, f"UDP ports {(sport, dport)}, want {params.natt}"
        assert ulen == len(pkt) - hl, f"UDP length {ulen}, want {len(pkt) - hl}"
        if csum != 0:
            assert udp_checksum_ok(pkt, hl), "UDP checksum is neither 0 nor correct"
        udp = (sport, dport)
        esp = pkt[hl + 8:]
        assert esp[:4] != b"\0\0\0\0", "ESP in UDP starts with the non-ESP marker"
    else:
        assert proto == IPPROTO_ESP, f"outer protocol {proto}, want 50 (ESP)"
        esp = pkt[hl:]
    spi, seq = struct.unpack("!II", esp[:8])
    return OuterInfo(esp, spi, seq, udp)


# ---------------------------------------------------------------------------
# The two directions against scapy


def describe_diff(got: bytes, want: bytes) -> str:
    """Human-readable first difference between two IP packets."""
    lines = [f"got {len(got)} bytes, want {len(want)} bytes"]
    n = min(len(got), len(want))
    first = next((i for i in range(n) if got[i] != want[i]), n)
    lines.append(f"first difference at byte {first}")
    for label, p in (("got ", got), ("want", want)):
        try:
            s = parse_ip(p).summary()
        except Exception as e:  # noqa: BLE001
            s = f"<unparseable: {e}>"
        lines.append(f"{label}: proto={ip_proto(p) if p else None} {s}")
        lines.append(f"{label}: {p[:64].hex()}{'...' if len(p) > 64 else ''}")
    return "\n".join(lines)


def scapy_encrypt(params: SAParams, inner: bytes, seq64: int, iv: Optional[bytes] = None) -> bytes:
    """scapy encrypts one inner packet with the given 64-bit sequence number."""
    hi, lo = seq64 >> 32, seq64 & 0xFFFFFFFF
    assert lo != 0, "scapy 2.8.0 cannot send seq 0 (seq_num=0 falls back to the SA value)"
    assert params.esn or hi == 0
    sa = params.scapy_sa(esn_high=hi)
    return bytes(sa.encrypt(parse_ip(inner), seq_num=lo, iv=iv))


def scapy_decrypt(params: SAParams, outer: bytes, esn_high: int = 0) -> bytes:
    """scapy decrypts one ESP packet (fresh parse: decrypt mutates its input)."""
    sa = params.scapy_sa(esn_high=esn_high)
    return bytes(sa.decrypt(parse_ip(outer)))


def scapy_open_esp(params: SAParams, outer: bytes, esn_high: int = 0):
    """Low-level scapy decryption that keeps padding, pad length and next header.

    Verifies the HMAC first (for non-AEAD transforms) exactly as the high-level
    decrypt would.  Returns scapy's _ESPPlain.
    """
    sa = params.scapy_sa(esn_high=esn_high)
    esp = parse_ip(outer)[ESP]
    sa.auth_algo.verify(esp, sa.auth_key, esn_en=sa.esn_en, esn=sa.esn)
    icv = sa.crypt_icv_size or sa.crypt_algo.icv_size or sa.auth_algo.icv_size
    return sa.crypt_algo.decrypt(sa, esp, sa.crypt_key, icv, esn_en=sa.esn_en, esn=sa.esn)


def decap_roundtrip(params: SAParams, inners: Sequence[bytes], seqs: Sequence[int], workdir: Path,
                    linktype: int = LINKTYPE_ETHERNET, check_reference: bool = True,
                    eth_trailer: bytes = b"") -> ToolResult:
    """Direction A: scapy encrypts, esp-tool decap must give back each inner packet."""
    encs = []
    for inner, s in zip(inners, seqs, strict=True):
        enc = scapy_encrypt(params, inner, s)
        if check_reference:
            # What a correct peer delivers: scapy's own decryption of its packet.
            ref = scapy_decrypt(params, enc, esn_high=s >> 32)
            assert ref == inner, "test bug: scapy does not round-trip its own packet\n" + describe_diff(ref, inner)
        encs.append(enc)
    res = run_esp_tool("decap", params, encs, workdir, linktype=linktype, name="decap", eth_trailer=eth_trailer)
    assert_all_ok(res, params)
    for i, (got, want) in enumerate(zip(res.out_packets, inners)):
        assert got == want, (f"[{params.describe()}] decap packet {i} (seq 0x{seqs[i]:x}) differs from the "
                             f"inner packet scapy sent:\n" + describe_diff(got, want))
    return res


def encap_roundtrip(params: SAParams, inners: Sequence[bytes], workdir: Path,
                    linktype: int = LINKTYPE_RAW, eth_trailer: bytes = b"") -> ToolResult:
    """Direction B: esp-tool encap, scapy must decrypt each packet to the inner packet."""
    algo = params.algo
    res = run_esp_tool("encap", params, inners, workdir, linktype=linktype, name="encap", eth_trailer=eth_trailer)
    assert_all_ok(res, params)
    assert len(res.out_packets) == len(inners)
    for i, (out, inner) in enumerate(zip(res.out_packets, inners)):
        seq64 = params.seq + i
        hi, lo = seq64 >> 32, seq64 & 0xFFFFFFFF
        ctx = f"[{params.describe()}] encap packet {i} (seq 0x{seq64:x}): "
        try:
            info = check_outer(out, params, inner)
        except AssertionError as e:
            raise AssertionError(ctx + str(e) + f"\npacket: {out[:80].hex()}") from None
        assert info.spi == params.spi, ctx + f"SPI 0x{info.spi:x} on the wire, want 0x{params.spi:x}"
        assert info.seq == lo, ctx + f"wire seq 0x{info.seq:x}, want low 32 bits 0x{lo:x}"
        body = len(info.esp) - 8 - algo.iv_len - algo.icv_len
        assert body >= 2 and body % algo.align == 0, (
            ctx + f"ESP length {len(info.esp)}: ciphertext {body} bytes is not a positive multiple of {algo.align} "
            f"(would the ESN high bits or a wrong ICV/IV size be on the wire?)")
        wire_iv = info.esp[8:8 + algo.iv_len]
        if params.fixed_iv is not None:
            assert wire_iv == params.fixed_iv, ctx + f"IV {wire_iv.hex()}, want the SA's fixed {params.fixed_iv.hex()}"
        try:
            got = scapy_decrypt(params, out, esn_high=hi)
        except Exception as e:  # IPSecIntegrityError and friends
            raise AssertionError(ctx + f"scapy cannot decrypt it: {type(e).__name__}: {e}\n"
                                 f"packet: {out.hex()}") from None
        assert got == inner, ctx + "scapy's decryption differs from the inner packet\n" + describe_diff(got, inner)
        plain = scapy_open_esp(params, out, esn_high=hi)
        pad = bytes(plain.padding)
        assert pad == bytes(range(1, plain.padlen + 1)), ctx + f"padding {pad.hex()} is not 01 02 03 .. (RFC 4303 2.4)"
        if params.mode.tunnel:
            want_nh = 4 if inner[0] >> 4 == 4 else 41
            want_payload = inner
        else:
            esp_off, nh_off = transport_split(inner)
            want_nh = inner[nh_off]
            want_payload = inner[esp_off:]
        assert plain.nh == want_nh, ctx + f"next header {plain.nh}, want {want_nh}"
        assert bytes(plain.data) == want_payload, ctx + "decrypted ESP payload differs"
        # Nothing but SPI, seq, IV, payload, padding, pad length, next header and ICV on the
        # wire: in particular no ESN high half (RFC 4303 2.2.1: it is never transmitted).
        want_len = 8 + algo.iv_len + len(want_payload) + plain.padlen + 2 + algo.icv_len
        assert len(info.esp) == want_len, ctx + f"ESP is {len(info.esp)} bytes, its parts add up to {want_len}"
    return res


def gcm_esp_packet(params: SAParams, seq: int, plaintext: bytes) -> bytes:
    """Independent RFC 4106 sealing (python `cryptography`, not scapy) of an arbitrary
    ESP plaintext, trailer included, in an outer IPv4 header (tunnel4in4, no ESN).
    For packets scapy cannot make: bad pad length, next header 59, seq 0."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    assert params.algo.scapy_crypt == "AES-GCM" and not params.esn and not params.natt
    key, salt = params.crypt_key[:-4], params.crypt_key[-4:]
    iv = seq.to_bytes(8, "big")
    hdr = struct.pack("!II", params.spi, seq)
    ct = AESGCM(key).encrypt(salt + iv, plaintext, hdr)
    src, dst = params.outer_addrs
    return bytes(IP(src=src, dst=dst, proto=IPPROTO_ESP) / Raw(hdr + iv + ct))


def esp_trailer(payload: bytes, next_header: int, align: int = 4) -> bytes:
    """payload || 01 02 .. || pad length || next header, aligned to `align`."""
    n = -(len(payload) + 2) % align
    return payload + bytes(range(1, n + 1)) + bytes([n, next_header])
