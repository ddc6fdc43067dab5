import CXFRMChecksum

/// The Internet checksum (RFC 1071): one's-complement sum of 16-bit big-endian words.
public enum InternetChecksum {
    /// From this many bytes on, the sum is taken by `xfrm_checksum_sum` (C, AVX2 where the CPU has it): below, the
    /// inlined loop costs less than the call.
    public static let bulkThreshold = 256

    /// Adds `count` bytes at `p` to a running partial sum of big-endian 16-bit words (no final complement).
    @inline(__always)
    public static func partial(_ p: UnsafeRawPointer, count: Int, initial: UInt64 = 0) -> UInt64 {
        if count >= Self.bulkThreshold { return initial &+ UInt64(xfrm_checksum_sum(p, count)) }
        return Self.inlinePartial(p, count: count, initial: initial)
    }

    /// `partial` without the bulk path (every length: the reference the tests compare the bulk sum with).
    @inline(__always)
    public static func inlinePartial(_ p: UnsafeRawPointer, count: Int, initial: UInt64 = 0) -> UInt64 {
        var i = 0
        var sum = initial
        if count >= 32 {
            // The ones'-complement sum does not depend on byte order (RFC 1071 §2(B)): whole 16-byte blocks are
            // summed as native 64-bit words, each overflow an end-around carry (2^64 ≡ 1), in two independent
            // chains; the block sum, folded to 16 bits, is byte-swapped into the big-endian sum. Half the
            // additions of 32-bit big-endian words, and no byte swaps.
            var a: UInt64 = 0
            var b: UInt64 = 0
            var carries: UInt64 = 0
            while i + 16 <= count {
                let (x, ox) = a.addingReportingOverflow(p.loadUnaligned(fromByteOffset: i, as: UInt64.self))
                let (y, oy) = b.addingReportingOverflow(p.loadUnaligned(fromByteOffset: i + 8, as: UInt64.self))
                a = x
                b = y
                carries &+= (ox ? 1 : 0) &+ (oy ? 1 : 0)
                i += 16
            }
            let (ab, oab) = a.addingReportingOverflow(b)
            var s = (ab & 0xffff_ffff) &+ (ab >> 32) &+ carries &+ (oab ? 1 : 0)
            s = (s & 0xffff_ffff) &+ (s >> 32)
            s = (s & 0xffff) &+ (s >> 16)
            s = (s & 0xffff) &+ (s >> 16)
            s = (s & 0xffff) &+ (s >> 16)
            sum &+= UInt64(UInt16(truncatingIfNeeded: s).byteSwapped)
        }
        while i + 4 <= count {
            sum &+= UInt64(UInt32(bigEndian: p.loadUnaligned(fromByteOffset: i, as: UInt32.self)))
            i += 4
        }
        if i + 2 <= count {
            sum &+= UInt64(UInt16(bigEndian: p.loadUnaligned(fromByteOffset: i, as: UInt16.self)))
            i += 2
        }
        if i < count {
            sum &+= UInt64(p.load(fromByteOffset: i, as: UInt8.self)) << 8
        }
        return sum
    }

    /// Folds a partial sum to 16 bits and complements it: the value to store in a checksum field.
    @inline(__always)
    public static func finish(_ partial: UInt64) -> UInt16 {
        var s = partial
        s = (s & 0xffff_ffff) &+ (s >> 32)
        s = (s & 0xffff_ffff) &+ (s >> 32)
        s = (s & 0xffff) &+ (s >> 16)
        s = (s & 0xffff) &+ (s >> 16)
        s = (s & 0xffff) &+ (s >> 16)
        return ~UInt16(truncatingIfNeeded: s)
    }

    /// The checksum of `count` bytes at `p`.
    @inline(__always)
    public static func compute(_ p: UnsafeRawPointer, count: Int) -> UInt16 {
        finish(partial(p, count: count))
    }

    /// The checksum of a byte array (tests and tools).
    public static func compute(_ bytes: [UInt8]) -> UInt16 {
        bytes.withUnsafeBytes { compute($0.baseAddress ?? UnsafeRawPointer(bitPattern: 1)!, count: $0.count) }
    }
}
