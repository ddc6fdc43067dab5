import Glibc
import Testing
import XFRMCrypto
import XFRMESP
import XFRMPacket
import XFRMTestKit

/// OpenSSL and ipsec-mb are two implementations nobody here wrote: with the same key, sequence number and IV they
/// must produce the same ESP packet byte for byte, and each must open the other's (the published vectors and the
/// scapy/tshark suites run with each backend too; this covers every algorithm, ICV length, ESN and size between).
@Suite("Crypto backends agree")
struct BackendAgreementTests {
    let buffers = TestBuffers()

    func transform(_ suite: String, backend: String, esn: Bool) throws -> ESPTransform {
        try ESPTransform(
            ESPConfig(
                spi: 0x4242, mode: .tunnel, crypto: Suites.crypto(suite), tunnelSource: IPAddress("192.0.2.1"),
                tunnelDestination: IPAddress("192.0.2.2"), esn: esn, replayWindow: 64,
                outboundSequence: esn ? 0x1_ffff_fff0 : 0x10, inboundSequence: esn ? 0x1_ffff_fff0 : 0x10),
            backend: CryptoBackends.named(backend)!)
    }

    @Test("ipsec-mb is available on this machine (AES-NI) and is the default backend")
    func available() {
        #expect(IPsecMBBackend.isAvailable, "\(IPsecMBBackend.description)")
        #expect(IPsecMBBackend.description.hasPrefix("ipsec-mb 1."))
        if getenv("XFRM_CRYPTO") == nil { #expect(CryptoBackends.preferred.name == "ipsec-mb") }
    }

    @Test("same bytes on the wire, and each opens the other's, for every algorithm, ESN and size",
          arguments: Suites.all)
    func agree(_ suite: String) throws {
        for esn in [false, true] {
            let ossl = try transform(suite, backend: "openssl", esn: esn)
            let mb = try transform(suite, backend: "ipsec-mb", esn: esn)
            if suite != "null-sha256" { #expect(mb.cipher.backendName == "ipsec-mb") }
            let iv = PacketFactory.pattern(ossl.cipher.ivLength, seed: 77)
            for size in [1, 15, 16, 17, 63, 64, 255, 1000, 1400] {
                let inner = PacketFactory.ipv4(proto: 17, payload: PacketFactory.udp(payload: PacketFactory.pattern(size)))
                let (r1, a) = buffers.with(inner) { b in iv.withUnsafeBytes { ossl.encapsulate(&b, fixedIV: $0.baseAddress!) } }
                let (r2, b) = buffers.with(inner) { b in iv.withUnsafeBytes { mb.encapsulate(&b, fixedIV: $0.baseAddress!) } }
                #expect(r1 == nil && r2 == nil)
                #expect(a == b, "\(suite) esn=\(esn) size=\(size): the backends disagree on the wire")
                // A flipped ICV bit is refused by both (before the genuine packet marks the number as seen).
                var bad = a
                bad[bad.count - 1] ^= 0x80
                let (f1, _) = buffers.with(bad) { ossl.decapsulate(&$0) }
                let (f2, _) = buffers.with(bad) { mb.decapsulate(&$0) }
                #expect(f1 == .dropped(.icvFailed) && f2 == .dropped(.icvFailed), "\(suite) esn=\(esn) size=\(size)")
                // Each opens the other's packet and gets the inner packet back.
                let (d1, back1) = buffers.with(b) { ossl.decapsulate(&$0) }
                let (d2, back2) = buffers.with(a) { mb.decapsulate(&$0) }
                #expect(d1 == .delivered && d2 == .delivered, "\(suite) esn=\(esn) size=\(size)")
                #expect(back1 == inner && back2 == inner)
            }
        }
    }

    @Test("every IV the ipsec-mb CBC cipher makes for a counter is unique and unpredictable-looking")
    func cbcIVs() throws {
        let mb = try IPsecMBBackend().makeCipher(Suites.crypto("cbc-sha256"))
        let ossl = try OpenSSLBackend().makeCipher(Suites.crypto("cbc-sha256"))
        var seen = Set<[UInt8]>()
        var iv = [UInt8](repeating: 0, count: 16)
        for n in UInt64(0)..<2000 {
            #expect(iv.withUnsafeMutableBytes { mb.writeIV($0.baseAddress!, sequence: n) })
            #expect(seen.insert(iv).inserted)
        }
        // Two contexts under the same key draw different salts, so their IVs differ (AES_K(salt || counter)).
        var other = [UInt8](repeating: 0, count: 16)
        #expect(other.withUnsafeMutableBytes { ossl.writeIV($0.baseAddress!, sequence: 0) })
        #expect(iv.withUnsafeMutableBytes { mb.writeIV($0.baseAddress!, sequence: 0) })
        #expect(iv != other)
    }

    @Test("a cipher that cannot make an IV fails the packet closed (encryptFailed) and its sequence number stays used")
    func ivFailureFailsClosed() throws {
        let config = ESPConfig(spi: 0x78, mode: .tunnel, crypto: Suites.crypto("cbc-sha256"),
                               tunnelSource: IPAddress("192.0.2.1"), tunnelDestination: IPAddress("192.0.2.2"),
                               replayWindow: 64)
        let tx = try ESPTransform(config, backend: NoIVBackend())
        let pool = PacketPool(count: 1, slotSize: 512, headroom: 128)
        var buf = pool.allocate()!
        defer { pool.release(buf) }
        buf.append(contentsOf: PacketFactory.ipv4(proto: 17, payload: PacketFactory.udp(payload: [1, 2, 3])))
        let before = tx.outboundSequence
        #expect(tx.encapsulate(&buf) == .encryptFailed)
        #expect(tx.outboundSequence == before + 1)
        #expect(tx.statistics.packets == 0)
    }

    @Test("a backend whose cipher claims a block size that is not a power of two from 4 to 128 is refused, not trusted",
          arguments: [3, 6, 2, 256])
    func oddBlockSizeRefused(_ size: Int) throws {
        let config = ESPConfig(spi: 0x79, mode: .tunnel, crypto: Suites.crypto("cbc-sha256"),
                               tunnelSource: IPAddress("192.0.2.1"), tunnelDestination: IPAddress("192.0.2.2"),
                               replayWindow: 64)
        #expect(throws: ESPConfigError.self) { try ESPTransform(config, backend: NoIVBackend(blockSize: size)) }
        _ = try ESPTransform(config, backend: NoIVBackend(blockSize: 8))  // a power of two is taken
    }

    @Test("encryption without integrity and ESN: both backends agree and write nothing behind the packet",
          arguments: CryptoBackends.names)
    func noIntegrityWithESN(backend: String) throws {
        let spec = try ESPCryptoSpec.cipher(name: "cbc(aes)", key: PacketFactory.pattern(16), authName: nil,
                                            authKey: [], truncationBits: nil)
        let config = ESPConfig(spi: 0x77, mode: .tunnel, crypto: spec, tunnelSource: IPAddress("192.0.2.1"),
                               tunnelDestination: IPAddress("192.0.2.2"), esn: true, replayWindow: 64,
                               outboundSequence: 0x1_0000_0000, inboundSequence: 0x1_0000_0000)
        let tx = try ESPTransform(config, backend: CryptoBackends.named(backend)!)
        let rx = try ESPTransform(config, backend: CryptoBackends.named(backend)!)
        let pool = PacketPool(count: 1, slotSize: 512, headroom: 128)
        var buf = pool.allocate()!
        defer { pool.release(buf) }
        let inner = PacketFactory.ipv4(proto: 17, payload: PacketFactory.udp(payload: PacketFactory.pattern(44)))
        buf.append(contentsOf: inner)
        #expect(tx.encapsulate(&buf) == nil)
        // Fill the tailroom with a canary: open must leave it as it is.
        let tail = buf.data + buf.count
        for i in 0..<16 { tail.storeByte(0xa5, at: i) }
        guard case .esp(let info) = ESPClassification.classify(&buf) else { Issue.record("not ESP"); return }
        #expect(rx.decapsulate(&buf, info: info) == nil)
        #expect(buf.bytes == inner)
        for i in 0..<16 { #expect(tail.loadByte(at: i) == 0xa5, "byte \(i) behind the packet changed") }
    }
}

/// OpenSSL's CBC cipher with an IV generator that always fails (a provider error, say), or claiming another block
/// size.
private struct NoIVBackend: ESPCryptoBackend {
    var blockSize: Int? = nil
    var name: String { "no-iv" }
    func makeCipher(_ spec: ESPCryptoSpec) throws(AlgorithmError) -> any ESPCipher {
        NoIVCipher(real: try OpenSSLBackend().makeCipher(spec), blockSize: self.blockSize)
    }
}

private final class NoIVCipher: ESPCipher {
    let real: any ESPCipher
    let claimedBlockSize: Int?
    init(real: any ESPCipher, blockSize: Int?) { (self.real, self.claimedBlockSize) = (real, blockSize) }
    var backendName: String { "no-iv" }
    var ivLength: Int { self.real.ivLength }
    var icvLength: Int { self.real.icvLength }
    var blockSize: Int { self.claimedBlockSize ?? self.real.blockSize }
    func writeIV(_ iv: UnsafeMutableRawPointer, sequence: UInt64) -> Bool { false }
    func seal(esp: UnsafeMutableRawPointer, cryptLength: Int, esnHigh: UInt32?) -> Bool {
        self.real.seal(esp: esp, cryptLength: cryptLength, esnHigh: esnHigh)
    }
    func open(esp: UnsafeMutableRawPointer, cryptLength: Int, esnHigh: UInt32?) -> Bool {
        self.real.open(esp: esp, cryptLength: cryptLength, esnHigh: esnHigh)
    }
}
