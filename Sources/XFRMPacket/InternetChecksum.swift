/// The Internet checksum (RFC 1071): one's-complement sum of 16-bit big-endian words.
public enum InternetChecksum {
    /// Adds `count` bytes at `p` to a running 32-bit-folded partial sum (no final complement).
    @inline(__always)
    public static func partial(_ p: UnsafeRawPointer, count: Int, initial: UInt64 = 0) -> UInt64 {
        var sum = initial
        var i = 0
        // 32-bit big-endian words into 64-bit accumulators: no carry can be lost for packets below 2^32 words. Four
        // independent accumulators over 16-byte steps let the additions overlap.
        var s1: UInt64 = 0
        var s2: UInt64 = 0
        var s3: UInt64 = 0
        while i + 16 <= count {
            sum &+= UInt64(UInt32(bigEndian: p.loadUnaligned(fromByteOffset: i, as: UInt32.self)))
            s1 &+= UInt64(UInt32(bigEndian: p.loadUnaligned(fromByteOffset: i + 4, as: UInt32.self)))
            s2 &+= UInt64(UInt32(bigEndian: p.loadUnaligned(fromByteOffset: i + 8, as: UInt32.self)))
            s3 &+= UInt64(UInt32(bigEndian: p.loadUnaligned(fromByteOffset: i + 12, as: UInt32.self)))
            i += 16
        }
        sum = sum &+ s1 &+ s2 &+ s3
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
