import Synchronization
import XFRMESP

/// The kernel's `/proc/net/xfrm_stat` counters, in its order, with its names and meanings (≈ xfrm_proc.c).
public enum XfrmStatCounter: Int, CaseIterable, Sendable {
    case inError, inBufferError, inHdrError, inNoStates, inStateProtoError, inStateModeError, inStateSeqError
    case inStateExpired, inStateMismatch, inStateInvalid, inTmplMismatch, inNoPols, inPolBlock, inPolError
    case outError, outBundleGenError, outBundleCheckError, outNoStates, outStateProtoError, outStateModeError
    case outStateSeqError, outStateExpired, outPolBlock, outPolDead, outPolError, fwdHdrError, outStateInvalid
    case acquireError, outStateDirError, inStateDirError, inIptfsError, outNoQueueSpace

    /// The kernel's name, e.g. "XfrmInNoStates".
    public var name: String {
        let raw = String(describing: self)
        return "Xfrm" + raw.prefix(1).uppercased() + raw.dropFirst()
    }

    /// The counter a data-path drop increments.
    public init(_ reason: DropReason) {
        switch reason {
        case .truncated, .badIPHeader, .fragmented: self = .inHdrError
        case .noState: self = .inNoStates
        case .encapsulationMismatch: self = .inStateMismatch
        case .sequenceZero, .replayDuplicate, .replayTooOld: self = .inStateSeqError
        case .badCipherLength, .icvFailed, .badPadding: self = .inStateProtoError
        case .badNextHeader, .badInnerPacket: self = .inStateModeError
        case .tfcDummy, .nattKeepalive: self = .inError
        case .sequenceOverflow: self = .outStateSeqError
        case .noBufferSpace, .badOutputPacket: self = .outError
        case .encryptFailed: self = .outStateProtoError
        }
    }
}

/// The global counters: one relaxed atomic per `XfrmStatCounter`, plus one per ESP `DropReason` so that every
/// drop also has its precise name.
public final class XfrmStatistics: @unchecked Sendable {
    private let counters: UnsafeMutablePointer<Atomic<UInt64>>
    /// Per-reason ESP drop counters (finer than xfrm_stat).
    public let drops = DropCounters()

    public init() {
        let n = XfrmStatCounter.allCases.count
        self.counters = .allocate(capacity: n)
        for i in 0..<n { (self.counters + i).initialize(to: Atomic<UInt64>(0)) }
    }

    deinit {
        self.counters.deinitialize(count: XfrmStatCounter.allCases.count)
        self.counters.deallocate()
    }

    @inline(__always) public func increment(_ c: XfrmStatCounter, by n: UInt64 = 1) {
        self.counters[c.rawValue].wrappingAdd(n, ordering: .relaxed)
    }

    /// Counts an ESP drop under its reason and its xfrm_stat counter. TFC dummies and keepalives are counted by
    /// reason only: they are not errors.
    @inline(__always) public func count(_ reason: DropReason) {
        self.drops.count(reason)
        if reason != .tfcDummy && reason != .nattKeepalive { self.increment(XfrmStatCounter(reason)) }
    }

    public subscript(_ c: XfrmStatCounter) -> UInt64 { self.counters[c.rawValue].load(ordering: .relaxed) }

    /// The `/proc/net/xfrm_stat` text: `"%-24s\t%lu\n"` per counter, in the kernel's order.
    public func procText() -> String {
        var out = ""
        for c in XfrmStatCounter.allCases {
            let name = c.name
            out += name + String(repeating: " ", count: max(0, 24 - name.count)) + "\t\(self[c])\n"
        }
        return out
    }
}
