import CXFRMIPsecMB
import XFRMPacket

/// Intel ipsec-mb (Debian's libipsec-mb): AES-GCM (128/192/256, ICV 8/12/16), AES-GMAC and ChaCha20-Poly1305 through
/// the library's direct API, AES-CBC with HMAC-SHA-1/256/384/512 (or none) through its job API. ecb(cipher_null)
/// goes to OpenSSL, which also serves everything when the library cannot run on this CPU.
public struct IPsecMBBackend: ESPCryptoBackend {
    public init() {}

    public var name: String { "ipsec-mb" }

    /// True when the library initialised on this CPU (AES-NI present) and passed a known-answer test.
    public static var isAvailable: Bool { xfrm_mb_available() == 1 }

    /// The library's version and the code path it chose, e.g. "ipsec-mb 1.3.0 avx2".
    public static var description: String { String(cString: xfrm_mb_description()) }

    public func makeCipher(_ spec: ESPCryptoSpec) throws(AlgorithmError) -> any ESPCipher {
        try spec.validate()
        guard Self.isAvailable else { return try OpenSSLBackend().makeCipher(spec) }
        switch spec {
        case .aead(let alg, let key, let icvBits):
            guard let c = IPsecMBAEADCipher(alg, key: key, icvLength: icvBits / 8) else {
                throw AlgorithmError("\(alg.name): ipsec-mb refused the key")
            }
            return c
        case .cipher(.aesCBC, let key, let auth, let authKey, let trunc):
            guard let c = IPsecMBCBCCipher(key: key, auth: auth, authKey: authKey, truncationBits: trunc) else {
                throw AlgorithmError("cbc(aes): ipsec-mb refused the key")
            }
            return c
        case .cipher:
            return try OpenSSLBackend().makeCipher(spec)
        }
    }
}

/// RFC 4106 AES-GCM, RFC 7634 ChaCha20-Poly1305 and RFC 4543 AES-GMAC on ipsec-mb's direct API.
///
/// Its fields are 18 bytes (one per SA, so the lengths are bytes).
final class IPsecMBAEADCipher: ESPCipher {
    var backendName: String { "ipsec-mb" }
    let ctx: OpaquePointer
    private let ivSalt = AEADIVSalt()
    private let icvLength8: UInt8
    let integrityOnly: Bool
    var icvLength: Int { Int(self.icvLength8) }
    var ivLength: Int { 8 }
    var blockSize: Int { 4 }

    init?(_ alg: AEADAlgorithm, key: SecretKey, icvLength: Int) {
        let kind: Int32 = switch alg {
        case .aesGCM: Int32(XFRM_MB_AES_GCM)
        case .aesGMAC: Int32(XFRM_MB_AES_GMAC)
        case .chacha20Poly1305: Int32(XFRM_MB_CHACHA20_POLY1305)
        }
        let made = key.withUnsafeBytes { k -> OpaquePointer? in
            let keyLen = k.count - 4
            return xfrm_mb_aead_new(kind, k.baseAddress, keyLen, k.baseAddress! + keyLen, Int32(icvLength))
        }
        guard let made else { return nil }
        self.ctx = made
        self.icvLength8 = UInt8(icvLength)  // 8, 12 or 16: xfrm_mb_aead_new refuses the rest
        self.integrityOnly = alg == .aesGMAC
    }

    deinit { xfrm_mb_aead_free(self.ctx) }

    @inline(__always)
    func writeIV(_ iv: UnsafeMutableRawPointer, sequence: UInt64) -> Bool {
        self.ivSalt.write(iv, sequence: sequence)
        return true
    }

    func seal(esp: UnsafeMutableRawPointer, cryptLength: Int, esnHigh: UInt32?) -> Bool {
        AEADLayout.run(esp, cryptLength, esnHigh, integrityOnly: self.integrityOnly) {
            xfrm_mb_aead_seal_esp(self.ctx, $0, $1, $2, $3, $4)
        }
    }

    func open(esp: UnsafeMutableRawPointer, cryptLength: Int, esnHigh: UInt32?) -> Bool {
        AEADLayout.run(esp, cryptLength, esnHigh, integrityOnly: self.integrityOnly) {
            xfrm_mb_aead_open_esp(self.ctx, $0, $1, $2, $3, $4)
        }
    }
}

/// AES-CBC (RFC 3602) with HMAC-SHA-1/2 (RFC 2404, RFC 4868) or none, encrypt-then-MAC, on ipsec-mb's job API.
final class IPsecMBCBCCipher: ESPCipher {
    var backendName: String { "ipsec-mb" }
    let ctx: OpaquePointer
    let icvLength: Int
    var ivLength: Int { 16 }
    var blockSize: Int { 16 }

    init?(key: SecretKey, auth: AuthAlgorithm?, authKey: SecretKey?, truncationBits: Int) {
        let kind: Int32 = switch auth {
        case nil: Int32(XFRM_MB_HMAC_NONE)
        case .hmacSHA1: Int32(XFRM_MB_HMAC_SHA1)
        case .hmacSHA256: Int32(XFRM_MB_HMAC_SHA256)
        case .hmacSHA384: Int32(XFRM_MB_HMAC_SHA384)
        case .hmacSHA512: Int32(XFRM_MB_HMAC_SHA512)
        }
        let icv = auth == nil ? 0 : truncationBits / 8
        let made = key.withUnsafeBytes { k -> OpaquePointer? in
            if let authKey {
                return authKey.withUnsafeBytes { a in
                    xfrm_mb_cbc_new(k.baseAddress, k.count, kind, a.baseAddress, a.count, Int32(icv))
                }
            }
            return xfrm_mb_cbc_new(k.baseAddress, k.count, kind, nil, 0, 0)
        }
        guard let made else { return nil }
        self.ctx = made
        self.icvLength = icv
    }

    deinit { xfrm_mb_cbc_free(self.ctx) }

    @inline(__always)
    func writeIV(_ iv: UnsafeMutableRawPointer, sequence: UInt64) -> Bool {
        xfrm_mb_cbc_make_iv(self.ctx, sequence, iv)  // one AES block with the expanded key: cannot fail
        return true
    }

    func seal(esp: UnsafeMutableRawPointer, cryptLength: Int, esnHigh: UInt32?) -> Bool {
        xfrm_mb_cbc_seal(self.ctx, esp, cryptLength, esnHigh == nil ? 0 : 1, (esnHigh ?? 0).bigEndian) == 1
    }

    func open(esp: UnsafeMutableRawPointer, cryptLength: Int, esnHigh: UInt32?) -> Bool {
        xfrm_mb_cbc_open(self.ctx, esp, cryptLength, esnHigh == nil ? 0 : 1, (esnHigh ?? 0).bigEndian) == 1
    }
}
