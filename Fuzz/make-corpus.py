#!/usr/bin/env python3
"""Writes the fuzz harnesses' seed corpora (Fuzz/Corpus/TARGET/) from the project's test material.

    python3 Fuzz/make-corpus.py [XFRM]     # XFRM: an `xfrm` binary for the control seeds (default .build/debug/xfrm)

- esp-input, daemon-intake: the published ESP vectors (Tests/XFRMESPTests/Vectors) as raw packets, and for every SA
  of the harnesses' fixture (Fuzz/Sources/FuzzSupport/ESPFixture.swift) a well-formed inner packet with its RFC 4303
  trailer in the harness's "seal this plaintext" form; TUN reads with virtio-net headers (plain, TSO, USO); IKE,
  keepalive and GRO datagrams on the NAT-T port.
- control: the datagrams `xfrm -S` sends for the e2e suites' commands (captured from a socket that acks them).
- batch: the batch texts of tests/e2e/test_batch_golden.py.
- pcap: small classic pcap files (raw IP and Ethernet with 802.1Q, both byte orders, micro and nano seconds).
- replay: step sequences over the window edges (see XFRMTestKit.ReplayDifferential).
- input-runs: batches of sealed packets per SA with replays, other SAs, refused flows and raw packets between.
- reassembly: datagrams cut into fragments in order, reversed, with duplicates, an overlap, padding, a broken header
  and the 30-second limit passing; IPv6 ones with a Hop-by-Hop header, an atomic fragment, a length past the packet,
  a piece not a multiple of 8 bytes and the 60-second limit passing (see Fuzz/Sources/fuzz-reassembly).
Files are named by their content's SHA-1, as libFuzzer names its corpus.
"""
import hashlib
import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "Fuzz", "Corpus")


def put(target, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)


def checksum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ip4(src, dst, proto, payload, ttl=64):
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0x4000, ttl, proto, 0,
                    socket.inet_aton(src), socket.inet_aton(dst))
    return h[:10] + struct.pack("!H", checksum(h)) + h[12:] + payload


def ip6(src, dst, nh, payload):
    return struct.pack("!IHBB", 6 << 28, len(payload), nh, 64) + socket.inet_pton(socket.AF_INET6, src) + \
        socket.inet_pton(socket.AF_INET6, dst) + payload


def udp(payload, sport=1234, dport=5678):
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def tcp(payload, seq=1000):
    return struct.pack("!HHIIBBHHH", 40000, 80, seq, 0, 5 << 4, 0x18, 65535, 0, 0) + payload


def trailer(payload, nh, block=16):
    """Payload, padding 1, 2, 3, ..., pad length and next header, aligned to `block` (RFC 4303 §2.4)."""
    pad = (block - (len(payload) + 2) % block) % block
    return payload + bytes(range(1, pad + 1)) + bytes([pad, nh])


# The fixture's inbound SAs in order (ESPFixture.lines): (outer family, mode).
FIXTURE_SAS = [(4, "tunnel")] * 10 + [(4, "transport"), (4, "tunnel"), (6, "tunnel"), (6, "transport"),
                                      (6, "tunnel")]


def inner_plaintexts(family, mode):
    data = bytes(range(48))
    if mode == "transport":
        return [trailer(udp(data), 17), trailer(tcp(data), 6), trailer(b"", 59)]
    v4 = ip4("10.0.1.1", "10.0.2.1", 17, udp(data))
    v4fwd = ip4("10.0.1.1", "10.0.2.7", 17, udp(data))
    v6 = ip6("2001:db8:a::1", "2001:db8:b::1", 17, udp(data))
    if family == 4:
        return [trailer(v4, 4), trailer(v4fwd, 4), trailer(v6, 41)]
    return [trailer(v6, 41), trailer(v4, 4)]


def esp_seeds():
    with open(os.path.join(ROOT, "Tests", "XFRMESPTests", "Vectors", "esp-vectors.json")) as f:
        vectors = json.load(f)["esp_packet_vectors"]
    for v in vectors:
        esp = bytes.fromhex(v["ciphertext_esp_packet_hex"])
        put("esp-input", b"\x00" + ip4("192.0.2.1", "192.0.2.2", 50, esp))
        put("esp-input", b"\x00" + ip4("192.0.2.1", "192.0.2.2", 17, udp(esp, 4500, 4500)))
    put("esp-input", b"\x00" + ip4("192.0.2.1", "192.0.2.2", 17, udp(b"\0\0\0\0" + bytes(28), 4500, 4500)))
    put("esp-input", b"\x00" + ip4("192.0.2.1", "192.0.2.2", 17, udp(b"\xff", 4500, 4500)))
    for i, (family, mode) in enumerate(FIXTURE_SAS):
        for p in inner_plaintexts(family, mode):
            put("esp-input", bytes([0x80 | i, 0]) + struct.pack("!Q", 1) + p)
            put("daemon-intake", bytes([5, i]) + struct.pack("!I", 1) + p)


def virtio(flags, gso, hdr_len, gso_size, csum_start, csum_offset):
    return struct.pack("<BBHHHH", flags, gso, hdr_len, gso_size, csum_start, csum_offset)


def daemon_seeds():
    data = bytes(range(256)) * 4
    plain = ip4("10.0.2.1", "10.0.1.1", 17, udp(data[:100]))
    put("daemon-intake", b"\x00" + virtio(0, 0, 0, 0, 0, 0) + plain)
    put("daemon-intake", b"\x00" + virtio(1, 0, 0, 0, 20, 6) + plain)
    put("daemon-intake", b"\x00" + virtio(1, 1, 40, 400, 20, 16) + ip4("10.0.2.1", "10.0.1.1", 6, tcp(data)))
    put("daemon-intake", b"\x00" + virtio(1, 4, 60, 400, 40, 16) +
        ip6("2001:db8:b::1", "2001:db8:a::1", 6, tcp(data)))
    put("daemon-intake", b"\x00" + virtio(1, 5, 28, 300, 20, 6) + ip4("10.0.2.1", "10.0.1.1", 17, udp(data)))
    put("daemon-intake", b"\x01\x00" + b"\0\0\0\0" + bytes(28))  # IKE behind the non-ESP marker
    put("daemon-intake", b"\x01\x00\xff")  # NAT-T keepalive
    put("daemon-intake", b"\x01\x01\x00\x40" + bytes(range(1, 161)))  # a GRO read: 64-byte segments
    put("daemon-intake", b"\x02\x00" + ip4("192.0.2.1", "192.0.2.2", 50, struct.pack("!II", 0x1001, 1) + data[:64]))
    put("daemon-intake", b"\x04\x00" + struct.pack("!II", 0x100d, 1) + data[:64])


def control_seeds(xfrm):
    """Runs `xfrm -S` against a socket that records each request datagram and acknowledges it."""
    key = "0x0102030405060708090a0b0c0d0e0f1011121314"
    cbc = "enc cbc(aes) 0x00112233445566778899aabbccddeeff auth-trunc hmac(sha256) 0x" + "ab" * 32 + " 128"
    commands = [
        f"state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 reqid 1 mode tunnel aead rfc4106(gcm(aes)) {key} 128 replay-window 64 flag esn",
        f"state add src 192.0.2.2 dst 192.0.2.1 proto esp spi 0x200 reqid 2 mode transport {cbc} encap espinudp 4500 4500 0.0.0.0 mark 7 mask 0xff",
        f"state update src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 reqid 1 mode tunnel aead rfc4106(gcm(aes)) {key} 128 limit time-soft 10 limit packet-hard 100",
        "state add src 2001:db8:1::1 dst 2001:db8:2::2 proto esp spi 0x300 mode tunnel aead rfc7539esp(chacha20,poly1305) 0x" + "66" * 36 + " 128 sel src 2001:db8:a::/64 dst 2001:db8:b::/64",
        "state allocspi src 192.0.2.1 dst 192.0.2.2 proto esp mode tunnel reqid 5 min 0x1000 max 0x2000",
        "policy add src 10.0.1.0/24 dst 10.0.2.0/24 proto tcp dport 443 dir out priority 10 tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 1 mode tunnel",
        "policy add src 10.0.2.0/24 dst 10.0.1.0/24 dir in action block",
        "policy add src 2001:db8:a::/64 dst 2001:db8:b::/64 dir fwd tmpl src 2001:db8:1::1 dst 2001:db8:2::2 proto esp mode tunnel level use",
        "policy update src 10.0.1.0/24 dst 10.0.2.0/24 dir out ptype main mark 1 mask 0xff if_id 3 tmpl proto esp mode transport",
        "state get src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100",
        "policy get src 10.0.1.0/24 dst 10.0.2.0/24 proto tcp dport 443 dir out",
        "state list", "policy list", "state count", "policy count",
        "state delete src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100",
        "policy delete src 10.0.2.0/24 dst 10.0.1.0/24 dir in",
        "policy setdefault in block fwd accept out block", "policy getdefault",
        "state flush", "policy flush", "state flush proto esp",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s.sock")
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        srv.bind(path)
        srv.listen(4)
        got = []

        def serve():
            while True:
                try:
                    c, _ = srv.accept()
                except OSError:
                    return
                with c:
                    while True:
                        d = c.recv(65536)
                        if not d:
                            break
                        got.append(d)
                        length, typ, flags, seq, pid = struct.unpack_from("=IHHII", d)
                        done = struct.pack("=IHHII", 20, 3, 2, seq, pid) + struct.pack("=i", 0)  # NLMSG_DONE
                        ack = struct.pack("=IHHII", 36, 2, 0x100, seq, pid) + struct.pack("=i", 0) + d[:16]
                        c.send(done if flags & 0x300 == 0x300 else ack)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        for cmd in commands:
            subprocess.run([xfrm, "-S", path] + cmd.split(), capture_output=True, timeout=10)
        srv.close()
    for d in got:
        put("control", d)
    if len(got) >= 2:
        put("control", b"".join(d + bytes(-len(d) % 4) for d in got[:6]))  # several messages in one datagram
    put("control", struct.pack("=IHHII", 20, 1, 5, 1, 0) + struct.pack("=I", 0xFF))  # the group join (NLMSG_NOOP)
    return len(got)


def batch_seeds():
    with open(os.path.join(ROOT, "tests", "e2e", "test_batch_golden.py")) as f:
        src = f.read()
    key = "0x0102030405060708090a0b0c0d0e0f1011121314"
    net = "link add eth0 type dummy\nlink set eth0 up\naddr add 192.0.2.1/24 dev eth0\n" \
          "route add 10.0.2.0/24 dev eth0 via 192.0.2.2\n"
    n = 0
    for m in re.finditer(r'batch\(tmp_path, xfrm, (NET \+ )?f?"""\\?\n?(.*?)"""', src, re.S):
        text = m.group(2).replace("{KEY}", key).replace("{'ab' * 32}", "ab" * 32)
        text = re.sub(r"\{[^}]*\}", "1", text)
        text = "\n".join(line.strip() for line in text.splitlines()) + "\n"
        put("batch", ((net if m.group(1) else "") + text).encode())
        n += 1
    put("batch", b"state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 1 aead 'rfc4106(gcm(aes))' \\\n"
                 b"  " + key.encode() + b" 128 # comment\nmonitor\nclock advance 5\nstat\nlink show -s\n")
    return n


def pcap_seeds():
    pkts = [ip4("192.0.2.1", "192.0.2.2", 17, udp(b"hello")), ip6("2001:db8::1", "2001:db8::2", 59, b"")]

    def pcap(magic_le, link, frames, big=False):
        e = ">" if big else "<"
        out = struct.pack(e + "IHHiIII", magic_le, 2, 4, 0, 0, 65535, link)
        for i, fr in enumerate(frames):
            out += struct.pack(e + "IIII", 1700000000 + i, 0, len(fr), len(fr)) + fr
        return out

    eth = [b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + pkts[0],
           b"\x02" * 6 + b"\x04" * 6 + b"\x81\x00\x00\x05\x86\xdd" + pkts[1],
           b"\x02" * 6 + b"\x04" * 6 + b"\x08\x06" + bytes(28)]
    put("pcap", pcap(0xA1B2C3D4, 101, pkts))
    put("pcap", pcap(0xA1B2C3D4, 101, pkts, big=True))
    put("pcap", pcap(0xA1B23C4D, 1, eth))
    put("pcap", pcap(0xA1B2C3D4, 228, pkts[:1]))
    put("pcap", pcap(0xA1B2C3D4, 229, pkts[1:]))


def replay_seeds():
    for size_byte in range(14):  # every edge size, ESN off and on, each start
        for flags in (0, 1, 2, 3, 7):
            steps = b"".join(bytes([op, 0, d]) for op, d in [(0, 1), (0, 3), (0, 2), (7, 0), (3, 0), (5, 1), (0, 1)])
            put("replay", bytes([0x80, size_byte, flags, 1, 2]) + steps)


def input_run_seeds():
    """Records of fuzz-input-runs: runs of valid packets per SA, replays, other SAs and refused flows between."""
    def valid(sa, seq, s=1, d=1, n=30, outside=False):
        return bytes([0x80 | sa, seq - 1, s | (0x80 if outside else 0), d, n])

    def nested(sa, seq, inner_seq, damaged=False):
        return bytes([0xc0 | sa, seq - 1, 1, 1, 30, (inner_seq - 1) | (0x80 if damaged else 0)])
    for sa in range(15):  # every fixture SA: a run, then the run broken by a replay and another SA
        put("input-runs", b"".join(valid(sa, q) for q in range(1, 21)))
        put("input-runs", b"".join([valid(sa, 1), valid(sa, 2), valid(sa, 2), valid(sa, 3), valid((sa + 1) % 15, 1),
                                    valid(sa, 4), valid(sa, 5, outside=True), valid(sa, 6, d=9), valid(sa, 7)]))
    for sa in range(15):  # a nested layer through the same SA, checked before the next outer packet opens
        put("input-runs", valid(sa, 1) + nested(sa, 3, 2, damaged=True) + valid(sa, 64) + valid(sa, 64) +
            nested(sa, 65, 66) + valid(sa, 67))
    raw = ip4("192.0.2.1", "192.0.2.2", 50, bytes([0, 0, 0x10, 1, 0, 0, 0, 9]) + bytes(40))
    put("input-runs", valid(0, 1) + valid(0, 2) + bytes([0, len(raw)]) + raw + valid(0, 3) + valid(0, 4) +
        bytes([0x40, 4, 6]) + bytes([1, 2, 3, 4, 2, 4]) + valid(0, 6))


def reassembly_seeds():
    """Records of fuzz-reassembly: a bound, then 8-byte fragment descriptions."""
    def frag(d, offset_units, length, more, df=False, bad=False, pad=False, options=0, ecn=0, wait=0):
        b0 = (d - 1) | (4 if more else 0) | (8 if df else 0) | (0x10 if bad else 0) | (0x20 if pad else 0)
        return bytes([b0, offset_units >> 8, offset_units & 0xFF, length >> 8, length & 0xFF, options, ecn, wait])

    def cut(d, total, chunk, options=0):
        out, off = [], 0
        while off < total:
            n = min(chunk, total - off)
            out.append(frag(d, off // 8, n, off + n < total, options=options if off == 0 else 0))
            off += n
        return out
    one, two = cut(1, 1500, 552), cut(2, 3000, 1480, options=2)
    put("reassembly", bytes([40]) + b"".join(one))
    put("reassembly", bytes([40]) + b"".join(reversed(two)) + b"".join(one))
    put("reassembly", bytes([40]) + one[0] + one[0] + one[1] + frag(1, 68, 16, True) + one[2])  # duplicate, overlap
    put("reassembly", bytes([3]) + b"".join(one) + b"".join(two))  # more than the bound holds
    put("reassembly", bytes([40]) + one[0] + frag(1, 69, 552, True, pad=True) + frag(1, 138, 396, False, ecn=3))
    put("reassembly", bytes([40]) + one[0] + frag(1, 69, 552, True, bad=True) + one[1] + one[2])
    put("reassembly", bytes([40]) + one[0] + frag(1, 69, 552, True, wait=31) + one[2])  # the first times out
    # IPv6 (bound byte bit 6): in the 8-byte records DF means a Hop-by-Hop header, a bad header a payload length past
    # the packet; offset 0 without More Fragments is an atomic fragment (RFC 6946).
    v6 = 40 | 0x40
    put("reassembly", bytes([v6]) + b"".join(one) + b"".join(reversed(cut(2, 3000, 1232))))
    put("reassembly", bytes([v6]) + frag(1, 0, 552, True, df=True) + b"".join(one[1:]) + frag(3, 0, 100, False))
    put("reassembly", bytes([v6]) + one[0] + frag(1, 68, 16, True) + one[1] + frag(2, 0, 100, True, bad=True)
        + frag(4, 0, 13, True) + frag(1, 69, 552, True, wait=39) + frag(1, 69, 552, True, wait=39, ecn=3))


def main():
    xfrm = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, ".build", "debug", "xfrm")
    esp_seeds()
    daemon_seeds()
    got = control_seeds(xfrm)
    if got < 10:
        sys.exit(f"make-corpus: only {got} control datagrams captured from {xfrm}")
    batch_seeds()
    pcap_seeds()
    replay_seeds()
    input_run_seeds()
    reassembly_seeds()
    for t in sorted(os.listdir(OUT)):
        files = os.listdir(os.path.join(OUT, t))
        size = sum(os.path.getsize(os.path.join(OUT, t, f)) for f in files)
        print(f"{t}: {len(files)} files, {size} bytes")


if __name__ == "__main__":
    main()
