/// An IPv4 or IPv6 address (≈ xfrm_address_t plus its family).
public enum IPAddress: Hashable, Sendable, CustomStringConvertible {
    case v4(UInt32)
    case v6(UInt64, UInt64)

    /// The IP version: 4 or 6.
    public var version: Int {
        switch self {
        case .v4: 4
        case .v6: 6
        }
    }

    /// 0.0.0.0 or :: (an SA's wildcard source, a template's "any").
    @inline(__always)
    public var isUnspecified: Bool {
        switch self {
        case .v4(let a): a == 0
        case .v6(let h, let l): h == 0 && l == 0
        }
    }

    /// Parses dotted-quad IPv4 or RFC 4291 text IPv6 (with `::` and an optional trailing dotted quad).
    public init?(_ text: some StringProtocol) {
        if text.contains(":") {
            guard let v6 = IPAddress.parseV6(Substring(text)) else { return nil }
            self = v6
        } else {
            guard let v4 = IPAddress.parseV4(Substring(text)) else { return nil }
            self = .v4(v4)
        }
    }

    private static func parseV4(_ s: Substring) -> UInt32? {
        let parts = s.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { return nil }
        var value: UInt32 = 0
        for p in parts {
            guard !p.isEmpty, p.count <= 3, p.allSatisfy(\.isASCII), let b = UInt8(p) else { return nil }
            if p.count > 1 && p.first == "0" { return nil }
            value = value << 8 | UInt32(b)
        }
        return value
    }

    private static func parseV6(_ s: Substring) -> IPAddress? {
        var groups: [UInt16] = []
        var tail: [UInt16] = []
        var sawGap = false
        let halves = s.components(separatedBy: "::")
        guard halves.count <= 2 else { return nil }
        func parseGroups(_ part: String, allowV4: Bool) -> [UInt16]? {
            if part.isEmpty { return [] }
            var out: [UInt16] = []
            let fields = part.split(separator: ":", omittingEmptySubsequences: false)
            for (i, f) in fields.enumerated() {
                if allowV4 && i == fields.count - 1 && f.contains(".") {
                    guard let v4 = parseV4(f) else { return nil }
                    out.append(UInt16(v4 >> 16))
                    out.append(UInt16(v4 & 0xffff))
                } else {
                    guard !f.isEmpty, f.count <= 4, let g = UInt16(f, radix: 16) else { return nil }
                    out.append(g)
                }
            }
            return out
        }
        if halves.count == 2 {
            sawGap = true
            guard let a = parseGroups(halves[0], allowV4: false), let b = parseGroups(halves[1], allowV4: true)
            else { return nil }
            groups = a
            tail = b
            guard groups.count + tail.count <= 7 else { return nil }
        } else {
            guard let a = parseGroups(halves[0], allowV4: true), a.count == 8 else { return nil }
            groups = a
        }
        if sawGap {
            groups += [UInt16](repeating: 0, count: 8 - groups.count - tail.count) + tail
        }
        var hi: UInt64 = 0
        var lo: UInt64 = 0
        for i in 0..<4 { hi = hi << 16 | UInt64(groups[i]) }
        for i in 4..<8 { lo = lo << 16 | UInt64(groups[i]) }
        return .v6(hi, lo)
    }

    /// Text form: dotted quad, or RFC 5952 canonical IPv6 (longest zero run compressed, lower case).
    public var description: String {
        switch self {
        case .v4(let a):
            return "\(a >> 24).\(a >> 16 & 0xff).\(a >> 8 & 0xff).\(a & 0xff)"
        case .v6(let hi, let lo):
            var g = [UInt16](repeating: 0, count: 8)
            for i in 0..<4 { g[i] = UInt16(truncatingIfNeeded: hi >> (48 - 16 * UInt64(i))) }
            for i in 0..<4 { g[4 + i] = UInt16(truncatingIfNeeded: lo >> (48 - 16 * UInt64(i))) }
            var bestStart = -1
            var bestLen = 0
            var i = 0
            while i < 8 {
                if g[i] == 0 {
                    var j = i
                    while j < 8 && g[j] == 0 { j += 1 }
                    if j - i > bestLen && j - i >= 2 {
                        bestStart = i
                        bestLen = j - i
                    }
                    i = j
                } else {
                    i += 1
                }
            }
            func hex(_ r: Range<Int>) -> String { r.map { String(g[$0], radix: 16) }.joined(separator: ":") }
            if bestStart < 0 { return hex(0..<8) }
            return hex(0..<bestStart) + "::" + hex((bestStart + bestLen)..<8)
        }
    }

    /// Writes the address in network order (4 or 16 bytes).
    @inline(__always)
    public func store(to p: UnsafeMutableRawPointer, at offset: Int) {
        switch self {
        case .v4(let a):
            p.storeBE32(a, at: offset)
        case .v6(let hi, let lo):
            p.storeBE64(hi, at: offset)
            p.storeBE64(lo, at: offset + 8)
        }
    }

    /// Reads an IPv4 address in network order.
    @inline(__always)
    public static func loadV4(from p: UnsafeMutableRawPointer, at offset: Int) -> IPAddress {
        .v4(p.loadBE32(at: offset))
    }

    /// Reads an IPv6 address in network order.
    @inline(__always)
    public static func loadV6(from p: UnsafeMutableRawPointer, at offset: Int) -> IPAddress {
        .v6(p.loadBE64(at: offset), p.loadBE64(at: offset + 8))
    }

    /// The address bytes in network order.
    public var bytes: [UInt8] {
        var out = [UInt8](repeating: 0, count: self.version == 4 ? 4 : 16)
        out.withUnsafeMutableBytes { self.store(to: $0.baseAddress!, at: 0) }
        return out
    }
}
