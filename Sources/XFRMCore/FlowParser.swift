import XFRMPacket

extension Flow {
    /// Reads the flow of an IP packet (≈ the kernel's decode_session): addresses, upper protocol and ports, or ICMP
    /// type/code in the port fields. Nil when the IP header is malformed. `verifyChecksum: false` skips the IPv4
    /// header checksum of a header the caller verified or wrote itself (a packet it just decapsulated).
    @inline(__always)
    public static func parse(_ p: UnsafeMutableRawPointer, count n: Int, mark: UInt32 = 0, ifindex: Int32 = 0,
                             verifyChecksum: Bool = true) -> Flow? {
        guard n >= 1 else { return nil }
        let version = p.loadByte(at: 0) >> 4
        var proto: UInt8
        var off: Int
        var end: Int
        var fragment = false
        var flow: Flow
        if version == 4 {
            guard let ip = IPv4Header.parse(p, available: n, verifyChecksum: verifyChecksum) else { return nil }
            proto = ip.proto
            off = ip.headerLength
            end = ip.totalLength
            // Any fragment, the first included (MF set): the kernel's flow dissector, called without
            // FLOW_DISSECTOR_F_PARSE_1ST_FRAG by __xfrm_decode_session, reads no ports from one (ip_is_fragment).
            fragment = p.loadBE16(at: 6) & (IPv4Header.flagMF | IPv4Header.fragmentOffsetMask) != 0
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
        guard !fragment else { return flow }  // fragments, the first one too, are decoded without ports
        flow.readPorts(p, proto: proto, at: off, end: end, version: version)
        return flow
    }

    /// The ports (or ICMP type and code, GRE key halves, the MH type) of the upper-layer header at `off`, within
    /// `end` bytes (≈ what decode_session reads into the flow). `reversed` swaps source and destination ports, for
    /// a flow read backwards (an ICMP error's quote, xfrm_decode_session_reverse).
    @inline(__always)
    mutating func readPorts(_ p: UnsafeMutableRawPointer, proto: UInt8, at off: Int, end: Int, version: UInt8,
                            reversed: Bool = false) {
        switch proto {
        case IPProtocolNumber.tcp, IPProtocolNumber.udp, 132, 136:  // TCP, UDP, SCTP, UDP-Lite (no DCCP: removed
            // from Linux in 6.16, its ports are no longer decoded)
            if off + 4 <= end {
                self.sourcePort = p.loadBE16(at: off)
                self.destinationPort = p.loadBE16(at: off + 2)
            }
        case 47:
            // GRE with a key (K bit, version 0): the key's high half in the source port, low half in the destination
            // port (≈ fl4_gre_key read through xfrm_flowi_sport/dport).
            if off + 4 <= end {
                let flags = p.loadBE16(at: off)
                if flags & 0x2000 != 0 && flags & 0x0007 == 0 {
                    let keyAt = off + 4 + (flags & 0x8000 != 0 ? 4 : 0)
                    if keyAt + 4 <= end {
                        self.sourcePort = p.loadBE16(at: keyAt)
                        self.destinationPort = p.loadBE16(at: keyAt + 2)
                    }
                }
            }
        case IPProtocolNumber.mobility where version == 6:
            // The Mobility Header is the upper layer (RFC 6275 §6.1; not one of ipv6_ext_hdr's): its type in the
            // source port, as xfrm_flowi_sport reads fl6_mh_type.
            if off + 3 <= end { self.sourcePort = UInt16(p.loadByte(at: off + 2)) }
        case IPProtocolNumber.icmp, IPProtocolNumber.icmpv6:
            if off + 2 <= end {
                self.sourcePort = UInt16(p.loadByte(at: off))
                self.destinationPort = UInt16(p.loadByte(at: off + 1))
            }
        default:
            break
        }
        // Only real ports swap: a GRE key, ICMP type and code and the MH type read the same either way.
        if reversed, [IPProtocolNumber.tcp, IPProtocolNumber.udp, 132, 136].contains(proto) {
            swap(&self.sourcePort, &self.destinationPort)
        }
    }
}
