/// An invalid algorithm, key or ICV choice, with a message naming the algorithm and the sizes it accepts.
public struct AlgorithmError: Error, CustomStringConvertible, Equatable {
    /// Which kernel refusal this corresponds to, so the user API can answer with the kernel's errno and extack
    /// text while tools print `description`, which names what was wrong in detail.
    public enum Kind: Sendable, Equatable {
        /// xfrm_aead_get_byname found no algorithm with this name and ICV length.
        case aeadNotFound
        /// No encryption / integrity algorithm of this name.
        case cryptNotFound
        case authNotFound
        /// A truncation beyond the digest.
        case truncationTooLong
        /// The key does not fit the cipher (the kernel's crypto layer refuses it when keying).
        case aeadKey
        case cipherKey
        /// swift-xfrm's own refusals (no kernel counterpart): EINVAL with `description`.
        case other
    }

    public let kind: Kind
    public let description: String
    public init(_ description: String, kind: Kind = .other) {
        self.description = description
        self.kind = kind
    }

    /// Errors are equal when they say the same thing.
    public static func == (a: AlgorithmError, b: AlgorithmError) -> Bool { a.description == b.description }

    /// The errno and extack text the kernel's user API answers this refusal with ("" = no extack: iproute2 then
    /// prints "RTNETLINK answers: ..."); swift-xfrm's own refusals give EINVAL and `description`.
    public var kernelAnswer: (errno: Int32, message: String) {
        switch self.kind {
        case .aeadNotFound: (38, "Requested AEAD algorithm not found")  // ENOSYS, attach_aead
        case .cryptNotFound: (38, "Requested CRYPT algorithm not found")  // ENOSYS, attach_one_algo
        case .authNotFound: (38, "Requested AUTH_TRUNC algorithm not found")  // ENOSYS, attach_auth_trunc
        case .truncationTooLong: (22, "Invalid length requested for truncated ICV")
        case .aeadKey: (22, "Kernel was unable to initialize cryptographic operations")  // esp_init_aead
        case .cipherKey: (22, "")  // esp_init_authenc: crypto_aead_setkey's EINVAL, no extack
        case .other: (22, self.description)
        }
    }
}

/// Combined-mode algorithms (≈ the kernel's aead entries in xfrm_algo.c; `ip xfrm state ... aead NAME KEY ICV`).
public enum AEADAlgorithm: String, Sendable, CaseIterable {
    /// AES-GCM for ESP, RFC 4106. Key = AES key || 4-byte salt.
    case aesGCM = "rfc4106(gcm(aes))"
    /// ChaCha20-Poly1305 for ESP, RFC 7634. Key = 32-byte key || 4-byte salt.
    case chacha20Poly1305 = "rfc7539esp(chacha20,poly1305)"
    /// AES-GMAC, integrity only (ENCR_NULL_AUTH_AES_GMAC), RFC 4543. Key = AES key || 4-byte salt.
    case aesGMAC = "rfc4543(gcm(aes))"

    /// The kernel name (what `ip xfrm` prints).
    public var name: String { self.rawValue }

    /// Accepts the kernel names.
    public init?(name: String) { self.init(rawValue: name) }

    /// Valid key lengths in bits, salt included.
    public var keyBits: [Int] {
        switch self {
        case .aesGCM, .aesGMAC: [160, 224, 288]
        case .chacha20Poly1305: [288]
        }
    }

    /// Valid ICV lengths in bits.
    public var icvBits: [Int] {
        switch self {
        case .aesGCM: [64, 96, 128]
        case .chacha20Poly1305, .aesGMAC: [128]
        }
    }

    /// Bytes of IV carried in each packet (RFC 4106 §3.1, RFC 7634 §2, RFC 4543 §3.1).
    public var ivLength: Int { 8 }
}

/// Encryption algorithms used with a separate integrity algorithm (`ip xfrm state ... enc NAME KEY`).
public enum CipherAlgorithm: String, Sendable, CaseIterable {
    /// AES-CBC, RFC 3602.
    case aesCBC = "cbc(aes)"
    /// NULL encryption, RFC 2410 (debugging only).
    case null = "ecb(cipher_null)"

    public var name: String { self.rawValue }

    /// Accepts the kernel names and the kernel's compatibility aliases (`aes`, `cipher_null`).
    public init?(name: String) {
        switch name {
        case "cbc(aes)", "aes": self = .aesCBC
        case "ecb(cipher_null)", "cipher_null": self = .null
        default: return nil
        }
    }

    public var keyBits: [Int] {
        switch self {
        case .aesCBC: [128, 192, 256]
        case .null: [0]
        }
    }

    public var ivLength: Int {
        switch self {
        case .aesCBC: 16
        case .null: 0
        }
    }

    /// Payload alignment (RFC 4303 §2.4): the cipher block, at least 4.
    public var blockSize: Int {
        switch self {
        case .aesCBC: 16
        case .null: 4
        }
    }
}

/// Integrity algorithms (`ip xfrm state ... auth NAME KEY` or `auth-trunc NAME KEY BITS`).
public enum AuthAlgorithm: String, Sendable, CaseIterable {
    /// HMAC-SHA-1-96, RFC 2404.
    case hmacSHA1 = "hmac(sha1)"
    /// HMAC-SHA-256-128, RFC 4868.
    case hmacSHA256 = "hmac(sha256)"
    /// HMAC-SHA-384-192, RFC 4868.
    case hmacSHA384 = "hmac(sha384)"
    /// HMAC-SHA-512-256, RFC 4868.
    case hmacSHA512 = "hmac(sha512)"

    public var name: String { self.rawValue }

    /// Accepts the kernel names and its compatibility aliases (`sha1`, `sha256`, `sha384`, `sha512`).
    public init?(name: String) {
        switch name {
        case "hmac(sha1)", "sha1": self = .hmacSHA1
        case "hmac(sha256)", "sha256": self = .hmacSHA256
        case "hmac(sha384)", "sha384": self = .hmacSHA384
        case "hmac(sha512)", "sha512": self = .hmacSHA512
        default: return nil
        }
    }

    /// Full digest (and RFC key) length in bits.
    public var digestBits: Int {
        switch self {
        case .hmacSHA1: 160
        case .hmacSHA256: 256
        case .hmacSHA384: 384
        case .hmacSHA512: 512
        }
    }

    /// The RFC truncation (RFC 2404: 96; RFC 4868: half the digest).
    public var rfcTruncationBits: Int {
        switch self {
        case .hmacSHA1: 96
        case .hmacSHA256: 128
        case .hmacSHA384: 192
        case .hmacSHA512: 256
        }
    }

    /// What the kernel uses for plain `auth NAME KEY` (XFRMA_ALG_AUTH): 96 bits for hmac(sha256), a pre-RFC 4868
    /// draft value kept for compatibility; RFC values for the others. Use `auth-trunc` for RFC 4868 SHA-256.
    public var kernelDefaultTruncationBits: Int {
        switch self {
        case .hmacSHA256: 96
        default: self.rfcTruncationBits
        }
    }

    /// Accepted key lengths in bits: the digest length (RFC 2404 §3, RFC 4868 §2.1.1).
    public var keyBits: [Int] { [self.digestBits] }
}

/// A validated ESP crypto configuration with its keys (≈ an xfrm_state's aead, or ealg + aalg).
public enum ESPCryptoSpec: Sendable {
    /// A combined-mode algorithm; `key` includes the 4-byte salt at its end.
    case aead(AEADAlgorithm, key: SecretKey, icvBits: Int)
    /// Encryption plus optional integrity (nil only for encryption-only SAs such as RFC 3602's test cases).
    case cipher(CipherAlgorithm, key: SecretKey, auth: AuthAlgorithm?, authKey: SecretKey?, truncationBits: Int)

    /// The key storage: the AEAD or encryption key, and the integrity key if any.
    public var keys: (key: SecretKey, authKey: SecretKey?) {
        switch self {
        case .aead(_, let key, _): return (key, nil)
        case .cipher(_, let key, _, let authKey, _): return (key, authKey)
        }
    }

    /// Validates an AEAD choice: `ip xfrm state ... aead NAME KEY ICV-BITS`.
    public static func aead(name: String, key: [UInt8], icvBits: Int) throws(AlgorithmError) -> ESPCryptoSpec {
        guard let alg = AEADAlgorithm(name: name) else {
            let known = AEADAlgorithm.allCases.map(\.name).joined(separator: ", ")
            throw AlgorithmError("unknown AEAD algorithm \"\(name)\" (supported: \(known))", kind: .aeadNotFound)
        }
        // The kernel finds the algorithm by name and ICV length first, and keys it later.
        guard alg.icvBits.contains(icvBits) else {
            throw AlgorithmError("\(alg.name): ICV length must be \(list(alg.icvBits)) bits, got \(icvBits)",
                                 kind: .aeadNotFound)
        }
        guard alg.keyBits.contains(key.count * 8) else {
            throw AlgorithmError(
                "\(alg.name): key must be \(list(alg.keyBits)) bits (the cipher key followed by a 32-bit salt), "
                    + "got \(key.count * 8)", kind: .aeadKey)
        }
        return .aead(alg, key: SecretKey(key), icvBits: icvBits)
    }

    /// Validates an encryption + integrity choice: `enc NAME KEY` with `auth-trunc NAME KEY BITS` (or `auth`,
    /// passing the truncation from `AuthAlgorithm.kernelDefaultTruncationBits`).
    public static func cipher(
        name: String, key: [UInt8], authName: String?, authKey: [UInt8], truncationBits: Int?
    ) throws(AlgorithmError) -> ESPCryptoSpec {
        // In the kernel's order: names and the truncation when the algorithms are attached, keys when ESP is
        // initialized.
        guard let alg = CipherAlgorithm(name: name) else {
            throw AlgorithmError("unknown encryption algorithm \"\(name)\" (supported: cbc(aes), ecb(cipher_null))",
                                 kind: .cryptNotFound)
        }
        var authAlg: AuthAlgorithm? = nil
        if let authName {
            guard let a = AuthAlgorithm(name: authName) else {
                let known = AuthAlgorithm.allCases.map(\.name).joined(separator: ", ")
                throw AlgorithmError("unknown authentication algorithm \"\(authName)\" (supported: \(known))",
                                     kind: .authNotFound)
            }
            if let t = truncationBits, t > a.digestBits {
                throw AlgorithmError("\(a.name): truncation length must be at most \(a.digestBits) bits, got \(t)",
                                     kind: .truncationTooLong)
            }
            authAlg = a
        }
        guard alg.keyBits.contains(key.count * 8) else {
            throw AlgorithmError("\(alg.name): key must be \(list(alg.keyBits)) bits, got \(key.count * 8)",
                                 kind: .cipherKey)
        }
        guard let authName, let auth = authAlg else {
            guard alg != .null else {
                throw AlgorithmError("ecb(cipher_null): an integrity algorithm is required with null encryption")
            }
            return .cipher(alg, key: SecretKey(key), auth: nil, authKey: nil, truncationBits: 0)
        }
        _ = authName
        guard auth.keyBits.contains(authKey.count * 8) else {
            throw AlgorithmError("\(auth.name): key must be \(list(auth.keyBits)) bits, got \(authKey.count * 8)")
        }
        let trunc = truncationBits ?? auth.rfcTruncationBits
        guard trunc % 8 == 0, trunc >= 96, trunc <= auth.digestBits else {
            throw AlgorithmError(
                "\(auth.name): truncation length must be a multiple of 8 from 96 to \(auth.digestBits) bits "
                    + "(RFC value \(auth.rfcTruncationBits)), got \(trunc)")
        }
        return .cipher(alg, key: SecretKey(key), auth: auth, authKey: SecretKey(authKey), truncationBits: trunc)
    }

    /// Checks a spec however it was made (the cases are public, so a value may bypass the factory functions):
    /// key lengths, the ICV length, a truncation from 96 bits to the digest, and integrity with null encryption.
    /// Every backend calls it before keying, so no backend can be handed an ICV of 0 bytes or one longer than
    /// its digest.
    public func validate() throws(AlgorithmError) {
        switch self {
        case .aead(let alg, let key, let icvBits):
            guard alg.keyBits.contains(key.bits) else {
                throw AlgorithmError("\(alg.name): key must be \(list(alg.keyBits)) bits, got \(key.bits)")
            }
            guard alg.icvBits.contains(icvBits) else {
                throw AlgorithmError("\(alg.name): ICV length must be \(list(alg.icvBits)) bits, got \(icvBits)")
            }
        case .cipher(let alg, let key, let auth, let authKey, let trunc):
            guard alg.keyBits.contains(key.bits) else {
                throw AlgorithmError("\(alg.name): key must be \(list(alg.keyBits)) bits, got \(key.bits)")
            }
            guard let auth else {
                guard alg != .null else {
                    throw AlgorithmError("ecb(cipher_null): an integrity algorithm is required with null encryption")
                }
                guard trunc == 0, authKey == nil else {
                    throw AlgorithmError("\(alg.name): a truncation length or key was given without an integrity algorithm")
                }
                return
            }
            guard let authKey, auth.keyBits.contains(authKey.bits) else {
                throw AlgorithmError("\(auth.name): key must be \(list(auth.keyBits)) bits, got \(authKey?.bits ?? 0)")
            }
            guard trunc % 8 == 0, trunc >= 96, trunc <= auth.digestBits else {
                throw AlgorithmError(
                    "\(auth.name): truncation length must be a multiple of 8 from 96 to \(auth.digestBits) bits, got \(trunc)")
            }
        }
    }

    /// True when the SA has no integrity protection (encryption only): RFC 8221 §5 says such ESP must not be used.
    public var lacksIntegrity: Bool {
        if case .cipher(_, _, nil, _, _) = self { return true }
        return false
    }

    /// True for combined-mode algorithms, whose nonce is derived from the sequence number and so must never
    /// repeat (which forbids `oseq-may-wrap`).
    public var isAEAD: Bool {
        if case .aead = self { return true }
        return false
    }

    /// ICV bytes per packet.
    public var icvLength: Int {
        switch self {
        case .aead(_, _, let icv): icv / 8
        case .cipher(_, _, _, _, let t): t / 8
        }
    }
}

private func list(_ values: [Int]) -> String {
    if values.count == 1 { return "\(values[0])" }
    return values.dropLast().map(String.init).joined(separator: ", ") + " or \(values.last!)"
}
