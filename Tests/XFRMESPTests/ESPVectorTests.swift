import Foundation
import Testing
import XFRMCrypto
import XFRMESP
import XFRMPacket
import XFRMTestKit

/// One published packet vector from Vectors/esp-vectors.json (draft-mcgrew-gcm-test-01, RFC 7634, RFC 3602).
struct PacketVector: Sendable, CustomTestStringConvertible {
    let name: String
    let algorithm: String
    let key: [UInt8]
    let salt: [UInt8]
    let iv: [UInt8]
    let spi: UInt32
    let seq: UInt32
    let esn: Bool
    let seqHigh: UInt32
    let plaintext: [UInt8]
    let padLength: Int
    let nextHeader: UInt8
    let ciphertext: [UInt8]
    let outerHeader: [UInt8]?
    let modeHint: String
    var testDescription: String { self.name }

    static func loadAll() -> [PacketVector] {
        let url = Bundle.module.url(forResource: "esp-vectors", withExtension: "json", subdirectory: "Vectors")!
        let obj = try! JSONSerialization.jsonObject(with: Data(contentsOf: url)) as! [String: Any]
        return (obj["esp_packet_vectors"] as! [[String: Any]]).map { v in
            PacketVector(
                name: v["name"] as! String, algorithm: v["algorithm"] as! String,
                key: PacketFactory.hex(v["key"] as! String), salt: PacketFactory.hex(v["salt"] as? String ?? ""),
                iv: PacketFactory.hex(v["iv"] as! String), spi: UInt32(v["spi"] as! String, radix: 16)!,
                seq: UInt32(v["seq"] as! String, radix: 16)!, esn: v["esn"] as! Bool,
                seqHigh: UInt32(v["seq_hi"] as? String ?? "0", radix: 16)!,
                plaintext: PacketFactory.hex(v["plaintext_packet_hex"] as! String),
                padLength: v["pad_length"] as! Int, nextHeader: UInt8(v["next_header"] as! Int),
                ciphertext: PacketFactory.hex(v["ciphertext_esp_packet_hex"] as! String),
                outerHeader: (v["outer_ip_header_hex"] as? String).map(PacketFactory.hex),
                modeHint: v["mode_hint"] as! String)
        }
    }

    var crypto: ESPCryptoSpec {
        if self.algorithm.hasPrefix("AES-GCM") {
            return try! .aead(name: "rfc4106(gcm(aes))", key: self.key + self.salt, icvBits: 128)
        }
        if self.algorithm.hasPrefix("ChaCha20") {
            return try! .aead(name: "rfc7539esp(chacha20,poly1305)", key: self.key + self.salt, icvBits: 128)
        }
        return try! .cipher(name: "cbc(aes)", key: self.key, authName: nil, authKey: [], truncationBits: nil)
    }

    /// The ESP payload: the whole plaintext packet, except for RFC 3602 case 5 whose plaintext is a complete
    /// transport-mode packet (its IP header stays outside ESP).
    var espPayload: [UInt8] {
        self.outerHeader != nil && self.modeHint == "transport" ? Array(self.plaintext.dropFirst(20)) : self.plaintext
    }

    var fullSequence: UInt64 { UInt64(self.seqHigh) << 32 | UInt64(self.seq) }

    /// A transport-mode SA positioned so that this vector's packet is the next one in each direction.
    func transform(mode: ESPMode = .transport, backend: String = "openssl") throws -> ESPTransform {
        let t = try ESPTransform(
            ESPConfig(
                spi: self.spi, mode: mode, crypto: self.crypto, tunnelSource: IPAddress("192.0.2.1"),
                tunnelDestination: IPAddress("192.0.2.2"), esn: self.esn, replayWindow: 32,
                outboundSequence: self.fullSequence &- 1, inboundSequence: self.fullSequence),
            backend: CryptoBackends.named(backend)!)
        // ipsec-mb hands ecb(cipher_null) to OpenSSL; every other vector must run on the backend asked for.
        if !self.algorithm.contains("NULL") { #expect(t.cipher.backendName == backend, "\(self.name)") }
        return t
    }
}

/// The vectors are crypto-level: they carry an ESP packet without an IP header. A bare IPv4 header with protocol
/// `proto` around them lets the transport-mode path run unchanged.
func carrier(_ proto: UInt8, _ payload: [UInt8]) -> [UInt8] {
    PacketFactory.ipv4(source: "192.0.2.1", destination: "192.0.2.2", proto: proto, payload: payload)
}

@Suite("Published ESP vectors, with each crypto backend")
struct ESPVectorTests {
    static let vectors = PacketVector.loadAll()
    static let backends = CryptoBackends.names

    @Test("every vector is present", arguments: [17])
    func count(expected: Int) {
        #expect(Self.vectors.count == expected)
    }

    @Test("decrypts to the published plaintext, padding and next header", arguments: vectors, backends)
    func decrypts(_ v: PacketVector, backend: String) throws {
        let t = try v.transform(backend: backend)
        let buffers = TestBuffers()
        let (result, out) = buffers.with(carrier(50, v.ciphertext)) { t.decapsulate(&$0) }
        if v.espPayload.isEmpty {
            // Only a trailer (draft-mcgrew-gcm-test-01 case 12): the ICV verifies and decrypts to the published
            // trailer in place, but a packet without one payload byte is garbage to Linux (esp_remove_trailer's
            // `padlen + 2 + alen >= elen`): dropped, not counted as a packet.
            #expect(result == .dropped(.badPadding))
            #expect(t.statistics.integrityFailed == 0)
            #expect(t.statistics.packets == 0)
            let trailer = (0..<v.padLength).map { UInt8($0 + 1) } + [UInt8(v.padLength), v.nextHeader]
            let at = 20 + 8 + v.iv.count
            #expect(Array(out[at..<(at + trailer.count)]) == trailer)
            // The window did not move: the same packet again is garbage again, not a duplicate.
            #expect(buffers.with(carrier(50, v.ciphertext)) { t.decapsulate(&$0) }.0 == .dropped(.badPadding))
            return
        }
        #expect(result == .delivered)
        #expect(Array(out.dropFirst(20)) == v.espPayload)
        #expect(out[9] == v.nextHeader)
        #expect(t.statistics.packets == 1)
    }

    @Test("re-encrypts bit-exact with the same sequence number and IV", arguments: vectors, backends)
    func encrypts(_ v: PacketVector, backend: String) throws {
        let t = try v.transform(backend: backend)
        let buffers = TestBuffers()
        let (reason, out) = buffers.with(carrier(v.nextHeader, v.espPayload)) { buf in
            v.iv.withUnsafeBytes { t.encapsulate(&buf, fixedIV: $0.baseAddress!) }
        }
        #expect(reason == nil)
        #expect(Array(out.dropFirst(20)) == v.ciphertext)
        #expect(out[9] == 50)
        #expect(t.outboundSequence == v.fullSequence)
    }

    @Test("a flipped ciphertext bit fails the ICV and leaves the window alone", arguments: vectors.filter {
        !$0.algorithm.contains("NO integrity")
    }, backends)
    func tamperedFails(_ v: PacketVector, backend: String) throws {
        let t = try v.transform(backend: backend)
        var bad = v.ciphertext
        bad[bad.count - 20] ^= 0x01
        let buffers = TestBuffers()
        let (result, _) = buffers.with(carrier(50, bad)) { t.decapsulate(&$0) }
        #expect(result == .dropped(.icvFailed))
        #expect(t.statistics.integrityFailed == 1)
        #expect(t.replay.top == v.fullSequence)
        // The genuine packet is still taken as before afterwards (accepted; McGrew case 12 dropped as garbage, not as
        // a duplicate): the failure did not advance the window.
        let (again, _) = buffers.with(carrier(50, v.ciphertext)) { t.decapsulate(&$0) }
        #expect(again == (v.espPayload.isEmpty ? .dropped(.badPadding) : .delivered))
    }

    @Test("RFC 3602 complete packets: transport case 5 and tunnel case 7 round-trip whole", arguments: backends)
    func rfc3602WholePackets(backend: String) throws {
        let buffers = TestBuffers()
        for v in Self.vectors where v.outerHeader != nil {
            let mode: ESPMode = v.modeHint == "tunnel" ? .tunnel : .transport
            let t = try v.transform(mode: mode, backend: backend)
            let wire = v.outerHeader! + v.ciphertext
            let (result, inner) = buffers.with(wire) { t.decapsulate(&$0) }
            #expect(result == .delivered, "\(v.name)")
            #expect(inner == v.plaintext, "\(v.name)")
            if mode == .transport {
                let (r, out) = buffers.with(v.plaintext) { buf in
                    v.iv.withUnsafeBytes { t.encapsulate(&buf, fixedIV: $0.baseAddress!) }
                }
                #expect(r == nil)
                #expect(out == wire, "\(v.name): transport output must equal the published packet")
            }
        }
    }
}
