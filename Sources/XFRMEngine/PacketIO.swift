import Synchronization
import XFRMCore

/// Where packets come from (≈ wireguard-go's tun.Device.Read / conn.Bind receive functions): a TUN device, a
/// socket, a device's host side, a test's fake.
public protocol PacketSource: AnyObject {
    /// Reads what is ready, without blocking, into `batch` up to its capacity; returns how many packets it added.
    /// Buffers come from the source's pool; a packet that cannot be read whole is dropped and counted by the source.
    func read(into batch: inout PacketBatch) -> Int
}

/// Where packets go (≈ tun.Device.Write / conn.Bind.Send): a wire, an offload device's TX queue, a TUN, a capture.
/// A sink takes the buffers: it sends them and returns them to their pool, and leaves the batch empty.
public protocol PacketSink: AnyObject {
    func write(_ batch: inout PacketBatch)
}

/// Counters of what the engine itself did with packets (the stack counts its own drops in `xfrm_stat`).
public final class EngineCounters: Sendable {
    /// Handed to an interface's sink.
    public let transmitted = Atomic<UInt64>(0)
    /// Handed to the local sink (delivered to this host, or ICMP errors for a local sender).
    public let delivered = Atomic<UInt64>(0)
    public let deliveredBytes = Atomic<UInt64>(0)
    /// `protectedOnly`: output that no SA transformed (no policy, a bypass policy, optional templates only): it has
    /// nowhere to go.
    public let unprotected = Atomic<UInt64>(0)
    /// ICMP unreachable answers (`Dispatcher.Rules.unreachableWhenUnprotected`) to unprotected output and, through an
    /// XFRM interface, to output a block policy or an ACQUIRE held back: handed to the local sink, not counted as
    /// `delivered`.
    public let unreachable = Atomic<UInt64>(0)
    /// `protectedOnly`: input accepted by the policy check that never was inside ESP: the inner side gets only
    /// what ESP protected.
    public let notDecapsulated = Atomic<UInt64>(0)
    /// IKE and keepalives on the NAT-T port with no key-manager sink.
    public let ike = Atomic<UInt64>(0)
    /// Routed to an interface that has no sink.
    public let noSink = Atomic<UInt64>(0)
    /// Refused by a full worker ring.
    public let ringFull = Atomic<UInt64>(0)
    /// No free packet buffer when a source had a packet (or for a fragment).
    public let poolExhausted = Atomic<UInt64>(0)
    /// IPv4 packets without DF larger than their interface's MTU: sent as fragments (≈ FragOKs of /proc/net/snmp),
    /// the fragments made of them (FragCreates), and those dropped because they could not be cut (FragFails: no
    /// buffer for every fragment, or an MTU too small for eight bytes of payload).
    public let fragmented = Atomic<UInt64>(0)
    public let fragmentsCreated = Atomic<UInt64>(0)
    public let fragmentFailed = Atomic<UInt64>(0)
    /// IPv4 reassembly of fragments from the wire (the kernel rules only; a daemon's kernel reassembles).
    public let reassembly = IPv4ReassemblyCounters()

    public init() {}
}


