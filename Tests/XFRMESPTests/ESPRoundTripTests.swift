import Testing
import XFRMCrypto
import XFRMESP
import XFRMPacket
import XFRMTestKit

/// Self round trips check the plumbing of every mode, family and algorithm; interoperability itself is proven
/// against scapy and tshark in tests/interop.
enum Suites {
    static func crypto(_ name: String) -> ESPCryptoSpec {
        switch name {
        case "gcm128": try! .aead(name: "rfc4106(gcm(aes))", key: PacketFactory.pattern(20), icvBits: 128)
        case "gcm256-8": try! .aead(name: "rfc4106(gcm(aes))", key: PacketFactory.pattern(36), icvBits: 64)
        case "gcm192-12": try! .aead(name: "rfc4106(gcm(aes))", key: PacketFactory.pattern(28), icvBits: 96)
        case "chacha": try! .aead(name: "rfc7539esp(chacha20,poly1305)", key: PacketFactory.pattern(36), icvBits: 128)
        case "gmac": try! .aead(name: "rfc4543(gcm(aes))", key: PacketFactory.pattern(20), icvBits: 128)
        case "cbc-sha1":
            try! .cipher(name: "cbc(aes)", key: PacketFactory.pattern(16), authName: "hmac(sha1)",
                         authKey: PacketFactory.pattern(20, seed: 9), truncationBits: 96)
        case "cbc-sha256":
            try! .cipher(name: "cbc(aes)", key: PacketFactory.pattern(32), authName: "hmac(sha256)",
                         authKey: PacketFactory.pattern(32, seed: 9), truncationBits: 128)
        case "cbc-sha384":
            try! .cipher(name: "aes", key: PacketFactory.pattern(24), authName: "sha384",
                         authKey: PacketFactory.pattern(48, seed: 9), truncationBits: 192)
        case "cbc-sha512":
            try! .cipher(name: "cbc(aes)", key: PacketFactory.pattern(16), authName: "hmac(sha512)",
                         authKey: PacketFactory.pattern(64, seed: 9), truncationBits: 256)
        default:
            try! .cipher(name: "ecb(cipher_null)", key: [], authName: "hmac(sha256)",
                         authKey: PacketFactory.pattern(32, seed: 9), truncationBits: 128)
        }
    }
    static let all = ["gcm128", "gcm256-8", "gcm192-12", "chacha", "gmac", "cbc-sha1", "cbc-sha256", "cbc-sha384",
                      "cbc-sha512", "null-sha256"]
}

func pair(_ config: ESPConfig) throws -> (ESPTransform, ESPTransform) {
    (try ESPTransform(config), try ESPTransform(config))
}

@Suite("ESP round trips and output rules")
struct ESPRoundTripTests {
    let buffers = TestBuffers()

    @Test("IPv4 outer header: DF from an inner IPv4 packet, for an inner IPv6 one only above 1,280 bytes (small_ipv6); identification 0 under DF, the SA's counter without it (ip_select_ident)")
    func outerDFAndIdentification() throws {
        let tx = try ESPTransform(ESPConfig(spi: 0x1234, mode: .tunnel, crypto: Suites.crypto("gcm128"),
                                            tunnelSource: IPAddress("192.0.2.1"),
                                            tunnelDestination: IPAddress("192.0.2.2")))
        func outer(_ inner: [UInt8]) -> (df: Bool, id: UInt16) {
            let (r, w) = buffers.with(inner) { tx.encapsulate(&$0) }
            #expect(r == nil)
            #expect(InternetChecksum.compute(Array(w[0..<20])) == 0, "outer header checksum")
            return (w[6] & 0x40 != 0, UInt16(w[4]) << 8 | UInt16(w[5]))
        }
        let df4 = outer(PacketFactory.ipv4(dontFragment: true, payload: PacketFactory.pattern(100)))
        #expect(df4.df && df4.id == 0)
        let frag1 = outer(PacketFactory.ipv4(dontFragment: false, payload: PacketFactory.pattern(100)))
        let frag2 = outer(PacketFactory.ipv4(dontFragment: false, payload: PacketFactory.pattern(100)))
        #expect(!frag1.df && !frag2.df && frag1.id != 0 && frag2.id == frag1.id &+ 1)
        let small6 = outer(PacketFactory.ipv6(payload: PacketFactory.pattern(1280 - 40)))  // 1,280 bytes in all
        #expect(!small6.df && small6.id == frag2.id &+ 1)
        let large6 = outer(PacketFactory.ipv6(payload: PacketFactory.pattern(1281 - 40)))
        #expect(large6.df && large6.id == 0)
    }

    @Test("every algorithm, mode, family and NAT-T setting round-trips", arguments: Suites.all)
    func roundTrip(_ suite: String) throws {
        let inners = [
            PacketFactory.ipv4(payload: PacketFactory.udp(payload: PacketFactory.pattern(33))),
            PacketFactory.ipv6(payload: PacketFactory.udp(payload: PacketFactory.pattern(70))),
        ]
        for mode in [ESPMode.tunnel, .transport] {
            for outer in ["192.0.2.1", "2001:db8::1"] {
                for natt in [false, true] {
                    for esn in [false, true] {
                        let dst = outer.contains(":") ? "2001:db8::2" : "192.0.2.2"
                        let (tx, rx) = try pair(ESPConfig(
                            spi: 0x1234, mode: mode, crypto: Suites.crypto(suite), tunnelSource: IPAddress(outer),
                            tunnelDestination: IPAddress(dst), encapsulation: natt ? NATTEncapsulation() : nil,
                            esn: esn, outboundSequence: esn ? 0x7_ffff_fffe : 0,
                            inboundSequence: esn ? 0x7_ffff_fff0 : 0))
                        for inner in inners {
                            let (r, wire) = buffers.with(inner) { tx.encapsulate(&$0) }
                            #expect(r == nil)
                            let (result, back) = buffers.with(wire) { rx.decapsulate(&$0) }
                            #expect(result == .delivered, "\(suite) \(mode) \(outer) natt=\(natt) esn=\(esn)")
                            #expect(back == inner, "\(suite) \(mode) \(outer) natt=\(natt) esn=\(esn)")
                        }
                    }
                }
            }
        }
    }

    @Test("padding aligns payload + trailer to the cipher block (4 for AEADs, 16 for CBC)", arguments: [
        ("gcm128", 4), ("cbc-sha256", 16), ("null-sha256", 4),
    ])
    func padding(_ suite: String, block: Int) throws {
        let tx = try ESPTransform(ESPConfig(
            spi: 0x1000, mode: .tunnel, crypto: Suites.crypto(suite), tunnelSource: IPAddress("192.0.2.1"),
            tunnelDestination: IPAddress("192.0.2.2")))
        for size in 28..<(28 + 2 * block) {
            let inner = PacketFactory.ipv4(payload: PacketFactory.udp(payload: PacketFactory.pattern(size - 28)))
            let (_, wire) = buffers.with(inner) { tx.encapsulate(&$0) }
            let crypt = wire.count - 20 - 8 - tx.cipher.ivLength - tx.cipher.icvLength
            #expect(crypt % block == 0)
            #expect(crypt - size - 2 < block && crypt - size - 2 >= 0)
        }
    }

    @Test("an IPv6 outer header takes an IPv6 inner packet's flow label, 0 for an IPv4 one (xfrm6_tunnel_encap_add)")
    func outerFlowLabel() throws {
        let tx = try ESPTransform(ESPConfig(
            spi: 0x1000, mode: .tunnel, crypto: Suites.crypto("gcm128"), tunnelSource: IPAddress("2001:db8::1"),
            tunnelDestination: IPAddress("2001:db8::2")))
        var inner6 = PacketFactory.ipv6(trafficClass: 0x28, payload: PacketFactory.udp(payload: [1, 2, 3, 4]))
        inner6[1] |= 0x01  // flow label 0x12345
        inner6[2] = 0x23
        inner6[3] = 0x45
        let (_, wire6) = buffers.with(inner6) { tx.encapsulate(&$0) }
        #expect(UInt32(wire6[1] & 0x0f) << 16 | UInt32(wire6[2]) << 8 | UInt32(wire6[3]) == 0x12345)
        #expect((wire6[0] & 0x0f) << 4 | wire6[1] >> 4 == 0x28, "the traffic class stays the inner one's DSCP")
        let (_, wire4) = buffers.with(PacketFactory.ipv4(payload: PacketFactory.udp(payload: [1, 2, 3, 4]))) {
            tx.encapsulate(&$0)
        }
        #expect(wire4[1] & 0x0f == 0 && wire4[2] == 0 && wire4[3] == 0)
    }

    @Test("the wire carries only the low 32 bits of an extended sequence number")
    func esnHighBitsNeverOnWire() throws {
        let (tx, rx) = try pair(ESPConfig(
            spi: 0x2000, mode: .tunnel, crypto: Suites.crypto("gcm128"), tunnelSource: IPAddress("192.0.2.1"),
            tunnelDestination: IPAddress("192.0.2.2"), esn: true, outboundSequence: 0x5_0000_0009,
            inboundSequence: 0x5_0000_0000))
        let inner = PacketFactory.ipv4(payload: [1, 2, 3, 4])
        let (_, wire) = buffers.with(inner) { tx.encapsulate(&$0) }
        #expect(Array(wire[20..<28]) == [0, 0, 0x20, 0, 0, 0, 0, 0x0a])
        #expect(wire.count == 20 + 8 + 8 + 24 + 2 + 2 + 16)
        let (result, _) = buffers.with(wire) { rx.decapsulate(&$0) }
        #expect(result == .delivered)
        #expect(rx.replay.top == 0x5_0000_000a)
    }

    @Test("without ESN the SA refuses to send after sequence number 2^32 - 1")
    func sequenceOverflow32() throws {
        let tx = try ESPTransform(ESPConfig(
            spi: 0x3000, mode: .tunnel, crypto: Suites.crypto("gcm128"), tunnelSource: IPAddress("192.0.2.1"),
            tunnelDestination: IPAddress("192.0.2.2"), outboundSequence: 0xffff_fffe))
        let inner = PacketFactory.ipv4(payload: [1])
        #expect(buffers.with(inner) { tx.encapsulate(&$0) }.0 == nil)
        #expect(tx.outboundSequence == 0xffff_ffff)
        #expect(buffers.with(inner) { tx.encapsulate(&$0) }.0 == .sequenceOverflow)
        #expect(buffers.with(inner) { tx.encapsulate(&$0) }.0 == .sequenceOverflow)
        #expect(tx.outboundSequence == 0xffff_ffff)
    }

    @Test("with ESN the SA crosses 2^32 and refuses only at 2^64")
    func sequenceOverflow64() throws {
        let tx = try ESPTransform(ESPConfig(
            spi: 0x3000, mode: .tunnel, crypto: Suites.crypto("gcm128"), tunnelSource: IPAddress("192.0.2.1"),
            tunnelDestination: IPAddress("192.0.2.2"), esn: true, outboundSequence: 0xffff_ffff))
        let inner = PacketFactory.ipv4(payload: [1])
        #expect(buffers.with(inner) { tx.encapsulate(&$0) }.0 == nil)
        #expect(tx.outboundSequence == 0x1_0000_0000)
        tx.setOutboundSequence(.max - 1)
        #expect(buffers.with(inner) { tx.encapsulate(&$0) }.0 == nil)
        #expect(buffers.with(inner) { tx.encapsulate(&$0) }.0 == .sequenceOverflow)
    }

    @Test("oseq-may-wrap lets a non-AEAD SA wrap, with a fresh IV, and is refused for AEADs and ESN")
    func mayWrap() throws {
        let tx = try ESPTransform(ESPConfig(
            spi: 0x3000, mode: .tunnel, crypto: Suites.crypto("cbc-sha256"), tunnelSource: IPAddress("192.0.2.1"),
            tunnelDestination: IPAddress("192.0.2.2"), flags: .outboundSequenceMayWrap, outboundSequence: 0xffff_ffff))
        let inner = PacketFactory.ipv4(payload: [1])
        let (r1, w1) = buffers.with(inner) { tx.encapsulate(&$0) }
        let (r2, w2) = buffers.with(inner) { tx.encapsulate(&$0) }
        #expect(r1 == nil && r2 == nil)
        #expect(Array(w1[24..<28]) == [0, 0, 0, 0])
        #expect(Array(w2[24..<28]) == [0, 0, 0, 1])
        #expect(Array(w1[28..<44]) != Array(w2[28..<44]), "IVs must differ across the wrap")
        #expect(throws: ESPConfigError.self) {
            try ESPTransform(ESPConfig(
                spi: 0x3000, mode: .tunnel, crypto: Suites.crypto("gcm128"), tunnelSource: IPAddress("192.0.2.1"),
                tunnelDestination: IPAddress("192.0.2.2"), flags: .outboundSequenceMayWrap))
        }
        #expect(throws: ESPConfigError.self) {
            try ESPTransform(ESPConfig(
                spi: 0x3000, mode: .tunnel, crypto: Suites.crypto("cbc-sha256"), tunnelSource: IPAddress("192.0.2.1"),
                tunnelDestination: IPAddress("192.0.2.2"), esn: true, flags: .outboundSequenceMayWrap))
        }
    }

    @Test("AEAD IVs are the sequence number under a per-SA salt (≈ seqiv), also across reinstalls; CBC IVs are unpredictable and distinct")
    func ivs() throws {
        let config = ESPConfig(
            spi: 0x1000, mode: .tunnel, crypto: Suites.crypto("gcm128"), tunnelSource: IPAddress("192.0.2.1"),
            tunnelDestination: IPAddress("192.0.2.2"))
        let gcm = try ESPTransform(config)
        let inner = PacketFactory.ipv4(payload: [1])
        func iv(_ t: ESPTransform) -> UInt64 {
            let (_, w) = buffers.with(inner) { t.encapsulate(&$0) }
            return w[28..<36].reduce(0) { $0 << 8 | UInt64($1) }
        }
        let first = iv(gcm)
        #expect(iv(gcm) ^ 2 == first ^ 1, "IV XOR sequence number is the SA's constant salt")
        let reinstalled = try ESPTransform(config)
        #expect(iv(reinstalled) != first, "the same key and starting sequence number give another nonce")
        let cbc = try ESPTransform(ESPConfig(
            spi: 0x1000, mode: .tunnel, crypto: Suites.crypto("cbc-sha256"), tunnelSource: IPAddress("192.0.2.1"),
            tunnelDestination: IPAddress("192.0.2.2")))
        var seen = Set<[UInt8]>()
        for _ in 0..<200 {
            let (_, w) = buffers.with(inner) { cbc.encapsulate(&$0) }
            seen.insert(Array(w[28..<44]))
        }
        #expect(seen.count == 200)
        #expect(!seen.contains([UInt8](repeating: 0, count: 12) + [0, 0, 0, 1]))
    }

    @Test("tunnel outer header copies DSCP and ECN (CE as ECT(0)) and DF; flags turn each off")
    func outerHeader() throws {
        let inner = PacketFactory.ipv4(tos: 0xbb, dontFragment: true, payload: [1, 2])  // DSCP 0x2e, ECN CE
        func outer(_ flags: ESPFlags) throws -> [UInt8] {
            let tx = try ESPTransform(ESPConfig(
                spi: 0x1000, mode: .tunnel, crypto: Suites.crypto("gcm128"), tunnelSource: IPAddress("192.0.2.1"),
                tunnelDestination: IPAddress("192.0.2.2"), flags: flags))
            return buffers.with(inner) { tx.encapsulate(&$0) }.1
        }
        let plain = try outer([])
        #expect(plain[1] == 0xba)
        #expect(plain[6] & 0x40 == 0x40)
        #expect(InternetChecksum.compute(Array(plain[0..<20])) == 0)
        #expect(try outer(.noECN)[1] == 0xb8)
        #expect(try outer(.dontEncapDSCP)[1] == 0x02)
        #expect(try outer(.noPMTUDiscovery)[6] & 0x40 == 0)
    }

    @Test("tunnel decap copies an outer CE mark to an ECN-capable inner packet")
    func ecnDecap() throws {
        let (tx, rx) = try pair(ESPConfig(
            spi: 0x1000, mode: .tunnel, crypto: Suites.crypto("gcm128"), tunnelSource: IPAddress("192.0.2.1"),
            tunnelDestination: IPAddress("192.0.2.2")))
        let inner = PacketFactory.ipv4(tos: 0x01, payload: [1, 2])  // ECT(1)
        var (_, wire) = buffers.with(inner) { tx.encapsulate(&$0) }
        wire[1] |= 0x03  // a router marks CE on the outer header
        wire[10] = 0
        wire[11] = 0
        let c = InternetChecksum.compute(Array(wire[0..<20]))
        wire[10] = UInt8(c >> 8)
        wire[11] = UInt8(c & 0xff)
        let (r, out) = buffers.with(wire) { rx.decapsulate(&$0) }
        #expect(r == .delivered)
        #expect(out[1] & 0x03 == 0x03)
        #expect(InternetChecksum.compute(Array(out[0..<20])) == 0)
    }

    @Test("IPv6 transport mode inserts ESP after hop-by-hop and routing headers and restores them")
    func ipv6ExtensionHeaders() throws {
        let hbh: [UInt8] = [43, 0, 1, 4, 0, 0, 0, 0]  // next: routing
        let routing: [UInt8] = [17, 0, 0, 0, 0, 0, 0, 0]  // next: UDP, type 0 segments left 0
        let inner = PacketFactory.ipv6(
            extensionHeaders: hbh + routing, firstNextHeader: 0, payload: PacketFactory.udp(payload: [9, 9, 9]))
        let (tx, rx) = try pair(ESPConfig(spi: 0x1000, mode: .transport, crypto: Suites.crypto("gcm128")))
        let (r, wire) = buffers.with(inner) { tx.encapsulate(&$0) }
        #expect(r == nil)
        #expect(wire[6] == 0)  // hop-by-hop still first
        #expect(wire[40 + 8] == 50)  // routing header's next header is ESP
        #expect(Array(wire[56..<60]) == [0, 0, 0x10, 0])
        let (result, back) = buffers.with(wire) { rx.decapsulate(&$0) }
        #expect(result == .delivered)
        #expect(back == inner)
    }

    @Test("TFC dummy packets (next header 59) are authenticated, counted and discarded")
    func tfcDummy() throws {
        let (tx, rx) = try pair(ESPConfig(spi: 0x1000, mode: .transport, crypto: Suites.crypto("gcm128")))
        let dummy = PacketFactory.ipv4(proto: 59, payload: [0, 0, 0, 0])
        let (_, wire) = buffers.with(dummy) { tx.encapsulate(&$0) }
        let (r, _) = buffers.with(wire) { rx.decapsulate(&$0) }
        #expect(r == .dropped(.tfcDummy))
        #expect(rx.replay.top == 1)
    }

    @Test("NAT-T: keepalives and IKE (non-ESP marker) are told apart from ESP; raw ESP to a UDP SA mismatches")
    func nattDemux() throws {
        let rx = try ESPTransform(ESPConfig(
            spi: 0x1000, mode: .tunnel, crypto: Suites.crypto("gcm128"), tunnelSource: IPAddress("192.0.2.1"),
            tunnelDestination: IPAddress("192.0.2.2"), encapsulation: NATTEncapsulation()))
        let keepalive = PacketFactory.ipv4(proto: 17, payload: PacketFactory.udp(
            sourcePort: 4500, destinationPort: 4500, payload: [0xff]))
        #expect(buffers.with(keepalive) { rx.decapsulate(&$0) }.0 == .dropped(.nattKeepalive))
        let ike = PacketFactory.ipv4(proto: 17, payload: PacketFactory.udp(
            sourcePort: 4500, destinationPort: 4500, payload: [0, 0, 0, 0] + PacketFactory.pattern(40)))
        #expect(buffers.with(ike) { rx.decapsulate(&$0) }.0 == .ike)
        let other = PacketFactory.ipv4(proto: 17, payload: PacketFactory.udp(destinationPort: 53, payload: [1]))
        #expect(buffers.with(other) { rx.decapsulate(&$0) }.0 == .notESP)
        let raw = PacketFactory.ipv4(proto: 50, payload: [0, 0, 0x10, 0, 0, 0, 0, 1] + PacketFactory.pattern(40))
        #expect(buffers.with(raw) { rx.decapsulate(&$0) }.0 == .dropped(.encapsulationMismatch))
    }

    @Test("NAT-T transport mode: a NAT rewrote the source, the TCP or UDP checksum is recomputed over the arriving addresses; UDP without one keeps none; tunnel mode and plain transport untouched", arguments: [6, 17, 170])
    func nattTransportChecksum(proto: Int) throws {
        // The sender's view: 10.0.0.1 (private) to 192.0.2.2; its TCP/UDP checksum covers 10.0.0.1.
        let config = ESPConfig(spi: 0x1000, mode: .transport, crypto: Suites.crypto("gcm128"),
                               encapsulation: NATTEncapsulation())
        let (tx, rx) = try pair(config)
        var l4: [UInt8] = proto == 6
            ? [0x9c, 0x40, 0x01, 0xbb] + [0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0x10, 0, 0, 0, 0, 0] + PacketFactory.pattern(33)
            : PacketFactory.udp(sourcePort: 40000, destinationPort: 53, payload: PacketFactory.pattern(33))
        let field = proto == 6 ? 16 : 6
        func checksum(_ src: String, _ l4: [UInt8]) -> UInt16 {
            var pseudo = IPAddress(src)!.bytes + IPAddress("192.0.2.2")!.bytes + [0, UInt8(proto)]
            pseudo += [UInt8(l4.count >> 8), UInt8(l4.count & 0xff)]
            var z = l4
            z[field] = 0
            z[field + 1] = 0
            return InternetChecksum.compute(pseudo + z)
        }
        let c = checksum("10.0.0.1", l4)
        l4[field] = UInt8(c >> 8)
        l4[field + 1] = UInt8(c & 0xff)
        let sent = PacketFactory.ipv4(source: "10.0.0.1", destination: "192.0.2.2", proto: UInt8(proto), payload: l4)
        // The NAT: source 10.0.0.1 → 198.51.100.7 (and the IPv4 header checksum; ESP-in-UDP carries UDP checksum 0).
        func natted(_ packet: [UInt8]) -> [UInt8] {
            var (r, wire) = buffers.with(packet) { tx.encapsulate(&$0) }
            #expect(r == nil)
            wire.replaceSubrange(12..<16, with: IPAddress("198.51.100.7")!.bytes)
            (wire[10], wire[11]) = (0, 0)
            let hc = InternetChecksum.compute(Array(wire[0..<20]))
            (wire[10], wire[11]) = (UInt8(hc >> 8), UInt8(hc & 0xff))
            r = nil
            return wire
        }
        let (d, inner) = buffers.with(natted(sent)) { rx.decapsulate(&$0) }
        #expect(d == .delivered)
        let got = Array(inner[20...])
        if proto == 170 {
            #expect(got == l4, "neither TCP nor UDP: the bytes are the sender's")
        } else {
            #expect(Array(got[0..<field] + got[(field + 2)...]) == Array(l4[0..<field] + l4[(field + 2)...]))
            #expect(UInt16(got[field]) << 8 | UInt16(got[field + 1]) == checksum("198.51.100.7", got),
                    "the checksum verifies with the address the packet arrived from")
        }
        if proto == 17 {  // a UDP datagram sent without a checksum keeps none
            var none = l4
            none[6] = 0
            none[7] = 0
            let (d2, i2) = buffers.with(natted(PacketFactory.ipv4(source: "10.0.0.1", destination: "192.0.2.2",
                                                                   proto: 17, payload: none))) { rx.decapsulate(&$0) }
            #expect(d2 == .delivered && i2[26] == 0 && i2[27] == 0)
        }
        if proto == 17 {  // a sender's TFC padding after the datagram: the checksum covers the UDP length only
            var padded = l4
            let pc = checksum("10.0.0.1", padded)
            (padded[6], padded[7]) = (UInt8(pc >> 8), UInt8(pc & 0xff))
            padded += [0, 0, 0, 0]
            let (d3, i3) = buffers.with(natted(PacketFactory.ipv4(source: "10.0.0.1", destination: "192.0.2.2",
                                                                   proto: 17, payload: padded))) { rx.decapsulate(&$0) }
            #expect(d3 == .delivered)
            let datagram = Array(i3[20..<(20 + l4.count)])
            #expect(UInt16(datagram[6]) << 8 | UInt16(datagram[7]) == checksum("198.51.100.7", datagram))
            #expect(Array(i3[(20 + l4.count)...]) == [0, 0, 0, 0])
        }
        // Without NAT-T the transport payload is the sender's, byte for byte (nothing is recomputed).
        let (ptx, prx) = try pair(ESPConfig(spi: 0x1000, mode: .transport, crypto: Suites.crypto("gcm128")))
        let (_, pw) = buffers.with(sent) { ptx.encapsulate(&$0) }
        let (_, pin) = buffers.with(pw) { prx.decapsulate(&$0) }
        #expect(Array(pin[20...]) == l4)
    }

    @Test("a packet too large for the headroom or for the IP length is refused, not corrupted")
    func noRoom() throws {
        let tx = try ESPTransform(ESPConfig(
            spi: 0x1000, mode: .tunnel, crypto: Suites.crypto("gcm128"), tunnelSource: IPAddress("192.0.2.1"),
            tunnelDestination: IPAddress("192.0.2.2")))
        let small = TestBuffers(slotSize: 4096, headroom: 20)
        let inner = PacketFactory.ipv4(payload: [1, 2, 3])
        #expect(small.with(inner) { tx.encapsulate(&$0) }.0 == .noBufferSpace)
        let big = TestBuffers(slotSize: 70_000, headroom: 256)
        let huge = PacketFactory.ipv4(payload: PacketFactory.pattern(65_500))
        #expect(big.with(huge) { tx.encapsulate(&$0) }.0 == .noBufferSpace)
        #expect(tx.outboundSequence == 0, "refused packets consume no sequence number")
    }
}
