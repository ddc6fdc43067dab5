import Foundation
import Testing
import XFRMCrypto
import XFRMTestKit

@Suite("Algorithm registry")
struct AlgorithmTests {
    @Test("AEAD keys and ICVs of the wrong size are refused with the algorithm and the sizes named")
    func aeadErrors() {
        #expect(throws: AlgorithmError(
            "rfc4106(gcm(aes)): key must be 160, 224 or 288 bits (the cipher key followed by a 32-bit salt), got 128"
        )) { try ESPCryptoSpec.aead(name: "rfc4106(gcm(aes))", key: PacketFactory.pattern(16), icvBits: 128) }
        #expect(throws: AlgorithmError("rfc4106(gcm(aes)): ICV length must be 64, 96 or 128 bits, got 100")) {
            try ESPCryptoSpec.aead(name: "rfc4106(gcm(aes))", key: PacketFactory.pattern(20), icvBits: 100)
        }
        #expect(throws: AlgorithmError("rfc7539esp(chacha20,poly1305): ICV length must be 128 bits, got 96")) {
            try ESPCryptoSpec.aead(name: "rfc7539esp(chacha20,poly1305)", key: PacketFactory.pattern(36), icvBits: 96)
        }
        #expect(throws: AlgorithmError.self) {
            try ESPCryptoSpec.aead(name: "gcm(aes)", key: PacketFactory.pattern(20), icvBits: 128)
        }
    }

    @Test("cipher and HMAC keys and truncations are checked; kernel aliases are accepted")
    func cipherErrors() throws {
        #expect(throws: AlgorithmError("cbc(aes): key must be 128, 192 or 256 bits, got 120")) {
            try ESPCryptoSpec.cipher(name: "cbc(aes)", key: PacketFactory.pattern(15), authName: "hmac(sha1)",
                                     authKey: PacketFactory.pattern(20), truncationBits: 96)
        }
        #expect(throws: AlgorithmError("hmac(sha256): key must be 256 bits, got 160")) {
            try ESPCryptoSpec.cipher(name: "cbc(aes)", key: PacketFactory.pattern(16), authName: "hmac(sha256)",
                                     authKey: PacketFactory.pattern(20), truncationBits: 128)
        }
        #expect(throws: AlgorithmError(
            "hmac(sha256): truncation length must be at most 256 bits, got 300"
        )) {
            try ESPCryptoSpec.cipher(name: "cbc(aes)", key: PacketFactory.pattern(16), authName: "hmac(sha256)",
                                     authKey: PacketFactory.pattern(32), truncationBits: 300)
        }
        #expect(throws: AlgorithmError.self) {
            try ESPCryptoSpec.cipher(name: "ecb(cipher_null)", key: [], authName: nil, authKey: [], truncationBits: nil)
        }
        let spec = try ESPCryptoSpec.cipher(
            name: "aes", key: PacketFactory.pattern(16), authName: "sha512", authKey: PacketFactory.pattern(64),
            truncationBits: nil)
        #expect(spec.icvLength == 32)
        #expect(AuthAlgorithm.hmacSHA256.kernelDefaultTruncationBits == 96)
    }

    @Test("HMAC-SHA-256-128 matches RFC 4868's AUTH256 vectors through the ESP ICV path")
    func rfc4868() throws {
        // The ESP ICV covers SPI || seq || IV || payload; with NULL encryption the ICV is HMAC over exactly the
        // ESP bytes, so a vector's data can be fed as the ESP packet itself.
        let url = Bundle.module.url(forResource: "esp-vectors", withExtension: "json", subdirectory: "Resources")!
        let obj = try JSONSerialization.jsonObject(with: Data(contentsOf: url)) as! [String: Any]
        let vectors = obj["auth_vectors"] as! [[String: Any]]
        #expect(vectors.count == 4)
        for v in vectors {
            let key = PacketFactory.hex(v["key"] as! String)
            let data = PacketFactory.hex(v["data"] as! String)
            let icv = PacketFactory.hex(v["icv_128"] as! String)
            let digest = hmacSHA256Digest(key: key, data: data)
            #expect(Array(digest.prefix(16)) == icv, "\(v["name"]!)")
        }
    }
}
