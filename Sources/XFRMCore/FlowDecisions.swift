import XFRMPacket

/// The output decisions a flow remembers (≈ the dst a connected socket caches, with the xfrm bundle in it for
/// protected flows): a flow does not redo the route lookup, nor the policy lookup and SA resolution, per packet.
/// Plain flows (no policy, default accept), single-SA bundles in software or crypto offload, and packet-offload
/// flows are cached, so every mode does the same host work apart from the SA's own.
typealias OutputCache = FlowCache<OutputDecision>

enum OutputDecision {
    /// No policy matched and the default accepts: leave on this interface (≈ a plain route in the dst cache).
    case plain(ifindex: Int32, mtu: Int)
    /// Packet offload through `device` with `sa` (≈ the bundle of an offloaded policy).
    case packetOffload(policyIndex: UInt32, sa: SecurityAssociation, device: any XfrmOffloadDevice,
                       offload: StateOffload, limit: Int, tunnel: Bool)
    /// A one-SA bundle in software or crypto offload (≈ a dst with its xfrm bundle).
    case bundle(policyIndex: UInt32, OutputBundle)
}

/// What a protected flow's packets need besides the SA's own work.
struct OutputBundle {
    let sa: SecurityAssociation
    /// The outer packet's route.
    let ifindex: Int32
    let mtu: Int
    /// Tunnel mode: the largest inner packet that fits the path after ESP (nil in transport mode).
    let limit: Int?
    /// Crypto offload: the device the route leads to and the SA's binding; each packet still asks the driver's
    /// offload_ok, and goes in software when the device declines it.
    let device: (any XfrmOffloadDevice, StateOffload)?
}

/// The input policy checks a flow remembers: for a packet that came through one SA, the verdict of
/// __xfrm_policy_check on its inner flow — local or forwarded, and the policy that allowed it — so an established
/// flow does not redo the local-address, route and SPD lookups per packet. Only allowed verdicts are cached; the
/// entry's tag is the SA.
typealias InputCache = FlowCache<InputDecision>

struct InputDecision {
    let local: Bool
    let policyIndex: UInt32
    let direction: PolicyDirection
}
