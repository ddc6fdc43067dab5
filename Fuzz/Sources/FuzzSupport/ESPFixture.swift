// A receiving host for the ESP input harnesses: one XFRMStack, configured once per process through the offline
// session's `ip xfrm` grammar, with inbound SAs of every algorithm the stack offers (AES-GCM 128/192/256 with each
// ICV length, ChaCha20-Poly1305, AES-GMAC, AES-CBC with HMAC-SHA-1/256/384/512, NULL with HMAC), tunnel and
// transport mode, IPv4 and IPv6 outer, ESP-in-UDP, ESN, windows 0, 32, 128 and 4096, and the IN/FWD policies
// that cover them; and an outbound SA and OUT policy per outer family for what the daemon's TUN side sends.
import XFRMCore
import XFRMCrypto
import XFRMESP
import XFRMOffline
import XFRMPacket

public final class ESPFixture {
    /// Built on first use (one per process: libFuzzer calls the harness many times in one process).
    public nonisolated(unsafe) static let shared = ESPFixture()

    public let session: OfflineSession
    public var stack: XFRMStack { self.session.stack }
    /// The interface the outer packets arrive on.
    public let ifindex: Int32
    /// The inbound SAs, in the order `lines` adds them.
    public let sas: [SecurityAssociation]

    static let key16 = "0x" + String(repeating: "11", count: 16)
    static let key20 = "0x" + String(repeating: "22", count: 20)
    static let key24 = "0x" + String(repeating: "33", count: 24)
    static let key28 = "0x" + String(repeating: "44", count: 28)
    static let key32 = "0x" + String(repeating: "55", count: 32)
    static let key36 = "0x" + String(repeating: "66", count: 36)
    static let key48 = "0x" + String(repeating: "77", count: 48)
    static let key64 = "0x" + String(repeating: "88", count: 64)

    /// The network (this host is 192.0.2.2 and 2001:db8:2::2 outside, 10.0.2.1 and 2001:db8:b::1 inside), then
    /// one SA per line from 192.0.2.1 / 2001:db8:1::1, then the policies.
    public static let lines: [String] = {
        let v4 = "src 192.0.2.1 dst 192.0.2.2 proto esp"
        let v6 = "src 2001:db8:1::1 dst 2001:db8:2::2 proto esp"
        let gcm = "aead rfc4106(gcm(aes))"
        let states = [
            "\(v4) spi 0x1001 mode tunnel \(gcm) \(key20) 128",
            "\(v4) spi 0x1002 mode tunnel \(gcm) \(key36) 64 replay-window 128 flag esn",
            "\(v4) spi 0x1003 mode tunnel \(gcm) \(key28) 96 replay-window 4096 flag esn encap espinudp 4500 4500 0.0.0.0",
            "\(v4) spi 0x1004 mode tunnel aead rfc7539esp(chacha20,poly1305) \(key36) 128 replay-window 64",
            "\(v4) spi 0x1005 mode tunnel aead rfc4543(gcm(aes)) \(key20) 128",
            "\(v4) spi 0x1006 mode tunnel enc cbc(aes) \(key16) auth-trunc hmac(sha1) \(key20) 96",
            "\(v4) spi 0x1007 mode tunnel enc cbc(aes) \(key32) auth-trunc hmac(sha256) \(key32) 128 replay-window 32 flag esn",
            "\(v4) spi 0x1008 mode tunnel enc cbc(aes) \(key24) auth-trunc hmac(sha384) \(key48) 192",
            "\(v4) spi 0x1009 mode tunnel enc cbc(aes) \(key16) auth-trunc hmac(sha512) \(key64) 256 encap espinudp 4500 4500 0.0.0.0",
            "\(v4) spi 0x100a mode tunnel enc ecb(cipher_null) \"\" auth-trunc hmac(sha256) \(key32) 128",
            "\(v4) spi 0x100b mode transport \(gcm) \(key20) 128",
            "\(v4) spi 0x100c mode tunnel \(gcm) \(key20) 128 replay-window 0",
            "\(v6) spi 0x100d mode tunnel \(gcm) \(key20) 128",
            "\(v6) spi 0x100e mode transport aead rfc7539esp(chacha20,poly1305) \(key36) 128",
            "\(v6) spi 0x100f mode tunnel enc cbc(aes) \(key16) auth-trunc hmac(sha256) \(key32) 128 encap espinudp 4500 4500 ::",
        ]
        let t4 = "tmpl src 192.0.2.1 dst 192.0.2.2 proto esp"
        let t6 = "tmpl src 2001:db8:1::1 dst 2001:db8:2::2 proto esp"
        return [
            "link add eth0 type dummy", "link set eth0 up",
            "addr add 192.0.2.2/24 dev eth0", "addr add 2001:db8:2::2/64 dev eth0",
            "link add lan0 type dummy", "link set lan0 up",
            "addr add 10.0.2.1/24 dev lan0", "addr add 2001:db8:b::1/64 dev lan0",
            "route add 10.0.1.0/24 dev eth0 via 192.0.2.1",
        ] + states.map { "xfrm state add \($0)" } + [
            "xfrm policy add src 10.0.1.0/24 dst 10.0.2.0/24 dir in \(t4) mode tunnel",
            "xfrm policy add src 10.0.1.0/24 dst 10.0.2.0/24 dir fwd \(t4) mode tunnel",
            "xfrm policy add src 2001:db8:a::/64 dst 2001:db8:b::/64 dir in \(t6) mode tunnel",
            "xfrm policy add src 192.0.2.1/32 dst 192.0.2.2/32 dir in \(t4) mode transport",
            "xfrm policy add src 2001:db8:1::1/128 dst 2001:db8:2::2/128 dir in \(t6) mode transport",
            // The way out (what the daemon's TUN side takes): one outbound SA per outer family.
            "xfrm state add src 192.0.2.2 dst 192.0.2.1 proto esp spi 0x2001 mode tunnel \(gcm) \(key20) 128",
            "xfrm state add src 2001:db8:2::2 dst 2001:db8:1::1 proto esp spi 0x2002 mode tunnel "
                + "aead rfc7539esp(chacha20,poly1305) \(key36) 128 encap espinudp 4500 4500 ::",
            "xfrm policy add src 10.0.2.0/24 dst 10.0.1.0/24 dir out "
                + "tmpl src 192.0.2.2 dst 192.0.2.1 proto esp mode tunnel",
            "xfrm policy add src 2001:db8:b::/64 dst 2001:db8:a::/64 dir out "
                + "tmpl src 2001:db8:2::2 dst 2001:db8:1::1 proto esp mode tunnel",
        ]
    }()

    public init() {
        self.session = OfflineSession()
        for line in Self.lines {
            do {
                _ = try self.session.run(OfflineSession.words(of: line))
            } catch {
                fatalError("fuzz fixture: \(line): \(error)")
            }
        }
        guard let eth0 = self.session.stack.network.interface(named: "eth0") else { fatalError("no eth0") }
        self.ifindex = eth0.index
        var sas: [SecurityAssociation] = []
        for spi in UInt32(0x1001)...0x100f {
            let dst = spi >= 0x100d ? IPAddress("2001:db8:2::2")! : IPAddress("192.0.2.2")!
            guard let sa = self.session.stack.states.lookup(SAID(destination: dst, spi: spi)) else {
                fatalError("fuzz fixture: no SA \(spi)")
            }
            sas.append(sa)
        }
        self.sas = sas
    }

    /// An ESP packet for `sa` as its peer would send it, around `plaintext` taken as the payload *and* trailer
    /// (padding, pad length, next header: whatever the fuzzer wrote), zero-filled to the cipher's block size,
    /// sealed with the SA's key so that it passes the ICV and reaches the trailer and inner-packet checks.
    public func seal(_ sa: SecurityAssociation, sequence: UInt64, plaintext: [UInt8], tos: UInt8) -> [UInt8] {
        guard let t = sa.transform else { return plaintext }
        let c = t.cipher
        let body = (plaintext.count + c.blockSize - 1) / c.blockSize * c.blockSize
        let udp = sa.encapsulation != nil ? 8 : 0
        let v4 = sa.id.destination.version == 4
        let ip = v4 ? 20 : 40
        let total = ip + udp + 8 + c.ivLength + body + c.icvLength
        var out = [UInt8](repeating: 0, count: total)
        out.withUnsafeMutableBytes { raw in
            let p = raw.baseAddress!
            let proto: UInt8 = udp != 0 ? 17 : 50
            switch (sa.config.source, sa.id.destination) {
            case (.v4(let s), .v4(let d)):
                IPv4Header.write(p, tos: tos, totalLength: total, identification: 1, flags: 0, ttl: 64, proto: proto,
                                 source: s, destination: d)
            case (let s, let d):
                IPv6Header.write(p, trafficClass: tos, flowLabel: 0, payloadLength: total - 40, nextHeader: proto,
                                 hopLimit: 64, source: s, destination: d)
            }
            if udp != 0 {
                p.storeBE16(4500, at: ip)
                p.storeBE16(4500, at: ip + 2)
                p.storeBE16(UInt16(truncatingIfNeeded: total - ip), at: ip + 4)
            }
            let esp = p + ip + udp
            esp.storeBE32(sa.id.spi, at: 0)
            esp.storeBE32(UInt32(truncatingIfNeeded: sequence), at: 4)
            c.writeIV(esp + 8, sequence: sequence)
            for (i, b) in plaintext.enumerated() { (esp + 8 + c.ivLength).storeByte(b, at: i) }
            _ = c.seal(esp: esp, cryptLength: body, esnHigh: sa.config.esn ? UInt32(truncatingIfNeeded: sequence >> 32) : nil)
            if !v4 && udp != 0 {
                let u = p + ip
                u.storeBE16(UDPHeader.checksum(u, length: total - ip, source: sa.config.source,
                                               destination: sa.id.destination), at: 6)
            }
        }
        return out
    }

    /// Runs `bytes` through the input path in a buffer of exactly headroom + packet + tailroom bytes, so that the
    /// address sanitizer sees any access beyond it.
    @discardableResult
    public func input(_ bytes: UnsafeRawBufferPointer) -> InputResult {
        Self.withExactBuffer(bytes) { self.stack.input(&$0, ifindex: self.ifindex) }
    }

    /// A packet buffer of its own allocation (not a pool slot: neighbouring slots would hide overruns from ASan).
    public static func withExactBuffer<R>(_ bytes: UnsafeRawBufferPointer, headroom: Int = 256, tailroom: Int = 256,
                                          _ body: (inout PacketBuffer) -> R) -> R {
        let capacity = headroom + bytes.count + tailroom
        let storage = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 64)
        defer { storage.deallocate() }
        var b = PacketBuffer(storage: storage, capacity: capacity, headroom: headroom)
        _ = b.append(bytes: bytes)
        return body(&b)
    }
}
