import XFRMPacket

/// Where ESP sits in a received IP packet (≈ the demux of xfrm4_rcv, xfrm6_rcv and xfrm4_udp_encap_rcv).
public struct ESPPacketInfo: Sendable {
    /// 4 or 6.
    public var ipVersion: UInt8
    /// Outer source and destination addresses.
    public var source: IPAddress
    public var destination: IPAddress
    /// Offset of the IP-level header that carries ESP: the UDP header with NAT-T, else the ESP header itself.
    public var transportOffset: Int
    /// Offset of the ESP header (SPI).
    public var espOffset: Int
    /// Offset of the Next Header/Protocol byte naming ESP or UDP (9 for IPv4).
    public var nextHeaderFieldOffset: Int
    /// ESP arrived in UDP (RFC 3948).
    public var udpEncapsulated: Bool
    /// The SPI and low 32 bits of the sequence number from the wire.
    public var spi: UInt32
    public var sequence: UInt32

    @inline(__always)
    public init(ipVersion: UInt8, source: IPAddress, destination: IPAddress, transportOffset: Int, espOffset: Int,
                nextHeaderFieldOffset: Int, udpEncapsulated: Bool, spi: UInt32, sequence: UInt32) {
        self.ipVersion = ipVersion
        self.source = source
        self.destination = destination
        self.transportOffset = transportOffset
        self.espOffset = espOffset
        self.nextHeaderFieldOffset = nextHeaderFieldOffset
        self.udpEncapsulated = udpEncapsulated
        self.spi = spi
        self.sequence = sequence
    }
}

/// What a received IP packet is, as far as ESP input is concerned.
public enum ESPClassification: Sendable {
    /// An ESP packet (raw or UDP-encapsulated); look its SA up by `info.spi`.
    case esp(ESPPacketInfo)
    /// A UDP packet on the NAT-T port with the non-ESP marker: IKE traffic for the key manager (RFC 3948 §2.2).
    case ike
    /// Not ESP: ordinary traffic for the policy check.
    case notESP
    /// Unusable; carries the drop reason (including `.nattKeepalive`).
    case drop(DropReason)
}

extension ESPClassification {
    /// Classifies an IP packet. Trailing bytes beyond the IP length (link padding) are trimmed from `packet`.
    /// `nattPort` is the UDP port on which ESP-in-UDP is accepted (4500 by default; nil disables NAT-T).
    @inline(__always)
    /// `verifyChecksum: false` skips the IPv4 header checksum of a header the caller verified or wrote itself (the
    /// inner packet of a decapsulation, classified again for nested ESP).
    public static func classify(_ packet: inout PacketBuffer, nattPort: UInt16? = 4500, verifyChecksum: Bool = true)
        -> ESPClassification
    {
        let p = packet.data
        let n = packet.count
        guard n >= 1 else { return .drop(.truncated) }
        let version = p.loadByte(at: 0) >> 4
        var proto: UInt8
        var off: Int
        var nhField: Int
        let src: IPAddress
        let dst: IPAddress
        if version == 4 {
            guard n >= HeaderSize.ipv4Minimum else { return .drop(.truncated) }
            guard let ip = IPv4Header.parse(p, available: n, verifyChecksum: verifyChecksum) else {
                let total = Int(p.loadBE16(at: 2))
                return .drop(total > n ? .truncated : .badIPHeader)
            }
            if ip.totalLength < n { packet.trimBack(n - ip.totalLength) }
            proto = ip.proto
            off = ip.headerLength
            nhField = 9
            src = IPAddress.loadV4(from: p, at: 12)
            dst = IPAddress.loadV4(from: p, at: 16)
            if ip.isFragment && (proto == IPProtocolNumber.esp || proto == IPProtocolNumber.udp) {
                return .drop(.fragmented)
            }
        } else if version == 6 {
            guard n >= HeaderSize.ipv6 else { return .drop(.truncated) }
            guard let ip = IPv6Header.parse(p, available: n) else {
                let total = HeaderSize.ipv6 + Int(p.loadBE16(at: 4))
                return .drop(total > n ? .truncated : .badIPHeader)
            }
            let total = HeaderSize.ipv6 + ip.payloadLength
            if total < n { packet.trimBack(n - total) }
            proto = ip.upperProtocol
            off = ip.upperOffset
            nhField = ip.nextHeaderFieldOffset
            src = IPAddress.loadV6(from: p, at: 8)
            dst = IPAddress.loadV6(from: p, at: 24)
            if ip.isFragment && (proto == IPProtocolNumber.esp || proto == IPProtocolNumber.udp) {
                return .drop(.fragmented)
            }
        } else {
            return .drop(.badIPHeader)
        }
        let length = packet.count
        var udp = false
        let transport = off
        if proto == IPProtocolNumber.udp {
            guard let port = nattPort else { return .notESP }
            guard off + HeaderSize.udp <= length else { return .drop(.truncated) }
            guard p.loadBE16(at: off + 2) == port else { return .notESP }
            let udpLength = Int(p.loadBE16(at: off + 4))
            guard udpLength >= HeaderSize.udp, off + udpLength <= length else { return .drop(.truncated) }
            // ESP ends where the UDP datagram does (≈ the pskb_trim_rcsum to the UDP length in udp_rcv): bytes
            // behind it inside the IP packet are not ESP and must not reach the ICV or the trailer.
            if off + udpLength < length { packet.trimBack(length - off - udpLength) }
            let payload = udpLength - HeaderSize.udp
            let body = off + HeaderSize.udp
            if payload == 1 && p.loadByte(at: body) == 0xff { return .drop(.nattKeepalive) }
            if payload >= 4 && p.loadBE32(at: body) == 0 { return .ike }
            off = body
            udp = true
        } else if proto != IPProtocolNumber.esp {
            return .notESP
        }
        guard off + 8 <= packet.count else { return .drop(.truncated) }
        return .esp(
            ESPPacketInfo(
                ipVersion: version, source: src, destination: dst, transportOffset: transport, espOffset: off,
                nextHeaderFieldOffset: nhField, udpEncapsulated: udp, spi: p.loadBE32(at: off),
                sequence: p.loadBE32(at: off + 4)))
    }

    /// Whether `classify(_:nattPort:verifyChecksum: false)` would answer `.notESP` for this packet and leave it as it
    /// is, decided from the IPv4 protocol alone: a 20-byte header whose total length is the packet's, carrying
    /// neither ESP nor UDP, or unfragmented UDP not to the NAT-T port. For the inner packet of a decapsulation, whose
    /// header the transform has verified (the common case of nested-ESP detection); false means "ask `classify`",
    /// never "is ESP".
    @inline(__always)
    public static func isPlainIPv4(_ packet: PacketBuffer, nattPort: UInt16?) -> Bool {
        let p = packet.data
        let n = packet.count
        guard n >= HeaderSize.ipv4Minimum, p.loadByte(at: 0) == 0x45, Int(p.loadBE16(at: 2)) == n else { return false }
        let proto = p.loadByte(at: 9)
        if proto == IPProtocolNumber.esp { return false }
        if proto != IPProtocolNumber.udp { return true }
        // UDP: a fragment is classify's drop; to the NAT-T port it may be ESP, IKE or a keepalive.
        guard p.loadBE16(at: 6) & 0x3fff == 0 else { return false }
        guard let port = nattPort else { return true }
        return n >= HeaderSize.ipv4Minimum + HeaderSize.udp && p.loadBE16(at: 22) != port
    }
}
