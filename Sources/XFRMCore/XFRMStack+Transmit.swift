// The last step of output: route MTU checks, the ICMP errors a too-big packet gets (≈ ip_fragment's
// ICMP_FRAG_NEEDED, icmpv6_send PKT_TOOBIG), and the packets that leave as fragments: IPv4 without DF, and the
// IPv6 ESP packets this host sealed.

import Foundation
import Synchronization
import XFRMCrypto
import XFRMESP
import XFRMPacket

extension XFRMStack {
    @inline(__always)
    func transmit(_ packet: inout PacketBuffer, transformed: Bool = false, mayFragment: Bool) -> OutputResult {
        let p = packet.data
        let version = p.loadByte(at: 0) >> 4
        let dst: IPAddress = version == 4 ? .loadV4(from: p, at: 16) : .loadV6(from: p, at: 24)
        guard let iface = self.network.egress(to: dst) else { return .dropped(nil) }
        return self.transmit(&packet, ifindex: iface.ifindex, mtu: iface.mtu, transformed: transformed,
                             mayFragment: mayFragment)
    }

    /// The MTU check of `transmit` on a route already known. `mayFragment`: the packet is final (plaintext, or ESP
    /// sealed here), so an IPv4 one without DF may leave as fragments; false for ESP a crypto-offload device has yet
    /// to seal, which must reach it whole.
    @inline(__always)
    func transmit(_ packet: inout PacketBuffer, ifindex: Int32, mtu: Int, transformed: Bool,
                  mayFragment: Bool) -> OutputResult {
        let p = packet.data
        let version = p.loadByte(at: 0) >> 4
        let iface = (ifindex: ifindex, mtu: mtu)
        if packet.count > iface.mtu {
            let df = version == 6 || p.loadBE16(at: 6) & IPv4Header.flagDF != 0
            // Never quote a transformed packet in an ICMP error (a crypto-offload packet is still plaintext inside
            // its ESP framing); it is dropped instead. Untransformed DF/IPv6 packets get the error.
            // IPv6 never reports less than its minimum MTU (as ip6_forward clamps); up to 1,280 bytes are dropped.
            let reported = version == 6 ? max(iface.mtu, XFRMStack.ipv6MinimumMTU) : iface.mtu
            if df && !transformed {
                if packet.count > reported && self.makePacketTooBig(&packet, mtu: reported) { return .icmpError }
                self.statistics.increment(.outError)
                return .dropped(.outError)
            }
            // IPv4 without DF; or the IPv6 packet ESP sealed here, which this host built and may fragment as its
            // source (RFC 8200 §4.5; xfrm6_prepare_output sets ignore_df on the outer packet).
            if mayFragment && (!df || (version == 6 && transformed)) {
                return .fragment(ifindex: iface.ifindex, mtu: iface.mtu)
            }
            // ESP for a crypto-offload device (it must reach the device whole), or an IPv4 one with DF.
            self.statistics.increment(.outError)
            return .dropped(.outError)
        }
        return .transmit(ifindex: iface.ifindex)
    }

    /// Turns the packet into an ICMP "fragmentation needed" (IPv4, RFC 1191) or ICMPv6 "packet too big"
    /// (RFC 8201) addressed to its sender, carrying `mtu`.
    func makePacketTooBig(_ packet: inout PacketBuffer, mtu: Int) -> Bool {
        let p = packet.data
        let version = p.loadByte(at: 0) >> 4
        if version == 4 {
            guard let ip = IPv4Header.parse(p, available: packet.count) else { return false }
            let src = p.loadBE32(at: 12)
            let quoted = min(packet.count, ip.headerLength + 8)
            guard packet.headroom >= 28 else { return false }  // no room for the error's headers: just drop
            packet.trimBack(packet.count - quoted)
            let icmp = packet.prepend(8)
            icmp.storeByte(3, at: 0)
            icmp.storeByte(4, at: 1)
            icmp.storeBE16(0, at: 2)
            icmp.storeBE16(0, at: 4)
            icmp.storeBE16(UInt16(truncatingIfNeeded: mtu), at: 6)
            icmp.storeBE16(InternetChecksum.compute(icmp, count: 8 + quoted), at: 2)
            let hdr = packet.prepend(20)
            let from = self.replySource(toward: .v4(src), version: 4) ?? .v4(0)
            guard case .v4(let me) = from else { return false }
            IPv4Header.write(hdr, tos: 0xc0, totalLength: packet.count,
                             identification: self.ipIdentification.wrappingAdd(1, ordering: .relaxed).newValue,
                             flags: 0, ttl: 64, proto: IPProtocolNumber.icmp, source: me, destination: src)
            return true
        }
        guard packet.count >= HeaderSize.ipv6 else { return false }
        let src = IPAddress.loadV6(from: p, at: 8)
        let quoted = min(packet.count, 1280 - 48)
        guard packet.headroom >= 48 else { return false }
        packet.trimBack(packet.count - quoted)
        let icmp = packet.prepend(8)
        icmp.storeByte(2, at: 0)
        icmp.storeByte(0, at: 1)
        icmp.storeBE16(0, at: 2)
        icmp.storeBE32(UInt32(mtu), at: 4)
        let me = self.replySource(toward: src, version: 6) ?? .v6(0, 0)
        let hdr = packet.prepend(HeaderSize.ipv6)
        IPv6Header.write(hdr, trafficClass: 0, flowLabel: 0, payloadLength: 8 + quoted,
                         nextHeader: IPProtocolNumber.icmpv6, hopLimit: 64, source: me, destination: src)
        icmp.storeBE16(ICMPv6.checksum(icmp, length: 8 + quoted, source: me, destination: src), at: 2)
        return true
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
