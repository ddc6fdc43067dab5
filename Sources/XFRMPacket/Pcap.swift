import Foundation

/// Classic libpcap files (not pcapng): the link types the tools read and write.
public enum PcapLinkType: UInt32, Sendable {
    case ethernet = 1
    case raw = 101  // LINKTYPE_RAW: each record is an IPv4 or IPv6 packet
    case ipv4 = 228
    case ipv6 = 229
}

/// An error reading or writing a pcap file, with a message naming what was wrong.
public struct PcapError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// Reads every record of a classic pcap file and returns the IP packets (Ethernet frames are stripped of their
/// 14-byte header, and of 802.1Q tags; non-IP frames are skipped).
public func readPcapIPPackets(path: String) throws(PcapError) -> [[UInt8]] {
    guard let data = FileManager.default.contents(atPath: path) else { throw PcapError("\(path): cannot read file") }
    return try parsePcapIPPackets([UInt8](data), name: path)
}

/// `readPcapIPPackets` on a file's bytes (`name` prefixes the errors): any bytes give packets or a PcapError.
public func parsePcapIPPackets(_ bytes: [UInt8], name path: String) throws(PcapError) -> [[UInt8]] {
    guard bytes.count >= 24 else { throw PcapError("\(path): too short for a pcap header") }
    let magic = UInt32(bytes[0]) | UInt32(bytes[1]) << 8 | UInt32(bytes[2]) << 16 | UInt32(bytes[3]) << 24
    let little: Bool
    switch magic {
    case 0xa1b2_c3d4, 0xa1b2_3c4d: little = true
    case 0xd4c3_b2a1, 0x4d3c_b2a1: little = false
    default: throw PcapError("\(path): not a classic pcap file (pcapng is not supported)")
    }
    func u32(_ o: Int) -> UInt32 {
        let a = UInt32(bytes[o]), b = UInt32(bytes[o + 1]), c = UInt32(bytes[o + 2]), d = UInt32(bytes[o + 3])
        return little ? (a | b << 8 | c << 16 | d << 24) : (d | c << 8 | b << 16 | a << 24)
    }
    guard let link = PcapLinkType(rawValue: u32(20) & 0x0fff_ffff) else {
        throw PcapError("\(path): unsupported link type \(u32(20)) (expected Ethernet or raw IP)")
    }
    var out: [[UInt8]] = []
    var off = 24
    while off + 16 <= bytes.count {
        let incl = Int(u32(off + 8))
        off += 16
        guard off + incl <= bytes.count else { throw PcapError("\(path): truncated record at byte \(off - 16)") }
        var frame = Array(bytes[off..<(off + incl)])
        off += incl
        if link == .ethernet {
            guard frame.count >= 14 else { continue }
            var etherType = UInt16(frame[12]) << 8 | UInt16(frame[13])
            var hdr = 14
            while etherType == 0x8100 || etherType == 0x88a8, frame.count >= hdr + 4 {
                etherType = UInt16(frame[hdr + 2]) << 8 | UInt16(frame[hdr + 3])
                hdr += 4
            }
            guard etherType == 0x0800 || etherType == 0x86dd else { continue }
            frame = Array(frame[hdr...])
        }
        out.append(frame)
    }
    return out
}

/// Writes IP packets to a classic pcap file with LINKTYPE_RAW.
public func writePcapIPPackets(_ packets: [[UInt8]], path: String) throws(PcapError) {
    guard FileManager.default.createFile(atPath: path, contents: Data(pcapFileBytes(packets))) else {
        throw PcapError("\(path): cannot write file")
    }
}

/// The bytes of a classic pcap file (LINKTYPE_RAW) holding `packets`, as `writePcapIPPackets` writes it.
public func pcapFileBytes(_ packets: [[UInt8]]) -> [UInt8] {
    var out: [UInt8] = []
    func put32(_ v: UInt32) { out += [UInt8(v & 0xff), UInt8(v >> 8 & 0xff), UInt8(v >> 16 & 0xff), UInt8(v >> 24)] }
    func put16(_ v: UInt16) { out += [UInt8(v & 0xff), UInt8(v >> 8)] }
    put32(0xa1b2_c3d4)
    put16(2)
    put16(4)
    put32(0)
    put32(0)
    put32(65535)
    put32(PcapLinkType.raw.rawValue)
    for (i, p) in packets.enumerated() {
        put32(UInt32(1_700_000_000 + i))
        put32(0)
        put32(UInt32(p.count))
        put32(UInt32(p.count))
        out += p
    }
    return out
}
