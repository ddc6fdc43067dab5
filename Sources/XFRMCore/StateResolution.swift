import XFRMESP
import XFRMPacket

/// What output SA resolution is asked (≈ the arguments of xfrm_state_find).
public struct StateQuery {
    public var template: Template
    public var flow: Flow
    public var source: IPAddress
    public var destination: IPAddress
    /// The policy's mark, value & mask (the SA's mark is compared with it, not with the packet's).
    public var policyMark: UInt32
    public var ifID: UInt32
    /// A packet-offload policy's device: only packet-offload SAs on it qualify.
    public var packetOffloadDevice: Int32?
    /// The CPU the output runs on (the engine worker's index; ≈ the kernel's raw_smp_processor_id()).
    public var cpu: UInt32
    /// The policy has XFRM_POLICY_CPU_ACQUIRE: an SA that does not serve this CPU is only a stopgap.
    public var cpuAcquire: Bool

    public init(template: Template, flow: Flow, source: IPAddress, destination: IPAddress, policyMark: UInt32,
                ifID: UInt32 = 0, packetOffloadDevice: Int32? = nil, cpu: UInt32 = 0, cpuAcquire: Bool = false) {
        (self.template, self.flow, self.source, self.destination) = (template, flow, source, destination)
        (self.policyMark, self.ifID, self.packetOffloadDevice) = (policyMark, ifID, packetOffloadDevice)
        (self.cpu, self.cpuAcquire) = (cpu, cpuAcquire)
    }
}

/// One pass of xfrm_state_find over the candidates of a query (≈ xfrm_state_look_at, with the per-CPU rules of
/// Linux 6.13, RFC 9611): VALID SAs whose selector covers the flow are ranked — an SA bound to this CPU before one
/// bound to none, then a non-dying one, then the newest — and an SA bound to another CPU is never taken. SAs with
/// the exact source beat those with the wildcard source (the kernel's second chain); a pending acquire for the
/// flow comes between the two.
struct ResolutionScan {
    let query: StateQuery
    let wantMode: ESPMode
    /// False when no SA in the SAD is bound to a CPU: an unbound, non-dying exact match then ends the scan.
    let perCPUPossible: Bool
    private var best: (sa: SecurityAssociation, rank: Int)?
    private var wildcard: (sa: SecurityAssociation, rank: Int)?
    /// Larval SAs for this flow: unbound or bound to this CPU; bound exactly to this CPU; bound to another CPU.
    private var acquiring = false
    private var acquiringThisCPU = false
    private var acquiringOtherCPU = false

    init(_ query: StateQuery, perCPUPossible: Bool) {
        self.query = query
        self.wantMode = query.template.mode == 1 ? .tunnel : .transport
        self.perCPUPossible = perCPUPossible
    }

    /// Looks at one candidate of a bucket (newest first); true when nothing later can beat what was found.
    @inline(__always)
    mutating func look(at sa: SecurityAssociation, exactSource: Bool) -> Bool {
        let q = self.query
        let c = sa.config
        // The index's chains are found by hash: the key's fields are checked here.
        guard c.id.destination == q.destination, c.reqid == q.template.reqid, c.id.proto == q.template.proto,
            exactSource ? c.source == q.source : c.source.isUnspecified,
            c.mode == self.wantMode, q.template.spi == 0 || c.id.spi == q.template.spi,
            c.mark.matches(q.policyMark), sa.ifID == q.ifID,  // `dir in` is found, then refused (apply)
            c.flags & SAConfig.wildRecvFlag == 0  // ≈ every loop of xfrm_state_find: a wildrecv SA only receives
        else { return false }
        let v = sa.resolutionView
        // A packet-offload policy resolves only to packet-offload SAs on its device; a software policy never uses a
        // packet-offload SA (spec §4.2).
        if let dev = q.packetOffloadDevice {
            guard v.offloadType == .packet, v.offloadIfindex == dev else { return false }
        } else if v.offloadType == .packet {
            return false
        }
        switch v.state {
        case .acquiring:
            // ≈ xfrm_state_look_at: any larval SA of the template is an acquire in progress, whatever its selector
            // (an ACQUIRE's has the flow's, ALLOCSPI's its two addresses).
            switch c.pcpuNum {
            case nil: self.acquiring = true
            case q.cpu?:
                self.acquiring = true
                self.acquiringThisCPU = true
            default: self.acquiringOtherCPU = true
            }
            return false
        case .valid:
            guard c.selector.covers(q.flow) else { return false }
            if let n = c.pcpuNum, n != q.cpu { return false }
            let rank = (c.pcpuNum != nil ? 2 : 0) + (v.dying ? 0 : 1)
            if exactSource {
                if self.best == nil || rank > self.best!.rank { self.best = (sa, rank) }
                return rank == 3 || (rank == 1 && !self.perCPUPossible)
            }
            if self.wildcard == nil || rank > self.wildcard!.rank { self.wildcard = (sa, rank) }
            return false
        default:
            return false
        }
    }

    var result: StateDatabase.Resolution {
        let chosen = self.best?.sa ?? self.wildcard?.sa
        // ≈ xfrm_state_look_at: an acquire for another CPU holds back only a flow that has no SA at all.
        let pending = self.acquiring || (self.acquiringOtherCPU && chosen == nil)
        let sa: SecurityAssociation
        if let b = self.best?.sa {
            sa = b
        } else if pending {
            return .acquiring
        } else if let w = self.wildcard?.sa {
            sa = w
        } else {
            return .none
        }
        // XFRM_POLICY_CPU_ACQUIRE: an SA that is not this CPU's carries the packet while the key manager is asked
        // for one that is (once: a larval SA for this CPU means the question is out).
        if self.query.cpuAcquire && sa.config.pcpuNum != self.query.cpu && !self.acquiringThisCPU {
            return .fallback(sa)
        }
        return .found(sa)
    }
}
