// The last step of output: route MTU checks, the ICMP error a too-big packet gets (≈ ip_fragment's
// ICMP_FRAG_NEEDED, icmpv6_send PKT_TOOBIG; built in XFRMStack+ICMPError.swift), and the packets that leave as
// fragments: IPv4 without DF, and the IPv6 ESP packets this host sealed.

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
}
