import Synchronization

/// Why the ESP data path dropped a packet. Every drop has exactly one reason, and every reason has a counter
/// (`DropCounters`) and maps to the kernel's `/proc/net/xfrm_stat` counter of the same meaning.
public enum DropReason: UInt8, CaseIterable, Sendable {
    // Input: outer packet.
    /// Shorter than the headers it must carry (IP, UDP, ESP header + IV + ICV).
    case truncated
    /// Malformed outer IP header: version, header length, total length or checksum.
    case badIPHeader
    /// Fragmented ESP: reassembly happens before the transform, never here.
    case fragmented
    /// No SA for the SPI (≈ XfrmInNoStates).
    case noState
    /// ESP arrived raw for a UDP-encapsulated SA, or in UDP for a raw one (≈ XfrmInStateMismatch).
    case encapsulationMismatch
    // Input: anti-replay (RFC 4303 §3.4.3), all XfrmInStateSeqError.
    /// Sequence number 0, never sent by a conforming peer.
    case sequenceZero
    /// Already received (per-SA `replay`).
    case replayDuplicate
    /// Left of the window (per-SA `replay-window`).
    case replayTooOld
    // Input: transform.
    /// Ciphertext length not a whole number of cipher blocks, or too short for a trailer.
    case badCipherLength
    /// ICV did not verify (per-SA `failed`, ≈ integrity_failed).
    case icvFailed
    /// Pad length beyond the payload, or padding bytes not 1, 2, 3, ... (RFC 4303 §2.4).
    case badPadding
    /// Next header not valid for the SA's mode (tunnel mode needs IPv4 or IPv6).
    case badNextHeader
    /// The decrypted inner packet is not a valid IP packet of the family its next header names.
    case badInnerPacket
    /// A TFC dummy packet (next header 59, RFC 4303 §2.6): authenticated, then discarded as the RFC requires.
    case tfcDummy
    /// A NAT-T keepalive (a single 0xff byte in UDP, RFC 3948 §2.3): consumed.
    case nattKeepalive
    // Output.
    /// The sequence number space is exhausted (2^32 without ESN, 2^64 with) (≈ XfrmOutStateSeqError).
    case sequenceOverflow
    /// Not enough headroom or tailroom for ESP, or the result would exceed the IP length limit.
    case noBufferSpace
    /// The packet to protect is not a valid IP packet (or is a fragment in transport mode).
    case badOutputPacket
    /// The crypto library failed to encrypt.
    case encryptFailed

    /// The `/proc/net/xfrm_stat` counter this reason increments.
    public var xfrmStatName: StaticString {
        switch self {
        case .truncated, .badIPHeader, .fragmented: "XfrmInHdrError"
        case .noState: "XfrmInNoStates"
        case .encapsulationMismatch: "XfrmInStateMismatch"
        case .sequenceZero, .replayDuplicate, .replayTooOld: "XfrmInStateSeqError"
        case .badCipherLength, .icvFailed, .badPadding: "XfrmInStateProtoError"
        case .badNextHeader, .badInnerPacket: "XfrmInStateModeError"
        case .tfcDummy, .nattKeepalive: "XfrmInError"
        case .sequenceOverflow: "XfrmOutStateSeqError"
        case .noBufferSpace, .badOutputPacket: "XfrmOutError"
        case .encryptFailed: "XfrmOutStateProtoError"
        }
    }

    /// Refused after the SA took the packet in: ESP verified it and the window moved, then its inner packet failed
    /// (≈ xfrm_inner_mode_input, which runs after xfrm_input adds skb->len to curlft). The SA's lifetime counts it.
    @inline(__always)
    public var afterAccounting: Bool { self == .badNextHeader || self == .badInnerPacket }

    /// The camelCase name, as printed by the tools.
    public var name: String { String(describing: self) }
}

/// One relaxed atomic counter per `DropReason`, shared by every thread of the data path (≈ the xfrm MIB).
public final class DropCounters: @unchecked Sendable {
    private let storage: UnsafeMutablePointer<Atomic<UInt64>>

    public init() {
        let n = DropReason.allCases.count
        self.storage = .allocate(capacity: n)
        for i in 0..<n { (self.storage + i).initialize(to: Atomic<UInt64>(0)) }
    }

    deinit {
        self.storage.deinitialize(count: DropReason.allCases.count)
        self.storage.deallocate()
    }

    /// Counts one drop.
    @inline(__always)
    public func count(_ reason: DropReason) {
        self.storage[Int(reason.rawValue)].wrappingAdd(1, ordering: .relaxed)
    }

    /// The current count for `reason`.
    public subscript(_ reason: DropReason) -> UInt64 {
        self.storage[Int(reason.rawValue)].load(ordering: .relaxed)
    }

    /// Every non-zero counter, by reason name (tools and tests).
    public var nonZero: [(DropReason, UInt64)] {
        DropReason.allCases.compactMap { r in self[r] == 0 ? nil : (r, self[r]) }
    }
}
