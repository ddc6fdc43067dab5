// Byte-level codec for XFRM netlink messages: host-order integers (netlink is native-endian; these machines are
// little-endian), network-order fields where the uapi says __be16/__be32, 4-byte attribute alignment.

/// Appends fixed-layout fields to a byte array.
public struct WireWriter {
    public private(set) var bytes: [UInt8] = []
    public init() {}

    public mutating func u8(_ v: UInt8) { self.bytes.append(v) }
    public mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { self.bytes += $0 } }
    public mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { self.bytes += $0 } }
    public mutating func i32(_ v: Int32) { self.u32(UInt32(bitPattern: v)) }
    public mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { self.bytes += $0 } }
    public mutating func be16(_ v: UInt16) { withUnsafeBytes(of: v.bigEndian) { self.bytes += $0 } }
    public mutating func be32(_ v: UInt32) { withUnsafeBytes(of: v.bigEndian) { self.bytes += $0 } }
    public mutating func raw(_ v: [UInt8]) { self.bytes += v }
    public mutating func zeros(_ n: Int) { self.bytes += [UInt8](repeating: 0, count: n) }
    /// Pads with zeros to a multiple of `alignment`.
    public mutating func align(_ alignment: Int) {
        while self.bytes.count % alignment != 0 { self.bytes.append(0) }
    }
    /// A fixed-size, NUL-padded string field.
    public mutating func cString(_ s: String, size: Int) {
        var b = Array(s.utf8.prefix(size - 1))
        b += [UInt8](repeating: 0, count: size - b.count)
        self.bytes += b
    }
}

/// A decoding error: what was short or malformed, and where.
public struct WireError: Error, CustomStringConvertible, Equatable {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// Reads fixed-layout fields from a byte array.
public struct WireReader {
    public let bytes: [UInt8]
    public private(set) var offset: Int
    public init(_ bytes: [UInt8], offset: Int = 0) {
        self.bytes = bytes
        self.offset = offset
    }

    public var remaining: Int { self.bytes.count - self.offset }

    mutating func take(_ n: Int, _ what: String) throws(WireError) -> ArraySlice<UInt8> {
        guard n >= 0, self.offset + n <= self.bytes.count else {
            throw WireError("\(what): needs \(n) bytes at offset \(self.offset), message has \(self.bytes.count)")
        }
        defer { self.offset += n }
        return self.bytes[self.offset..<(self.offset + n)]
    }

    private static func le(_ s: ArraySlice<UInt8>) -> UInt64 {
        var v: UInt64 = 0
        for (i, b) in s.enumerated() { v |= UInt64(b) << (8 * UInt64(i)) }
        return v
    }

    private static func be(_ s: ArraySlice<UInt8>) -> UInt64 {
        s.reduce(0) { $0 << 8 | UInt64($1) }
    }

    public mutating func u8(_ what: String = "u8") throws(WireError) -> UInt8 { try self.take(1, what).first! }
    public mutating func u16(_ what: String = "u16") throws(WireError) -> UInt16 {
        UInt16(Self.le(try self.take(2, what)))
    }
    public mutating func u32(_ what: String = "u32") throws(WireError) -> UInt32 {
        UInt32(Self.le(try self.take(4, what)))
    }
    public mutating func i32(_ what: String = "i32") throws(WireError) -> Int32 {
        Int32(bitPattern: try self.u32(what))
    }
    public mutating func u64(_ what: String = "u64") throws(WireError) -> UInt64 { Self.le(try self.take(8, what)) }
    public mutating func be16(_ what: String = "be16") throws(WireError) -> UInt16 {
        UInt16(Self.be(try self.take(2, what)))
    }
    public mutating func be32(_ what: String = "be32") throws(WireError) -> UInt32 {
        UInt32(Self.be(try self.take(4, what)))
    }
    public mutating func raw(_ n: Int, _ what: String = "bytes") throws(WireError) -> [UInt8] {
        Array(try self.take(n, what))
    }
    public mutating func skip(_ n: Int, _ what: String = "padding") throws(WireError) { _ = try self.take(n, what) }
    public mutating func cString(size: Int, _ what: String = "string") throws(WireError) -> String {
        let b = try self.take(size, what)
        return String(decoding: b.prefix { $0 != 0 }, as: UTF8.self)
    }
}
