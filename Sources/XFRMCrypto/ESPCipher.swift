import XFRMPacket

/// The per-SA crypto of an ESP transform: pre-keyed once, then sealing and opening packets in place
/// (≈ the crypto_aead an xfrm_state binds in esp_init_state).
///
/// Every method works on an ESP packet laid out as (RFC 4303 §2):
///
///     esp → | SPI 4 | seq 4 | IV ivLength | payload, padding, pad length, next header: cryptLength | ICV |
///
/// Implementations never allocate and are not thread-safe: one instance per SA, used by one thread at a time (the
/// one holding the SA's lock).
public protocol ESPCipher: AnyObject {
    /// The backend that made this cipher ("openssl", "ipsec-mb"): a backend may hand an algorithm to another.
    var backendName: String { get }
    /// IV bytes carried in each packet.
    var ivLength: Int { get }
    /// ICV bytes appended to each packet.
    var icvLength: Int { get }
    /// Alignment of payload + trailer (RFC 4303 §2.4): the cipher's block size, at least 4.
    var blockSize: Int { get }
    /// Writes the per-packet IV for the SA's 64-bit packet counter `sequence`. The IV is unique for every
    /// counter value under this key: the counter itself for the AEADs (RFC 4106 §3.1), AES_K(counter) for CBC.
    /// Returns false on a library error: the IV is then unspecified and the packet must not be sealed (RFC 3602
    /// §2.3 wants an unpredictable CBC IV, not whatever the buffer held).
    func writeIV(_ iv: UnsafeMutableRawPointer, sequence: UInt64) -> Bool
    /// Encrypts the `cryptLength` bytes after the IV and writes the ICV behind them. `esnHigh` is the high half of
    /// an extended sequence number (authenticated, never sent), or nil without ESN. Returns false on a library error.
    func seal(esp: UnsafeMutableRawPointer, cryptLength: Int, esnHigh: UInt32?) -> Bool
    /// Decrypts in place and verifies the ICV in constant time. Returns false when the ICV does not verify: the
    /// payload is then unspecified and must be discarded, never passed on or captured, since the AEAD backends
    /// (ipsec-mb's GCM and ChaCha20-Poly1305, OpenSSL's EVP AEADs) and ipsec-mb's CBC job decrypt before they
    /// compare, as Linux's in-place GCM does; only OpenSSL's CBC + HMAC checks the ICV first.
    func open(esp: UnsafeMutableRawPointer, cryptLength: Int, esnHigh: UInt32?) -> Bool
}

/// Makes ciphers for SAs (OpenSSL, Intel ipsec-mb); chosen per stack or per transform without touching ESP code.
public protocol ESPCryptoBackend: Sendable {
    /// A short name for listings and benchmarks.
    var name: String { get }
    /// A pre-keyed cipher for `spec`, or an error naming why the backend cannot serve it. Implementations call
    /// `spec.validate()` first (ESPTransform does too, before asking any backend).
    func makeCipher(_ spec: ESPCryptoSpec) throws(AlgorithmError) -> any ESPCipher
}
