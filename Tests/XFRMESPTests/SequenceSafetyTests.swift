import Testing
import XFRMCrypto
import XFRMESP
import XFRMPacket
import XFRMTestKit

/// Sequence numbers, restored replay state, IV uniqueness and spec validation: the edges where nonces repeat or
/// windows lie.
@Suite("Sequence, replay-state and IV safety")
struct SequenceSafetyTests {
    let buffers = TestBuffers()

    @Test("advance terminates and records sequence 2^64 − 1", .timeLimit(.minutes(1)))
    func advanceToMax() {
        var w = ReplayWindow(size: 64, esn: true, top: .max - 10)
        w.advance(.max)
        #expect(w.top == .max)
        #expect(w.check(UInt32.max) == .reject(.replayDuplicate))
        var v = ReplayWindow(size: 4096, esn: true, top: .max - 4000)
        v.advance(.max - 3000)
        v.advance(.max)
        #expect(v.top == .max)
    }

    @Test("a legacy (XFRMA_REPLAY_VAL) bitmap is restored: bit i is top − i")
    func legacyBitmapRestored() {
        // top 100; received 100, 98, 69 (bit 31).
        let w = ReplayWindow(size: 32, esn: false, top: 100, bitmap: .legacy(1 << 0 | 1 << 2 | 1 << 31))
        #expect(w.check(100) == .reject(.replayDuplicate))
        #expect(w.check(98) == .reject(.replayDuplicate))
        #expect(w.check(69) == .reject(.replayDuplicate))
        #expect(w.check(99) == .accept(99))
        #expect(w.legacyBitmap == 1 << 0 | 1 << 2 | 1 << 31)
    }

    @Test("an ESN (XFRMA_REPLAY_ESN_VAL) ring bitmap is restored: sequence s is bit (s − 1) mod window")
    func ringBitmapRestored() {
        // window 64, top 0x1_0000_0010: received top and top − 40.
        let top: UInt64 = 0x1_0000_0010
        var words: [UInt32] = [0, 0]
        for s in [top, top - 40] {
            let pos = Int((UInt32(truncatingIfNeeded: s) &- 1) % 64)
            words[pos / 32] |= 1 << UInt32(pos % 32)
        }
        let w = ReplayWindow(size: 64, esn: true, top: top, bitmap: .ring(words))
        #expect(w.check(UInt32(truncatingIfNeeded: top - 40)) == .reject(.replayDuplicate))
        #expect(w.check(UInt32(truncatingIfNeeded: top - 39)) == .accept(top - 39))
        #expect(w.ringBitmap == words)
        // The kernel's own advance keeps the same layout: a window built by advancing lists the same words.
        var v = ReplayWindow(size: 64, esn: true, top: top - 41)
        v.advance(top - 40)
        v.advance(top)
        #expect(v.ringBitmap == words)
    }

    @Test("the ESN ring is laid out from the top, as the kernel's: a window of 100 across 2^32")
    func ringAcross2to32() {
        // top = 2^32 + 5: the kernel keeps the top at bit (5 − 1) mod 100 = 4 and 2^32 − 1 (6 below) at bit 98;
        // (low32(s) − 1) mod 100 would say 94, the bit of 2^32 − 5.
        let top: UInt64 = 0x1_0000_0005
        var words = [UInt32](repeating: 0, count: 4)
        words[98 / 32] |= 1 << UInt32(98 % 32)
        let w = ReplayWindow(size: 100, esn: true, top: top, bitmap: .ring(words))
        #expect(w.check(0xffff_ffff) == .reject(.replayDuplicate))
        #expect(w.check(0xffff_fffb) == .accept(0xffff_fffb))
        var v = ReplayWindow(size: 100, esn: true, top: 0xffff_fff0)
        v.advance(0xffff_ffff)
        v.advance(top)
        var expected = [UInt32](repeating: 0, count: 4)
        for bit in [98, 4] { expected[bit / 32] |= 1 << UInt32(bit % 32) }
        #expect(v.ringBitmap == expected)
    }

    @Test("the outbound counter never moves backwards through the public API")
    func counterForwardOnly() throws {
        let t = try ESPTransform(ESPConfig(spi: 1, mode: .transport, crypto: Suites.crypto("gcm128"),
                                           outboundSequence: 50))
        #expect(!t.setOutboundSequence(10))
        #expect(t.outboundSequence == 50)
        #expect(t.setOutboundSequence(60))
        #expect(t.outboundSequence == 60)
    }

    @Test("specs that bypass the factory functions are refused by ESPTransform and by the OpenSSL backend")
    func specValidated() {
        let bad: [(String, ESPCryptoSpec)] = [
            ("truncation 0", .cipher(.aesCBC, key: SecretKey(PacketFactory.pattern(16)), auth: .hmacSHA256,
                                     authKey: SecretKey(PacketFactory.pattern(32)), truncationBits: 0)),
            ("truncation beyond the digest", .cipher(.aesCBC, key: SecretKey(PacketFactory.pattern(16)),
                                                     auth: .hmacSHA1, authKey: SecretKey(PacketFactory.pattern(20)),
                                                     truncationBits: 256)),
            ("null cipher without integrity", .cipher(.null, key: SecretKey([]), auth: nil, authKey: nil,
                                                      truncationBits: 0)),
            ("AEAD ICV of 0 bits", .aead(.aesGCM, key: SecretKey(PacketFactory.pattern(20)), icvBits: 0)),
            ("short AEAD key", .aead(.aesGCM, key: SecretKey(PacketFactory.pattern(7)), icvBits: 128)),
        ]
        for (name, spec) in bad {
            #expect(throws: AlgorithmError.self, "\(name)") { _ = try OpenSSLBackend().makeCipher(spec) }
            #expect(throws: ESPConfigError.self, "\(name)") {
                _ = try ESPTransform(ESPConfig(spi: 1, mode: .transport, crypto: spec))
            }
        }
    }

    @Test("CBC: the same key installed twice with the same starting sequence writes different IVs (per-SA salt)")
    func cbcIVsDifferAcrossInstalls() throws {
        let config = ESPConfig(spi: 7, mode: .transport, crypto: Suites.crypto("cbc-sha256"))
        let first = try ESPTransform(config)
        let second = try ESPTransform(config)
        let pkt = PacketFactory.ipv4(payload: PacketFactory.udp(payload: PacketFactory.pattern(40)))
        let (r1, a) = self.buffers.with(pkt) { first.encapsulate(&$0) }
        let (r2, b) = self.buffers.with(pkt) { second.encapsulate(&$0) }
        #expect(r1 == nil && r2 == nil)
        #expect(Array(a[24..<28]) == Array(b[24..<28]), "same sequence number")
        #expect(Array(a[28..<44]) != Array(b[28..<44]), "different IVs")
        // Both still decrypt at a receiver with the same key (the salt is not needed to decrypt).
        let rx = try ESPTransform(ESPConfig(spi: 7, mode: .transport, crypto: Suites.crypto("cbc-sha256")))
        #expect(self.buffers.with(a) { rx.decapsulate(&$0) }.0 == .delivered)
    }

    @Test("NAT-T input: the ESP length comes from the UDP length; bytes behind the datagram are not ESP")
    func nattTrailingBytes() throws {
        let config = ESPConfig(spi: 9, mode: .tunnel, crypto: Suites.crypto("gcm128"),
                               tunnelSource: IPAddress("192.0.2.1"), tunnelDestination: IPAddress("192.0.2.2"),
                               encapsulation: NATTEncapsulation())
        let tx = try ESPTransform(config)
        let rx = try ESPTransform(config)
        let inner = PacketFactory.ipv4(payload: PacketFactory.udp(payload: PacketFactory.pattern(40)))
        var (_, wire) = self.buffers.with(inner) { tx.encapsulate(&$0) }
        wire += [1, 2, 3, 4, 5, 6, 7, 8]  // inside the IP packet, behind the UDP datagram
        wire[2] = UInt8(wire.count >> 8)
        wire[3] = UInt8(wire.count & 0xff)
        wire[10] = 0
        wire[11] = 0
        let sum = InternetChecksum.compute(Array(wire[0..<20]))
        wire[10] = UInt8(sum >> 8)
        wire[11] = UInt8(sum & 0xff)
        let (r, out) = self.buffers.with(wire) { rx.decapsulate(&$0) }
        #expect(r == .delivered)
        #expect(out == inner)
    }
}
