import XFRMPacket

extension Flow {
    /// Reads the flow of an IP packet (≈ the kernel's decode_session): addresses, upper protocol and ports, or ICMP
    /// type/code in the port fields. Nil when the IP header is malformed.
    @inline(__always)
    public static func parse(_ p: UnsafeMutableRawPointer, count n: Int, mark: UInt32 = 0, ifindex: Int32 = 0) -> Flow? {
        guard n >= 1 else { return nil }
        let version = p.loadByte(at: 0) >> 4
        var proto: UInt8
        var off: Int
        var end: Int
        var fragment = false
        var flow: Flow
        if version == 4 {
            guard let ip = IPv4Header.parse(p, available: n) else { return nil }
            proto = ip.proto
            off = ip.headerLength
            end = ip.totalLength
            fragment = p.loadBE16(at: 6) & IPv4Header.fragmentOffsetMask != 0
            flow = Flow(source: .loadV4(from: p, at: 12), destination: .loadV4(from: p, at: 16), proto: proto,
                        mark: mark, ifindex: ifindex)
        } else if version == 6 {
            guard let ip = IPv6Header.parse(p, available: n) else { return nil }
            proto = ip.upperProtocol
            off = ip.upperOffset
            end = HeaderSize.ipv6 + ip.payloadLength
            fragment = ip.isFragment
            flow = Flow(source: .loadV6(from: p, at: 8), destination: .loadV6(from: p, at: 24), proto: proto,
                        mark: mark, ifindex: ifindex)
        } else {
            return nil
        }
        guard !fragment else { return flow }  // non-first fragments carry no ports
        switch proto {
        case IPProtocolNumber.tcp, IPProtocolNumber.udp, 132, 33:  // TCP, UDP, SCTP, DCCP
            if off + 4 <= end {
                flow.sourcePort = p.loadBE16(at: off)
                flow.destinationPort = p.loadBE16(at: off + 2)
            }
        case IPProtocolNumber.icmp, IPProtocolNumber.icmpv6:
            if off + 2 <= end {
                flow.sourcePort = UInt16(p.loadByte(at: off))
                flow.destinationPort = UInt16(p.loadByte(at: off + 1))
            }
        default:
            break
        }
        return flow
    }
}
