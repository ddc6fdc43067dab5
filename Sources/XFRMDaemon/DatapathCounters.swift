import Synchronization
import XFRMEngine

/// Counters of what the data path did with packets outside the stack's own xfrm_stat counters.
public final class DatapathCounters: Sendable {
    public let tunRead = Atomic<UInt64>(0)
    /// TCP superpackets read from the TUN and cut into segments (TSO), and coalesced runs written into it (GRO).
    public let tunSuperpackets = Atomic<UInt64>(0)
    public let tunCoalesced = Atomic<UInt64>(0)
    /// The same for UDP with USO: superpackets read and cut, coalesced runs written (VIRTIO_NET_HDR_GSO_UDP_L4).
    public let tunUDPSuperpackets = Atomic<UInt64>(0)
    public let tunUDPCoalesced = Atomic<UInt64>(0)
    /// ESP-in-UDP sent as UDP GSO (one sendmmsg entry with a UDP_SEGMENT control message) and the datagrams they
    /// carried; GSO sends the kernel refused and that were sent again one datagram at a time (and GSO then off).
    public let udpGSOSends = Atomic<UInt64>(0)
    public let udpGSOSegments = Atomic<UInt64>(0)
    public let udpGSOFallbacks = Atomic<UInt64>(0)
    /// Coalesced ESP-in-UDP received with a UDP_GRO control message (more than one datagram) and their datagrams.
    public let udpGROReceives = Atomic<UInt64>(0)
    public let udpGROSegments = Atomic<UInt64>(0)
    /// IKE datagrams relayed to the key manager (`--ike-port`), its replies sent out, and relay failures.
    public let ikeRelayed = Atomic<UInt64>(0)
    public let ikeReplies = Atomic<UInt64>(0)
    public let ikeRelayErrors = Atomic<UInt64>(0)
    /// Read from the TUN but unusable (a virtio header that does not fit the packet, a superpacket that is not TCP).
    public let tunBad = Atomic<UInt64>(0)
    public let tunWritten = Atomic<UInt64>(0)
    public let wireSent = Atomic<UInt64>(0)
    public let wireReceived = Atomic<UInt64>(0)
    public let sendErrors = Atomic<UInt64>(0)
    public let noBuffer = Atomic<UInt64>(0)
    /// Arrived on an outer socket without being framable (no destination address): never given to the stack.
    public let notESP = Atomic<UInt64>(0)
    /// Outer datagrams larger than the receive buffer (truncated by the kernel): dropped.
    public let truncated = Atomic<UInt64>(0)
    /// The engine's counters (unprotected output, undecapsulated input, IKE, full rings).
    public let engine = EngineCounters()
    init() {}

    /// Every counter by its metric label.
    public var snapshot: [String: UInt64] {
        ["tun_read": self.tunRead.load(ordering: .relaxed), "tun_written": self.tunWritten.load(ordering: .relaxed),
         "tun_no_policy": self.engine.unprotected.load(ordering: .relaxed),
         "tun_unreachable": self.engine.unreachable.load(ordering: .relaxed),
         "wire_sent": self.wireSent.load(ordering: .relaxed),
         "wire_received": self.wireReceived.load(ordering: .relaxed),
         "ike_dropped": self.engine.ike.load(ordering: .relaxed),
         "send_errors": self.sendErrors.load(ordering: .relaxed),
         "no_buffer": self.noBuffer.load(ordering: .relaxed),
         "not_esp": self.notESP.load(ordering: .relaxed) + self.engine.notDecapsulated.load(ordering: .relaxed),
         "truncated": self.truncated.load(ordering: .relaxed), "tun_bad": self.tunBad.load(ordering: .relaxed),
         "tun_superpackets": self.tunSuperpackets.load(ordering: .relaxed),
         "tun_coalesced": self.tunCoalesced.load(ordering: .relaxed),
         "tun_udp_superpackets": self.tunUDPSuperpackets.load(ordering: .relaxed),
         "tun_udp_coalesced": self.tunUDPCoalesced.load(ordering: .relaxed),
         "udp_gso_sends": self.udpGSOSends.load(ordering: .relaxed),
         "udp_gso_segments": self.udpGSOSegments.load(ordering: .relaxed),
         "udp_gso_fallbacks": self.udpGSOFallbacks.load(ordering: .relaxed),
         "udp_gro_receives": self.udpGROReceives.load(ordering: .relaxed),
         "udp_gro_segments": self.udpGROSegments.load(ordering: .relaxed),
         "ike_relayed": self.ikeRelayed.load(ordering: .relaxed),
         "ike_replies": self.ikeReplies.load(ordering: .relaxed),
         "ike_relay_errors": self.ikeRelayErrors.load(ordering: .relaxed),
         "ring_full": self.engine.ringFull.load(ordering: .relaxed),
         "fragmented": self.engine.fragmented.load(ordering: .relaxed),
         "fragments_created": self.engine.fragmentsCreated.load(ordering: .relaxed),
         "fragment_failed": self.engine.fragmentFailed.load(ordering: .relaxed),
         // The parts of the accounting identity (issue 10): what the stack delivered into the TUN, input that never
         // was ESP, and what arrived unframable (`not_esp` is the sum of the last two).
         "delivered": self.engine.delivered.load(ordering: .relaxed),
         "not_decapsulated": self.engine.notDecapsulated.load(ordering: .relaxed),
         "unframed": self.notESP.load(ordering: .relaxed)]
    }
}
