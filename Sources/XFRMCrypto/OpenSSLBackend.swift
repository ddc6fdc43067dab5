import CXFRMCrypto
import XFRMPacket

/// The default backend: OpenSSL libcrypto through the CXFRMCrypto shim, one pre-keyed context per SA.
public struct OpenSSLBackend: ESPCryptoBackend {
    public init() {}

    public var name: String { "openssl" }

    public func makeCipher(_ spec: ESPCryptoSpec) throws(AlgorithmError) -> any ESPCipher {
        try spec.validate()
        switch spec {
        case .aead(let alg, let key, let icvBits):
            guard let c = OpenSSLAEADCipher(alg, key: key, icvLength: icvBits / 8) else {
                throw AlgorithmError("\(alg.name): OpenSSL refused the key")
            }
            return c
        case .cipher(let alg, let key, let auth, let authKey, let trunc):
            guard let c = OpenSSLCipherAuth(alg, key: key, auth: auth, authKey: authKey, truncationBits: trunc) else {
                throw AlgorithmError("\(alg.name): OpenSSL refused the key")
            }
            return c
        }
    }
}

/// RFC 4106 AES-GCM, RFC 7634 ChaCha20-Poly1305 and RFC 4543 AES-GMAC.
final class OpenSSLAEADCipher: ESPCipher {
    var backendName: String { "openssl" }
    let ctx: OpaquePointer
    let icvLength: Int
    let integrityOnly: Bool
    var ivLength: Int { 8 }
    var blockSize: Int { 4 }

    init?(_ alg: AEADAlgorithm, key: SecretKey, icvLength: Int) {
        let kind: Int32 = switch alg {
        case .aesGCM: Int32(XFRM_AEAD_AES_GCM)
        case .aesGMAC: Int32(XFRM_AEAD_AES_GMAC)
        case .chacha20Poly1305: Int32(XFRM_AEAD_CHACHA20_POLY1305)
        }
        let made = key.withUnsafeBytes { k -> OpaquePointer? in
            let keyLen = k.count - 4
            return xfrm_aead_new(kind, k.baseAddress, keyLen, k.baseAddress! + keyLen, Int32(icvLength))
        }
        guard let made else { return nil }
        self.ctx = made
        self.icvLength = icvLength
        self.integrityOnly = alg == .aesGMAC
    }

    deinit { xfrm_aead_free(self.ctx) }

    private let ivSalt = AEADIVSalt()

    @inline(__always)
    func writeIV(_ iv: UnsafeMutableRawPointer, sequence: UInt64) -> Bool {
        self.ivSalt.write(iv, sequence: sequence)
        return true
    }

    func seal(esp: UnsafeMutableRawPointer, cryptLength: Int, esnHigh: UInt32?) -> Bool {
        AEADLayout.run(esp, cryptLength, esnHigh, integrityOnly: self.integrityOnly) {
            xfrm_aead_seal_esp(self.ctx, $0, $1, $2, $3, $4)
        }
    }

    func open(esp: UnsafeMutableRawPointer, cryptLength: Int, esnHigh: UInt32?) -> Bool {
        AEADLayout.run(esp, cryptLength, esnHigh, integrityOnly: self.integrityOnly) {
            xfrm_aead_open_esp(self.ctx, $0, $1, $2, $3, $4)
        }
    }
}

/// AES-CBC (RFC 3602) or NULL (RFC 2410) encryption with HMAC-SHA-1/2 (RFC 2404, RFC 4868), encrypt-then-MAC.
final class OpenSSLCipherAuth: ESPCipher {
    var backendName: String { "openssl" }
    let cbc: OpaquePointer?
    let hmac: OpaquePointer?
    let ivLength: Int
    let icvLength: Int
    let blockSize: Int

    init?(_ alg: CipherAlgorithm, key: SecretKey, auth: AuthAlgorithm?, authKey: SecretKey?, truncationBits: Int) {
        if alg == .aesCBC {
            guard let c = key.withUnsafeBytes({ xfrm_cbc_new($0.baseAddress, $0.count) }) else { return nil }
            self.cbc = c
        } else {
            self.cbc = nil
        }
        if let auth, let authKey {
            let kind: Int32
            switch auth {
            case .hmacSHA1: kind = Int32(XFRM_HMAC_SHA1)
            case .hmacSHA256: kind = Int32(XFRM_HMAC_SHA256)
            case .hmacSHA384: kind = Int32(XFRM_HMAC_SHA384)
            case .hmacSHA512: kind = Int32(XFRM_HMAC_SHA512)
            }
            guard let h = authKey.withUnsafeBytes({ xfrm_hmac_new(kind, $0.baseAddress, $0.count) }) else {
                if let c = self.cbc { xfrm_cbc_free(c) }
                return nil
            }
            self.hmac = h
        } else {
            self.hmac = nil
        }
        self.ivLength = alg.ivLength
        self.blockSize = alg.blockSize
        self.icvLength = self.hmac == nil ? 0 : truncationBits / 8
    }

    deinit {
        if let c = self.cbc { xfrm_cbc_free(c) }
        if let h = self.hmac { xfrm_hmac_free(h) }
    }

    @inline(__always)
    func writeIV(_ iv: UnsafeMutableRawPointer, sequence: UInt64) -> Bool {
        guard let c = self.cbc else { return true }  // a null cipher has no IV
        return xfrm_cbc_make_iv(c, sequence, iv) == 1
    }

    /// The ICV input is SPI..end of trailer, then the ESN high half (RFC 4303 §2.2.1); it is not sent.
    @inline(__always)
    private func computeICV(_ esp: UnsafeMutableRawPointer, authLength: Int, esnHigh: UInt32?,
                            into digest: UnsafeMutableRawPointer) {
        var hiBE = (esnHigh ?? 0).bigEndian
        withUnsafeBytes(of: &hiBE) { hi in
            xfrm_hmac_compute(self.hmac, esp, authLength, hi.baseAddress, esnHigh == nil ? 0 : 4, digest)
        }
    }

    func seal(esp: UnsafeMutableRawPointer, cryptLength: Int, esnHigh: UInt32?) -> Bool {
        let iv = esp + 8
        if let c = self.cbc {
            guard xfrm_cbc_encrypt(c, iv, iv + 16, cryptLength) == 1 else { return false }
        }
        guard self.hmac != nil else { return true }
        let authLength = 8 + self.ivLength + cryptLength
        var digest: (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0, 0, 0, 0, 0)
        withUnsafeMutableBytes(of: &digest) { d in
            self.computeICV(esp, authLength: authLength, esnHigh: esnHigh, into: d.baseAddress!)
            (esp + authLength).copyMemory(from: d.baseAddress!, byteCount: self.icvLength)
        }
        return true
    }

    func open(esp: UnsafeMutableRawPointer, cryptLength: Int, esnHigh: UInt32?) -> Bool {
        if self.hmac != nil {
            let authLength = 8 + self.ivLength + cryptLength
            var digest: (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0, 0, 0, 0, 0)
            let ok = withUnsafeMutableBytes(of: &digest) { d -> Bool in
                self.computeICV(esp, authLength: authLength, esnHigh: esnHigh, into: d.baseAddress!)
                return xfrm_ct_memcmp(d.baseAddress!, esp + authLength, self.icvLength) == 0
            }
            guard ok else { return false }
        }
        if let c = self.cbc {
            let iv = esp + 8
            guard cryptLength % 16 == 0, xfrm_cbc_decrypt(c, iv, iv + 16, cryptLength) == 1 else { return false }
        }
        return true
    }
}

/// HMAC-SHA-256 of `data` through the same precomputed-pad path the ESP ICV uses, for known-answer tests
/// (RFC 4868 §2.7). Any key length (keys longer than the block are hashed first).
public func hmacSHA256Digest(key: [UInt8], data: [UInt8]) -> [UInt8] {
    let ctx = key.withUnsafeBytes { xfrm_hmac_new(Int32(XFRM_HMAC_SHA256), $0.baseAddress, $0.count) }!
    defer { xfrm_hmac_free(ctx) }
    var out = [UInt8](repeating: 0, count: 32)
    data.withUnsafeBytes { d in
        out.withUnsafeMutableBytes { o in xfrm_hmac_compute(ctx, d.baseAddress, d.count, nil, 0, o.baseAddress) }
    }
    return out
}
