import XFRMPacket

/// Where the pieces of an AEAD ESP packet are, and its additional authenticated data, for every backend
/// (RFC 4106 §5, RFC 7634 §2.1, RFC 4543 §3.3): the AAD is SPI || seq (8 bytes), or SPI || seq-hi || seq-lo
/// (12 bytes) with ESN; GMAC also authenticates IV || payload and encrypts nothing.
enum AEADLayout {
    /// Calls `body(iv, aad, aadLength, payload, tag)` with the AAD built on the stack when ESN needs it.
    @inline(__always)
    static func withAAD<R>(
        _ esp: UnsafeMutableRawPointer, _ cryptLength: Int, _ esnHigh: UInt32?,
        _ body: (UnsafeMutableRawPointer, UnsafeRawPointer, Int, UnsafeMutableRawPointer, UnsafeMutableRawPointer) -> R
    ) -> R {
        let iv = esp + 8
        let payload = esp + 16
        let tag = payload + cryptLength
        guard let hi = esnHigh else { return body(iv, UnsafeRawPointer(esp), 8, payload, tag) }
        var aadESN: (UInt32, UInt32, UInt32) = (0, 0, 0)
        return withUnsafeMutableBytes(of: &aadESN) { buf -> R in
            let p = buf.baseAddress!
            p.storeBytes(of: esp.loadUnaligned(fromByteOffset: 0, as: UInt32.self), toByteOffset: 0, as: UInt32.self)
            p.storeBE32(hi, at: 4)
            p.storeBytes(of: esp.loadUnaligned(fromByteOffset: 4, as: UInt32.self), toByteOffset: 8, as: UInt32.self)
            return body(iv, UnsafeRawPointer(p), 12, payload, tag)
        }
    }
}

extension AEADLayout {
    /// One seal or open of an ESP packet through a C shim's call `(iv, aad1, aad1Length, aad2, aad2Length, data,
    /// dataLength, tag) -> 1 on success`: the payload is encrypted or decrypted in place, except for GMAC
    /// (`integrityOnly`), where IV ‖ payload is more AAD and nothing is encrypted (RFC 4543 §3.3).
    @inline(__always)
    static func run(
        _ esp: UnsafeMutableRawPointer, _ cryptLength: Int, _ esnHigh: UInt32?, integrityOnly: Bool,
        _ call: (UnsafeRawPointer, UnsafeRawPointer, Int, UnsafeRawPointer?, Int, UnsafeMutableRawPointer?, Int,
                 UnsafeMutableRawPointer) -> Int32
    ) -> Bool {
        Self.withAAD(esp, cryptLength, esnHigh) { iv, aad, aadLength, payload, tag -> Bool in
            let rc = integrityOnly
                ? call(iv, aad, aadLength, iv, 8 + cryptLength, nil, 0, tag)
                : call(iv, aad, aadLength, nil, 0, payload, cryptLength, tag)
            return rc == 1
        }
    }
}

/// The per-packet IV of the AEADs, drawn per SA (≈ seqiv's salt): the sequence number XOR a random salt — unique per
/// packet under the key (XOR with a constant is a bijection), and a key installed again with the same starting
/// sequence number does not repeat the GCM/ChaCha20 nonce.
struct AEADIVSalt {
    let value = UInt64.random(in: .min ... .max)

    @inline(__always)
    func write(_ iv: UnsafeMutableRawPointer, sequence: UInt64) { iv.storeBE64(sequence ^ self.value, at: 0) }
}
