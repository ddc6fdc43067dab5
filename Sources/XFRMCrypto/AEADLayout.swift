import XFRMPacket

/// Where the pieces of an AEAD ESP packet are, and its additional authenticated data, for every backend
/// (RFC 4106 §5, RFC 7634 §2.1, RFC 4543 §3.3): the AAD is SPI || seq (8 bytes), or SPI || seq-hi || seq-lo
/// (12 bytes) with ESN; GMAC also authenticates IV || payload and encrypts nothing.
enum AEADLayout {
    /// Calls `body(aad, aadLength)` with the AAD: the packet's own SPI ‖ seq, or built on the stack when ESN needs
    /// the high half between them.
    @inline(__always)
    static func withAAD<R>(
        _ esp: UnsafeMutableRawPointer, _ esnHigh: UInt32?, _ body: (UnsafeRawPointer, Int) -> R
    ) -> R {
        guard let hi = esnHigh else { return body(UnsafeRawPointer(esp), 8) }
        var aadESN: (UInt32, UInt32, UInt32) = (0, 0, 0)
        return withUnsafeMutableBytes(of: &aadESN) { buf -> R in
            let p = buf.baseAddress!
            p.storeBytes(of: esp.loadUnaligned(fromByteOffset: 0, as: UInt32.self), toByteOffset: 0, as: UInt32.self)
            p.storeBE32(hi, at: 4)
            p.storeBytes(of: esp.loadUnaligned(fromByteOffset: 4, as: UInt32.self), toByteOffset: 8, as: UInt32.self)
            return body(UnsafeRawPointer(p), 12)
        }
    }
}

extension AEADLayout {
    /// One seal or open of an ESP packet through a C shim's call `(esp, cryptLength, aad, aadLength, integrityOnly)
    /// -> 1 on success`, which finds the IV, payload and ICV from the ESP layout: the payload is encrypted or
    /// decrypted in place, except for GMAC (`integrityOnly`), where IV ‖ payload is more AAD and nothing is
    /// encrypted (RFC 4543 §3.3).
    @inline(__always)
    static func run(
        _ esp: UnsafeMutableRawPointer, _ cryptLength: Int, _ esnHigh: UInt32?, integrityOnly: Bool,
        _ call: (UnsafeMutableRawPointer, Int, UnsafeRawPointer, Int, Int32) -> Int32
    ) -> Bool {
        Self.withAAD(esp, esnHigh) { aad, aadLength -> Bool in
            call(esp, cryptLength, aad, aadLength, integrityOnly ? 1 : 0) == 1
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
