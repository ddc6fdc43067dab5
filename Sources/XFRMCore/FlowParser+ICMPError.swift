import XFRMPacket

extension Flow {
    /// Whether this flow is an ICMP or ICMPv6 error (≈ icmp_err_packet: destination unreachable, source quench,
    /// time exceeded, parameter problem; for ICMPv6 also packet too big). Its type is in `sourcePort`.
    @inline(__always)
    public var isICMPError: Bool {
        switch self.proto {
        case IPProtocolNumber.icmp: [3, 4, 11, 12].contains(self.sourcePort)
        case IPProtocolNumber.icmpv6: (1...4).contains(self.sourcePort)
        default: false
        }
    }

    /// The flow of the packet an ICMP error quotes, reversed — the direction the error travels back along
    /// (≈ xfrm_icmp_flow_decode: xfrm_decode_session_reverse of what follows the ICMP header, with the error's own
    /// mark and interface). The quote is usually cut short, so its header's total length is not required to fit.
    /// Nil when `self` is not an ICMP error of the packet's family or the quote is not a whole IP header of it.
    public func quotedReverse(_ p: UnsafeMutableRawPointer, count n: Int) -> Flow? {
        guard self.isICMPError else { return nil }
        let v4 = self.version == 4
        // Where the ICMP header starts: after the IPv4 header, or after the IPv6 extension headers.
        let icmpAt: Int
        if v4 {
            icmpAt = Int(p.loadByte(at: 0) & 0x0f) * 4
        } else {
            guard let ip = IPv6Header.parse(p, available: n) else { return nil }
            icmpAt = ip.upperOffset
        }
        let q = icmpAt + 8
        var proto: UInt8
        var off: Int
        var fragment: Bool
        var flow: Flow
        if v4 {
            guard q + HeaderSize.ipv4Minimum <= n, p.loadByte(at: q) >> 4 == 4 else { return nil }
            let ihl = Int(p.loadByte(at: q) & 0x0f) * 4
            guard ihl >= HeaderSize.ipv4Minimum else { return nil }
            proto = p.loadByte(at: q + 9)
            off = q + ihl
            fragment = p.loadBE16(at: q + 6) & (IPv4Header.flagMF | IPv4Header.fragmentOffsetMask) != 0
            flow = Flow(source: .loadV4(from: p, at: q + 16), destination: .loadV4(from: p, at: q + 12), proto: proto,
                        mark: self.mark, ifindex: self.ifindex, ifID: self.ifID)
        } else {
            guard q + HeaderSize.ipv6 <= n, p.loadByte(at: q) >> 4 == 6 else { return nil }
            proto = p.loadByte(at: q + 6)
            off = q + HeaderSize.ipv6
            fragment = false
            var hops = 0
            while IPv6Header.isExtensionHeader(proto), hops < 16, off + 8 <= n {
                hops += 1
                if proto == IPProtocolNumber.fragment {
                    if p.loadBE16(at: off + 2) & 0xfff9 != 0 { fragment = true }
                    proto = p.loadByte(at: off)
                    off += 8
                } else {
                    let len = (Int(p.loadByte(at: off + 1)) + 1) * 8
                    proto = p.loadByte(at: off)
                    off += len
                }
            }
            guard !IPv6Header.isExtensionHeader(proto) else { return nil }
            flow = Flow(source: .loadV6(from: p, at: q + 24), destination: .loadV6(from: p, at: q + 8), proto: proto,
                        mark: self.mark, ifindex: self.ifindex, ifID: self.ifID)
        }
        guard !fragment else { return flow }
        flow.readPorts(p, proto: proto, at: off, end: n, version: v4 ? 4 : 6, reversed: true)
        return flow
    }
}
