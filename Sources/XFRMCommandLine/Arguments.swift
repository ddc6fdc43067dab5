// The argv cursor and the value parsers the ip-xfrm grammar is built from (≈ iproute2's utils.c: NEXT_ARG, get_u32,
// get_prefix, invarg, ...). Behaviour is restated from iproute2 so that the same command line is accepted or refused
// with the same words.

import XFRMWire

// MARK: - Errors with iproute2's wording

extension CommandError {
    /// `invarg()`: `Error: argument "ARG" is wrong: MSG`.
    static func invalid(_ message: String, _ argument: String) -> CommandError {
        CommandError("Error: argument \"\(argument)\" is wrong: \(message)")
    }
    /// `missarg()`.
    static func missing(_ key: String) -> CommandError {
        CommandError("Error: argument \"\(key)\" is required")
    }
    /// `duparg()`.
    static func duplicate(_ key: String, _ argument: String) -> CommandError {
        CommandError("Error: duplicate \"\(key)\": \"\(argument)\" is the second value.")
    }
    /// `duparg2()`.
    static func duplicateOrGarbage(_ key: String, _ argument: String) -> CommandError {
        CommandError("Error: either \"\(key)\" is duplicate, or \"\(argument)\" is garbage.")
    }
    /// `incomplete_command()`.
    static var incomplete: CommandError { CommandError("Command line is not complete. Try option \"help\"") }
}

// MARK: - argv cursor

/// argc/argv over the whole command line, so that backing up past the first argument of a sub-command lands on the
/// sub-command word as it does in C (iproute2 quotes that word in a few error messages).
struct Args {
    let argv: [String]
    var index: Int

    init(_ argv: [String], start: Int) {
        self.argv = argv
        self.index = start
    }

    /// argc: the words left, counting the current one.
    var argc: Int { self.argv.count - self.index }
    /// *argv.
    var current: String { self.index >= 0 && self.index < self.argv.count ? self.argv[self.index] : "" }
    /// NEXT_ARG(): step on, or stop with "Command line is not complete".
    mutating func next() throws(CommandError) {
        self.index += 1
        if self.argc <= 0 { throw .incomplete }
    }
    /// NEXT_ARG_OK().
    var nextOK: Bool { self.argc - 1 > 0 }
    /// PREV_ARG().
    mutating func back() { self.index -= 1 }
    /// The loop step `argc--; argv++`.
    mutating func advance() { self.index += 1 }
}

/// iproute2's `matches()`: `word` is a non-empty prefix of `keyword`.
func matches(_ word: String, _ keyword: String) -> Bool {
    !word.isEmpty && keyword.hasPrefix(word)
}

// MARK: - Numbers (strtoul semantics)

/// What C's strtoul/strtoull does with `text`: the value (wrapped for a leading '-'), how many bytes it consumed
/// (0 when there were no digits) and whether it overflowed (ERANGE).
func cStrtoul(_ text: String, base: Int) -> (value: UInt64, consumed: Int, overflow: Bool) {
    let b = Array(text.utf8)
    var i = 0
    while i < b.count, b[i] == 0x20 || (b[i] >= 0x09 && b[i] <= 0x0d) { i += 1 }
    var negative = false
    if i < b.count, b[i] == UInt8(ascii: "+") || b[i] == UInt8(ascii: "-") {
        negative = b[i] == UInt8(ascii: "-")
        i += 1
    }
    func digit(_ c: UInt8) -> Int? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): Int(c - UInt8(ascii: "0"))
        case UInt8(ascii: "a")...UInt8(ascii: "z"): Int(c - UInt8(ascii: "a")) + 10
        case UInt8(ascii: "A")...UInt8(ascii: "Z"): Int(c - UInt8(ascii: "A")) + 10
        default: nil
        }
    }
    var radix = base
    let hexPrefix = i + 2 < b.count && b[i] == UInt8(ascii: "0")
        && (b[i + 1] == UInt8(ascii: "x") || b[i + 1] == UInt8(ascii: "X"))
        && (digit(b[i + 2]).map { $0 < 16 } ?? false)
    if radix == 0 {
        if hexPrefix {
            radix = 16
            i += 2
        } else if i < b.count, b[i] == UInt8(ascii: "0") {
            radix = 8
        } else {
            radix = 10
        }
    } else if radix == 16, hexPrefix {
        i += 2
    }
    let start = i
    var value: UInt64 = 0
    var overflow = false
    while i < b.count, let d = digit(b[i]), d < radix {
        let (m, o1) = value.multipliedReportingOverflow(by: UInt64(radix))
        let (s, o2) = m.addingReportingOverflow(UInt64(d))
        if o1 || o2 { overflow = true }
        value = s
        i += 1
    }
    if i == start { return (0, 0, false) }
    if overflow { return (UInt64.max, i, true) }
    return (negative ? 0 &- value : value, i, false)
}

/// get_u64/get_u32/get_u16/get_u8/get_unsigned: the whole word must be a number no larger than `max`.
func cParseUnsigned(_ text: String, base: Int, max: UInt64) -> UInt64? {
    if text.isEmpty { return nil }
    let r = cStrtoul(text, base: base)
    guard r.consumed > 0, r.consumed == text.utf8.count, !r.overflow, r.value <= max else { return nil }
    return r.value
}

func getU64(_ text: String, base: Int = 0) -> UInt64? { cParseUnsigned(text, base: base, max: .max) }
func getU32(_ text: String, base: Int = 0) -> UInt32? { cParseUnsigned(text, base: base, max: 0xffff_ffff).map { UInt32($0) } }
func getU16(_ text: String, base: Int = 0) -> UInt16? { cParseUnsigned(text, base: base, max: 0xffff).map { UInt16($0) } }
func getU8(_ text: String, base: Int = 0) -> UInt8? { cParseUnsigned(text, base: base, max: 0xff).map { UInt8($0) } }

// MARK: - Addresses (inet_prefix)

/// iproute2's inet_prefix: a family, the address bytes (16, zero-filled) and the prefix length in bits.
struct InetPrefix {
    var family: UInt16 = AddressFamily.unspec
    var bytelen = 0
    var bitlen = 0
    var data = [UInt8](repeating: 0, count: 16)
    var address: XfrmAddress { XfrmAddress(bytes: self.data) }
}

/// The legacy IPv4 text form iproute2 accepts: 1-4 dot-separated numbers, each in C notation (0x.., 0..), missing
/// trailing parts zero ("10.8" is 10.8.0.0).
private func parseIPv4Legacy(_ text: String) -> [UInt8]? {
    var out = [UInt8](repeating: 0, count: 4)
    var rest = Array(text.utf8)
    for i in 0..<4 {
        let r = cStrtoul(String(decoding: rest, as: UTF8.self), base: 0)
        if r.consumed == 0 || r.value > 255 || r.overflow { return nil }
        out[i] = UInt8(r.value)
        if r.consumed == rest.count { return out }
        if i == 3 || rest[r.consumed] != UInt8(ascii: ".") { return nil }
        rest = Array(rest[(r.consumed + 1)...])
    }
    return out
}

/// inet_pton(AF_INET, ...): exactly four decimal octets, no leading zeros.
func parseIPv4Strict(_ text: Substring) -> [UInt8]? {
    let parts = text.split(separator: ".", omittingEmptySubsequences: false)
    guard parts.count == 4 else { return nil }
    var out: [UInt8] = []
    for p in parts {
        guard !p.isEmpty, p.count <= 3, p.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }), let v = Int(p), v <= 255
        else { return nil }
        if p.count > 1 && p.first == "0" { return nil }
        out.append(UInt8(v))
    }
    return out
}

/// inet_pton(AF_INET6, ...).
func parseIPv6(_ text: String) -> [UInt8]? {
    let s = Array(text.utf8)
    var words: [UInt16] = []
    var gap: Int? = nil
    var afterGroup = false
    var i = 0
    if s.isEmpty { return nil }
    if s[0] == UInt8(ascii: ":") {
        guard s.count > 1, s[1] == UInt8(ascii: ":") else { return nil }
    }
    func hex(_ c: UInt8) -> UInt16? {
        switch c {
        case 0x30...0x39: UInt16(c - 0x30)
        case 0x61...0x66: UInt16(c - 0x61 + 10)
        case 0x41...0x46: UInt16(c - 0x41 + 10)
        default: nil
        }
    }
    while i < s.count {
        if s[i] == UInt8(ascii: ":") {
            if i + 1 < s.count, s[i + 1] == UInt8(ascii: ":") {
                guard gap == nil else { return nil }
                gap = words.count
                afterGroup = false
                i += 2
                continue
            }
            // a single colon separates two groups: it may not start or end the text, nor follow "::"
            guard afterGroup, i + 1 < s.count else { return nil }
            afterGroup = false
            i += 1
            continue
        }
        // a group, or an embedded dotted quad at the end
        var j = i
        while j < s.count, s[j] != UInt8(ascii: ":") { j += 1 }
        let field = s[i..<j]
        if field.contains(UInt8(ascii: ".")) {
            guard j == s.count, let v4 = parseIPv4Strict(Substring(decoding: field, as: UTF8.self)) else { return nil }
            words.append(UInt16(v4[0]) << 8 | UInt16(v4[1]))
            words.append(UInt16(v4[2]) << 8 | UInt16(v4[3]))
            i = j
            break
        }
        guard field.count >= 1, field.count <= 4 else { return nil }
        var w: UInt16 = 0
        for c in field {
            guard let h = hex(c) else { return nil }
            w = w << 4 | h
        }
        words.append(w)
        afterGroup = true
        i = j
    }
    if let g = gap {
        guard words.count <= 7 else { return nil }
        words.insert(contentsOf: [UInt16](repeating: 0, count: 8 - words.count), at: g)
    }
    guard words.count == 8 else { return nil }
    return words.flatMap { [UInt8($0 >> 8), UInt8($0 & 0xff)] }
}

/// get_addr_1(): "default", "all"/"any", IPv6 (has a ':'), else legacy IPv4; `family` restricts the result.
func getAddr1(_ name: String, family: UInt16) -> InetPrefix? {
    var p = InetPrefix()
    if name == "default" {
        p.family = family
        p.bytelen = family == AddressFamily.inet ? 4 : family == AddressFamily.inet6 ? 16 : 0
        p.bitlen = -2
        return p
    }
    if name == "all" || name == "any" {
        p.family = family
        p.bitlen = -2
        return p
    }
    if name.contains(":") {
        p.family = AddressFamily.inet6
        if family != AddressFamily.unspec && family != AddressFamily.inet6 { return nil }
        guard let b = parseIPv6(name) else { return nil }
        p.data = b
        p.bytelen = 16
        p.bitlen = -1
        return p
    }
    p.family = AddressFamily.inet
    if family != AddressFamily.unspec && family != AddressFamily.inet { return nil }
    guard let b = parseIPv4Legacy(name) else { return nil }
    p.data = b + [UInt8](repeating: 0, count: 12)
    p.bytelen = 4
    p.bitlen = -1
    return p
}

private func familyBitLength(_ family: UInt16) -> Int {
    switch family {
    case AddressFamily.inet6: 128
    case AddressFamily.inet: 32
    default: 0
    }
}

/// get_prefix_1(): ADDR[/PLEN], the length a number or a dotted netmask.
func getPrefix1(_ arg: String, family: UInt16) -> InetPrefix? {
    let slash = arg.firstIndex(of: "/")
    let addrText = slash.map { String(arg[..<$0]) } ?? arg
    guard var p = getAddr1(addrText, family: family) else { return nil }
    var bitlen = familyBitLength(p.family)
    if let slash {
        if p.bitlen == -2 { return nil }
        let lenText = String(arg[arg.index(after: slash)...])
        var plen: UInt32
        if let v = getU32(lenText) {
            plen = v
        } else if let m = getAddr1(lenText, family: AddressFamily.inet), m.family == AddressFamily.inet,
                  let bits = maskToBits(m.data) {
            plen = UInt32(bits)
        } else {
            return nil
        }
        if Int(plen) > bitlen { return nil }
        bitlen = Int(plen)
    } else if p.bitlen == -2 {
        bitlen = 0
    }
    p.bitlen = bitlen
    return p
}

/// mask2bits(): a contiguous netmask's length.
private func maskToBits(_ data: [UInt8]) -> Int? {
    let mask = UInt32(data[0]) << 24 | UInt32(data[1]) << 16 | UInt32(data[2]) << 8 | UInt32(data[3])
    let host = ~mask
    if host & (host &+ 1) != 0 { return nil }
    return mask.nonzeroBitCount
}

private func familyNameVerbose(_ family: UInt16) -> String {
    switch family {
    case AddressFamily.unspec: "any valid"
    case AddressFamily.inet: "inet"
    case AddressFamily.inet6: "inet6"
    default: "???"
    }
}

/// get_prefix(): as get_prefix_1, or stop with iproute2's message.
func getPrefix(_ arg: String, family: UInt16) throws(CommandError) -> InetPrefix {
    guard let p = getPrefix1(arg, family: family) else {
        throw CommandError("Error: \(familyNameVerbose(family)) prefix is expected rather than \"\(arg)\".")
    }
    return p
}

/// get_addr(): an address without a length, or stop with iproute2's message.
func getAddr(_ arg: String, family: UInt16) throws(CommandError) -> InetPrefix {
    guard let p = getAddr1(arg, family: family) else {
        throw CommandError("Error: \(familyNameVerbose(family)) address is expected rather than \"\(arg)\".")
    }
    return p
}

/// get_addr32(): an IPv4 address as a host-order number.
func getAddr32(_ arg: String) throws(CommandError) -> UInt32 {
    guard let p = getAddr1(arg, family: AddressFamily.inet) else {
        throw CommandError("Error: an IP address is expected rather than \"\(arg)\"")
    }
    return UInt32(p.data[0]) << 24 | UInt32(p.data[1]) << 16 | UInt32(p.data[2]) << 8 | UInt32(p.data[3])
}
