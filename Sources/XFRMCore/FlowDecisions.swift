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
                       offload: StateOffload, limit: Int)
    /// A one-SA bundle in software or crypto offload (≈ a dst with its xfrm bundle).
    case bundle(policyIndex: UInt32, OutputBundle)
}

/// What a protected flow's packets need besides the SA's own work (immutable; a class so that the cache and the
/// batch memo hand it on with one reference count, not a copy of every field).
final class OutputBundle: Sendable {
    let sa: SecurityAssociation
    /// The outer packet's route.
    let ifindex: Int32
    let mtu: Int
    /// The largest packet that fits the path after ESP: the inner packet in tunnel mode, in transport mode the
    /// packet with its IP header (of the flow's usual size) outside the rounding.
    let limit: Int?
    /// Crypto offload: the device the route leads to and the SA's binding; each packet still asks the driver's
    /// offload_ok, and goes in software when the device declines it.
    let device: (any XfrmOffloadDevice, StateOffload)?

    init(sa: SecurityAssociation, ifindex: Int32, mtu: Int, limit: Int?, device: (any XfrmOffloadDevice, StateOffload)?) {
        (self.sa, self.ifindex, self.mtu, self.limit, self.device) = (sa, ifindex, mtu, limit, device)
    }
}

/// A strong reference that is lent out unretained: the batch memos keep the object they found for the next packets
/// and hand it on at +0, so a memo hit counts no reference. The object lives as long as the holder keeps it here.
struct LentReference<Object: AnyObject> {
    private var owner: Object?
    /// `owner`, unretained (nil when empty).
    private(set) var unmanaged: Unmanaged<Object>?

    init(_ object: Object? = nil) {
        self.owner = object
        self.unmanaged = object.map { Unmanaged.passUnretained($0) }
    }
}

/// The bundle the previous packet of a batch went through (≈ a socket's own dst: the next packet of the flow needs
/// no lookup at all while the configuration generation holds). Lives for one batch, in place: the key is compared
/// field by field and the bundle is lent out unretained, so a memo hit costs no copy and no reference count.
struct OutputMemo {
    private var flow = Flow(source: .v4(0), destination: .v4(0))
    /// The cache tag (the CPU, with per-CPU SAs).
    private var tag: UInt = 0
    /// 0: empty (configuration generations start at 1).
    private var generation: UInt64 = 0
    /// The bundle, kept alive while the memo holds it (the cache may drop its entry during the batch).
    private var bundle = LentReference<OutputBundle>()
    /// The flow's bytes when its packet had them (`RawFlowKey`, interface 0), so that a run recognizes the flow's
    /// next packets without parsing them.
    private var raw: RawFlowKey? = nil

    /// Whether a packet of `flow` in this generation may go straight to the memo's bundle.
    @inline(__always)
    func matches(_ flow: Flow, tag: UInt, generation: UInt64) -> Bool {
        self.bundle.unmanaged != nil && self.generation == generation && self.tag == tag && self.flow.sameFlow(flow)
    }

    /// Runs `body` with the bundle borrowed (+0): the memo keeps it alive — a stored property of the caller's memo,
    /// which nothing can change while `body` runs (the memo is `inout` to the batch loop and `body` does not see it).
    @inline(__always)
    func withBundle<R>(_ body: (OutputBundle) -> R) -> R {
        self.bundle.unmanaged.unsafelyUnwrapped._withUnsafeGuaranteedRef(body)
    }

    /// Whether the memo holds a bundle (a later packet may match it).
    @inline(__always)
    var isSet: Bool { self.bundle.unmanaged != nil && self.generation != 0 }

    /// The raw key of the memo's flow, when a run's packet (mark 0, the batch's if_id) of this tag and generation
    /// with that key (and a header checksum that verifies) `matches` the memo: nil when the memo is empty, of another
    /// tag or generation, or its flow has no raw key or another mark or if_id.
    @inline(__always)
    func rawKey(tag: UInt, generation: UInt64, ifID: UInt32) -> RawFlowKey? {
        guard self.bundle.unmanaged != nil, self.generation == generation, self.tag == tag, self.flow.ifID == ifID,
            self.flow.mark == 0, self.flow.ifindex == 0
        else { return nil }
        return self.raw
    }

    /// Remembers `bundle` for `flow`, whose packet is `packet` (its raw key, if it has one, with interface 0).
    mutating func set(_ flow: Flow, packet: PacketBuffer, tag: UInt, generation: UInt64, bundle: OutputBundle) {
        (self.flow, self.tag, self.generation) = (flow, tag, generation)
        self.raw = RawFlowKey(packet.data, count: packet.count, mark: flow.mark, ifindex: 0)
        self.bundle = LentReference(bundle)
    }

    mutating func clear() {
        self.generation = 0
        self.bundle = LentReference()
    }
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

/// What the previous packets of a batch looked up on input, valid for one configuration generation: the outer
/// destination's local interface, the SA of an SPI, and the inner flow's verdict.
struct InputMemo {
    private(set) var generation: UInt64 = 0
    var outer: (destination: IPAddress, local: Int32?)? = nil
    /// The SA the last outermost SPI and mark found (empty: none, or not found), lent to the packet's secpath.
    /// Written only for a packet's outermost ESP header, before the packet borrows it.
    private var lentSA = LentReference<SecurityAssociation>()
    private var saKey: (id: SAID, mark: UInt32)? = nil
    /// `raw`: the flow's bytes when its packet had them (`RawFlowKey`), so the next packet is compared without
    /// parsing its flow.
    var verdict: (flow: Flow, raw: RawFlowKey?, tag: UInt, decision: InputDecision)? = nil

    /// Forgets everything when the configuration changed since the memo was made.
    @inline(__always)
    mutating func validate(_ generation: UInt64) {
        if generation != self.generation { self = InputMemo(generation: generation) }
    }

    /// The memo's SA, unretained (the memo keeps it alive).
    var sa: Unmanaged<SecurityAssociation>? { self.lentSA.unmanaged }

    /// Whether `sa` is what this SPI and mark found (a lookup that found nothing is not kept).
    @inline(__always)
    func holdsSA(_ id: SAID, mark: UInt32) -> Bool {
        guard let k = self.saKey else { return false }
        return k.id.spi == id.spi && k.mark == mark && k.id.destination == id.destination && k.id.proto == id.proto
    }

    /// The SPI and mark `sa` was found for (nil: none).
    var saKeyHeld: (id: SAID, mark: UInt32)? { self.saKey }

    mutating func setSA(_ id: SAID, mark: UInt32, _ sa: SecurityAssociation?) {
        self.saKey = sa == nil ? nil : (id, mark)
        self.lentSA = LentReference(sa)
    }
}

/// The bytes that decide the `Flow` of the usual inner packet — IPv4 with a 20-byte header, exactly as long as its
/// total length says, not a fragment, TCP or UDP: protocol, addresses and ports — with the packet's mark and
/// interface. Two packets with equal keys, checked against the same SA (so the same if_id), have equal flows as
/// `Flow.parse` reads them; packets of any other shape have no key and are compared by their parsed flow.
struct RawFlowKey: Equatable {
    /// Bytes 12–19: source and destination address.
    let addresses: UInt64
    /// Bytes 20–23 (the ports) and the protocol above them.
    let portsAndProto: UInt64
    let mark: UInt32
    let ifindex: Int32

    @inline(__always)
    init?(_ p: UnsafeMutableRawPointer, count n: Int, mark: UInt32, ifindex: Int32) {
        guard n >= 24, p.loadByte(at: 0) == 0x45, Int(p.loadBE16(at: 2)) == n,
            p.loadBE16(at: 6) & (IPv4Header.flagMF | IPv4Header.fragmentOffsetMask) == 0
        else { return nil }
        let proto = p.loadByte(at: 9)
        guard proto == IPProtocolNumber.tcp || proto == IPProtocolNumber.udp else { return nil }
        self.addresses = p.loadUnaligned(fromByteOffset: 12, as: UInt64.self)
        self.portsAndProto = UInt64(p.loadUnaligned(fromByteOffset: 20, as: UInt32.self)) | UInt64(proto) << 32
        self.mark = mark
        self.ifindex = ifindex
    }
}
