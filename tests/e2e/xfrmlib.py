"""Helpers for the xfrm end-to-end tests: SA descriptions for both scapy and `ip xfrm` lines, pcap I/O."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP, SecurityAssociation


def write_raw_pcap(path: Path, packets: list[bytes]) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101))
        for i, p in enumerate(packets):
            f.write(struct.pack("<IIII", 1_700_000_000 + i, 0, len(p), len(p)))
            f.write(p)


def read_raw_pcap(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    magic, _, _, _, _, _, link = struct.unpack("<IHHiIII", data[:24])
    assert magic == 0xA1B2C3D4 and link == 101, (hex(magic), link)
    out, off = [], 24
    while off + 16 <= len(data):
        _, _, incl, _ = struct.unpack("<IIII", data[off:off + 16])
        off += 16
        out.append(data[off:off + incl])
        off += incl
    return out


def parse_ip(b: bytes):
    return IP(b) if b[0] >> 4 == 4 else IPv6(b)


@dataclass
class Suite:
    """An ESP algorithm as scapy and as `ip xfrm` name it."""
    scapy_crypt: str
    crypt_key: bytes  # scapy's crypt_key (key || salt for AEADs)
    xfrm_algo: str  # the ALGO-LIST words for `ip xfrm state add`
    scapy_auth: str | None = None
    auth_key: bytes | None = None


def _hex(b: bytes) -> str:
    return "0x" + b.hex()


KEY16 = bytes(range(0x10, 0x20))
KEY32 = bytes(range(0x20, 0x40))
SALT = bytes.fromhex("a1b2c3d4")

SUITES = {
    "gcm128": Suite("AES-GCM", KEY16 + SALT, f"aead rfc4106(gcm(aes)) {_hex(KEY16 + SALT)} 128"),
    "gcm256": Suite("AES-GCM", KEY32 + SALT, f"aead rfc4106(gcm(aes)) {_hex(KEY32 + SALT)} 128"),
    "chacha": Suite("CHACHA20-POLY1305", KEY32 + SALT,
                    f"aead rfc7539esp(chacha20,poly1305) {_hex(KEY32 + SALT)} 128"),
    "cbc-sha256": Suite("AES-CBC", KEY16, f"enc cbc(aes) {_hex(KEY16)} auth-trunc hmac(sha256) {_hex(KEY32)} 128",
                        "SHA2-256-128", KEY32),
}


def scapy_sa(suite: Suite, spi: int, tunnel: tuple[str, str] | None, natt: bool = False, seq: int = 1,
             esn: int | None = None) -> SecurityAssociation:
    kw = {}
    if tunnel:
        src, dst = tunnel
        kw["tunnel_header"] = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
    if natt:
        kw["nat_t_header"] = UDP(sport=4500, dport=4500)
    if suite.scapy_auth:
        kw["auth_algo"] = suite.scapy_auth
        kw["auth_key"] = suite.auth_key
    if esn is not None:
        kw["esn_en"] = True
        kw["esn"] = esn
    return SecurityAssociation(ESP, spi=spi, crypt_algo=suite.scapy_crypt, crypt_key=suite.crypt_key,
                               seq_num=seq, **kw)
