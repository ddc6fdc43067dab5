// The ICMP errors the stack sends back to a packet's sender, built in place of the packet: "fragmentation needed" /
// "packet too big" when ESP would make it larger than its route allows (ip_fragment, icmpv6_send PKT_TOOBIG), and
// "host unreachable" / "address unreachable" for what an XFRM interface has no policy to protect (xfrmi_xmit's
// dst_link_failure; the daemon's TUN, see `Dispatcher.Rules.unreachableWhenUnprotected`).

import Synchronization
import XFRMPacket

extension XFRMStack {
    /// An ICMP error about a packet.
    enum ICMPError {
        /// ICMP type 3 code 4 with the next-hop MTU (RFC 1191) / ICMPv6 type 2 with the MTU (RFC 8201).
        case packetTooBig(mtu: Int)
        /// ICMP type 3 code 1 "host unreachable" / ICMPv6 type 1 code 3 "address unreachable" (what the kernel's
        /// dst_link_failure sends).
        case unreachable

        var v4: (type: UInt8, code: UInt8, rest: UInt32) {
            switch self {
            case .packetTooBig(let mtu): (3, 4, UInt32(UInt16(truncatingIfNeeded: mtu)))
            case .unreachable: (3, 1, 0)
            }
        }

        var v6: (type: UInt8, code: UInt8, rest: UInt32) {
            switch self {
            case .packetTooBig(let mtu): (2, 0, UInt32(truncatingIfNeeded: mtu))
            case .unreachable: (1, 3, 0)
            }
        }
    }

    /// Turns the packet into an ICMP "fragmentation needed" (IPv4, RFC 1191) or ICMPv6 "packet too big"
    /// (RFC 8201) addressed to its sender, carrying `mtu`.
    func makePacketTooBig(_ packet: inout PacketBuffer, mtu: Int) -> Bool {
        self.makeICMPError(&packet, .packetTooBig(mtu: mtu))
    }

    /// Turns an outbound packet nothing protects into ICMP "host unreachable" (IPv4) or ICMPv6 "address
    /// unreachable" to its sender, as an XFRM interface answers traffic it has no policy for (xfrmi_xmit →
    /// dst_link_failure). False, leaving the packet as it was, when no error may answer it (`mayAnswer`) or the
    /// buffer has no room.
    public func makeUnreachable(_ packet: inout PacketBuffer) -> Bool {
        self.makeICMPError(&packet, .unreachable)
    }

    /// Builds `error` about the packet in its own buffer: IP header and ICMP header prepended to the quoted start of
    /// the packet (IPv4: its header and 8 bytes, RFC 792; IPv6: as much as fits 1,280 bytes, RFC 4443 §2.4(c)).
    func makeICMPError(_ packet: inout PacketBuffer, _ error: ICMPError) -> Bool {
        let p = packet.data
        guard packet.count >= 1 else { return false }
        let version = p.loadByte(at: 0) >> 4
        if version == 4 {
            guard let ip = IPv4Header.parse(p, available: packet.count), packet.headroom >= 28,
                Self.mayAnswer(p, count: packet.count, headerLength: ip.headerLength)
            else { return false }
            let sender = p.loadBE32(at: 12)
            let from: IPAddress
            if self.icmpErrorsFromDestination.load(ordering: .relaxed) {
                from = .loadV4(from: p, at: 16)
            } else {
                from = self.replySource(toward: .v4(sender), version: 4) ?? .v4(0)
            }
            guard case .v4(let me) = from else { return false }
            let quoted = min(packet.count, ip.headerLength + 8)
            let icmp = Self.icmpHeader(&packet, quoting: quoted, error.v4)
            icmp.storeBE16(InternetChecksum.compute(icmp, count: 8 + quoted), at: 2)
            let hdr = packet.prepend(20)
            IPv4Header.write(hdr, tos: 0xc0, totalLength: packet.count,
                             identification: self.ipIdentification.wrappingAdd(1, ordering: .relaxed).newValue,
                             flags: 0, ttl: 64, proto: IPProtocolNumber.icmp, source: me, destination: sender)
            return true
        }
        guard version == 6, packet.count >= HeaderSize.ipv6, packet.headroom >= 48 else { return false }
        let sender = IPAddress.loadV6(from: p, at: 8)
        let destination = IPAddress.loadV6(from: p, at: 24)
        // RFC 4443 §2.4(e.2): "packet too big" may answer a packet sent to a multicast group; nothing else may.
        let toGroup = p.loadByte(at: 24) == 0xff
        if case .packetTooBig = error {} else if toGroup { return false }
        guard Self.mayAnswer6(p, count: packet.count) else { return false }
        let me: IPAddress
        if self.icmpErrorsFromDestination.load(ordering: .relaxed) && !toGroup {
            me = destination
        } else {
            me = self.replySource(toward: sender, version: 6) ?? .v6(0, 0)
        }
        let quoted = min(packet.count, XFRMStack.ipv6MinimumMTU - 48)
        let icmp = Self.icmpHeader(&packet, quoting: quoted, error.v6)
        let hdr = packet.prepend(HeaderSize.ipv6)
        IPv6Header.write(hdr, trafficClass: 0, flowLabel: 0, payloadLength: 8 + quoted,
                         nextHeader: IPProtocolNumber.icmpv6, hopLimit: 64, source: me, destination: sender)
        icmp.storeBE16(ICMPv6.checksum(icmp, length: 8 + quoted, source: me, destination: sender), at: 2)
        return true
    }

    /// Keeps the packet's first `quoted` bytes and puts the ICMP header before them (checksum 0, to be filled in).
    @inline(__always)
    static func icmpHeader(_ packet: inout PacketBuffer, quoting quoted: Int,
                           _ kind: (type: UInt8, code: UInt8, rest: UInt32)) -> UnsafeMutableRawPointer {
        packet.trimBack(packet.count - quoted)
        let icmp = packet.prepend(8)
        icmp.storeByte(kind.type, at: 0)
        icmp.storeByte(kind.code, at: 1)
        icmp.storeBE16(0, at: 2)
        icmp.storeBE32(kind.rest, at: 4)
        return icmp
    }

    /// RFC 1122 §3.2.2 (≈ icmp_send's checks): no ICMP error answers an ICMP error, a fragment other than the
    /// first, a packet to a multicast or limited-broadcast address, or one whose source is no single host (0.0.0.0,
    /// 127/8, multicast, class E and 255.255.255.255). A subnet's directed broadcast is not known here (the kernel
    /// asks the route, RTCF_BROADCAST); the kernel refuses such an error's source as a martian.
    static func mayAnswer(_ p: UnsafeMutableRawPointer, count: Int, headerLength: Int) -> Bool {
        if p.loadBE16(at: 6) & 0x1fff != 0 { return false }  // not the first fragment
        let source = p.loadBE32(at: 12)
        let destination = p.loadBE32(at: 16)
        if source == 0 || source >> 24 == 127 || source >> 28 >= 0xe { return false }
        if destination >> 28 == 0xe || destination == 0xffff_ffff { return false }
        if p.loadByte(at: 9) == IPProtocolNumber.icmp {
            guard count > headerLength else { return false }
            // Only queries (echo, timestamp, information, address mask) may be answered with an error.
            switch p.loadByte(at: headerLength) {
            case 0, 8, 13, 14, 15, 16, 17, 18: break
            default: return false
            }
        }
        return true
    }

    /// RFC 4443 §2.4(e) as icmp6_send applies it: no error for a source that is unspecified or multicast (nor,
    /// stricter than the kernel, loopback, which cannot come in through a TUN), nor for an ICMPv6 error message
    /// (type below 128) — found as is_ineligible finds it, behind hop-by-hop, routing, destination-options and AH
    /// headers (ipv6_skip_exthdr). A later fragment ends that walk and may be answered; so may a first fragment too
    /// short to show the ICMPv6 type.
    static func mayAnswer6(_ p: UnsafeMutableRawPointer, count: Int) -> Bool {
        let high = p.loadBE64(at: 8)
        let low = p.loadBE64(at: 16)
        if (high == 0 && (low == 0 || low == 1)) || high >> 56 == 0xff { return false }
        var next = p.loadByte(at: 6)
        var offset = HeaderSize.ipv6
        var fragment = false
        while true {
            switch next {
            case IPProtocolNumber.icmpv6:
                guard count > offset else { return fragment }
                return p.loadByte(at: offset) >= 128
            case 0, 43, 60, 51:  // hop-by-hop, routing, destination options, AH
                guard count >= offset + 8 else { return true }
                let length = next == 51 ? 4 * (Int(p.loadByte(at: offset + 1)) + 2)
                    : 8 * (Int(p.loadByte(at: offset + 1)) + 1)
                next = p.loadByte(at: offset)
                offset += length
            case 44:  // fragment
                guard count >= offset + 8 else { return true }
                if p.loadBE16(at: offset + 2) & 0xfff8 != 0 { return true }  // a later fragment: the walk ends
                fragment = true
                next = p.loadByte(at: offset)
                offset += 8
            default:
                return true
            }
        }
    }

    func replySource(toward dst: IPAddress, version: Int) -> IPAddress? {
        if let egress = self.network.egress(to: dst),
            let a = self.network.sourceAddress(ifindex: egress.ifindex, version: version) { return a }
        for i in self.network.interfaces where i.kind != "loopback" {
            if let a = i.addresses.first(where: { $0.address.version == version }) { return a.address }
        }
        return nil
    }
}

/// ICMPv6 checksum over the IPv6 pseudo-header (RFC 8200 §8.1).
enum ICMPv6 {
    static func checksum(_ p: UnsafeMutableRawPointer, length: Int, source: IPAddress, destination: IPAddress) -> UInt16 {
        var sum: UInt64 = 0
        if case .v6(let sh, let sl) = source, case .v6(let dh, let dl) = destination {
            sum = (sh >> 32) &+ (sh & 0xffff_ffff) &+ (sl >> 32) &+ (sl & 0xffff_ffff)
            sum &+= (dh >> 32) &+ (dh & 0xffff_ffff) &+ (dl >> 32) &+ (dl & 0xffff_ffff)
        }
        sum &+= UInt64(length) &+ UInt64(IPProtocolNumber.icmpv6)
        return InternetChecksum.finish(InternetChecksum.partial(p, count: length, initial: sum))
    }
}
