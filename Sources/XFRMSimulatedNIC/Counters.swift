// Device-wide counters (≈ the ethtool -S / debugfs counters a NIC driver exposes) and the record of which
// xfrmdev_ops callbacks the core made, in order, so tests can check the kernel's call sequence.

import Synchronization
import XFRMCore

/// One device-wide counter. Every drop the device makes increments `txDropped` or `rxDropped` and exactly one
/// reason counter.
public enum NICCounter: Int, CaseIterable, Sendable {
    /// Frames put on the wire / bytes in them.
    case txPackets
    case txBytes
    /// Frames taken off the wire / bytes in them.
    case rxPackets
    case rxBytes
    /// Every TX drop (queue full, no SA, expired, policy block, errors, oversize).
    case txDropped
    /// Every RX drop (queue full, no buffer, replay, ICV, header errors, expired, policy, fragments, no host).
    case rxDropped
    /// Packet offload: packets the device encapsulated / decapsulated.
    case espTX
    case espRX
    /// Crypto offload: packets the device sealed / opened (whatever the ICV said).
    case cryptoTX
    case cryptoRX
    /// ICV failures (both modes).
    case icvErrors
    /// Replay drops: duplicates, too old, sequence number zero (packet offload).
    case replayErrors
    /// Truncated, badly padded or otherwise malformed ESP (packet offload).
    case headerErrors
    /// TX: an OUT policy matched but the device holds no usable SA for its template; or an unknown crypto handle.
    case txNoState
    /// TX: the matching OUT policy blocks.
    case txPolicyBlock
    /// TX / RX: the SA reached its hard byte or packet limit.
    case txExpired
    case rxExpired
    /// TX: encapsulation or sealing failed (no room, sequence overflow, bad offsets from the host).
    case txErrors
    /// TX: the frame is longer than the device MTU.
    case txOversize
    /// Queues full (host → device, wire → device).
    case txQueueFull
    case rxQueueFull
    /// RX: the pool had no free slot for a frame from the wire, or the frame did not fit a slot.
    case rxNoBuffer
    /// RX: the decrypted packet matched no IN policy of the device (or one that blocks or wants another SA).
    case rxPolicyDrops
    /// RX: outer-fragmented ESP for a device SA.
    case rxFragmentDrops
    /// RX: no `hostReceive` handler.
    case rxNoHost
    /// TX frames dropped because the device was shut down.
    case txShutdown
    case rxShutdown

    /// The snake_case name used in the debug text.
    public var name: String {
        switch self {
        case .txPackets: "tx_packets"
        case .txBytes: "tx_bytes"
        case .rxPackets: "rx_packets"
        case .rxBytes: "rx_bytes"
        case .txDropped: "tx_dropped"
        case .rxDropped: "rx_dropped"
        case .espTX: "esp_tx"
        case .espRX: "esp_rx"
        case .cryptoTX: "crypto_tx"
        case .cryptoRX: "crypto_rx"
        case .icvErrors: "icv_errors"
        case .replayErrors: "replay_errors"
        case .headerErrors: "header_errors"
        case .txNoState: "tx_no_state"
        case .txPolicyBlock: "tx_policy_block"
        case .txExpired: "tx_expired"
        case .rxExpired: "rx_expired"
        case .txErrors: "tx_errors"
        case .txOversize: "tx_oversize"
        case .txQueueFull: "tx_queue_full"
        case .rxQueueFull: "rx_queue_full"
        case .rxNoBuffer: "rx_no_buffer"
        case .rxPolicyDrops: "rx_policy_drops"
        case .rxFragmentDrops: "rx_fragment_drops"
        case .rxNoHost: "rx_no_host"
        case .txShutdown: "tx_shutdown"
        case .rxShutdown: "rx_shutdown"
        }
    }
}

/// Relaxed atomic counters, one per `NICCounter`, written by the engine threads and the enqueueing threads.
final class CounterSet: @unchecked Sendable {
    private let storage: UnsafeMutablePointer<Atomic<UInt64>>
    private static let n = NICCounter.allCases.count

    init() {
        self.storage = .allocate(capacity: CounterSet.n)
        for i in 0..<CounterSet.n { (self.storage + i).initialize(to: Atomic<UInt64>(0)) }
    }

    deinit {
        self.storage.deinitialize(count: CounterSet.n)
        self.storage.deallocate()
    }

    @inline(__always)
    func add(_ c: NICCounter, _ value: UInt64 = 1) {
        self.storage[c.rawValue].wrappingAdd(value, ordering: .relaxed)
    }

    /// Counts one TX drop for `reason`.
    @inline(__always)
    func txDrop(_ reason: NICCounter) {
        self.add(reason)
        self.add(.txDropped)
    }

    /// Counts one RX drop for `reason`.
    @inline(__always)
    func rxDrop(_ reason: NICCounter) {
        self.add(reason)
        self.add(.rxDropped)
    }

    subscript(_ c: NICCounter) -> UInt64 { self.storage[c.rawValue].load(ordering: .relaxed) }
}

/// How many times the core called each device callback.
public struct DeviceCallCounts: Sendable, Equatable {
    public var stateAdd = 0
    public var stateDelete = 0
    public var stateFree = 0
    public var policyAdd = 0
    public var policyDelete = 0
    public var policyFree = 0
    public var updateStats = 0
    public var advanceESN = 0
    public var offloadOK = 0
    public init() {}
}

/// One callback the core made, for checking the call order (`offloadOK`, a per-packet call, is only counted).
public enum DeviceCall: Sendable, Equatable, CustomStringConvertible {
    case stateAdd(spi: UInt32)
    case stateDelete(spi: UInt32)
    case stateFree(spi: UInt32)
    case policyAdd(PolicyDirection)
    case policyDelete(PolicyDirection)
    case policyFree(PolicyDirection)
    case updateStats(spi: UInt32)
    case advanceESN(spi: UInt32)

    public var description: String {
        func hex(_ v: UInt32) -> String { "0x" + String(v, radix: 16) }
        switch self {
        case .stateAdd(let s): return "stateAdd \(hex(s))"
        case .stateDelete(let s): return "stateDelete \(hex(s))"
        case .stateFree(let s): return "stateFree \(hex(s))"
        case .policyAdd(let d): return "policyAdd \(d.name)"
        case .policyDelete(let d): return "policyDelete \(d.name)"
        case .policyFree(let d): return "policyFree \(d.name)"
        case .updateStats(let s): return "updateStats \(hex(s))"
        case .advanceESN(let s): return "advanceESN \(hex(s))"
        }
    }
}

/// The counts plus a bounded log of the calls, newest last.
struct CallRecord {
    static let logLimit = 4096
    var counts = DeviceCallCounts()
    var log: [DeviceCall] = []

    mutating func record(_ call: DeviceCall) {
        switch call {
        case .stateAdd: self.counts.stateAdd += 1
        case .stateDelete: self.counts.stateDelete += 1
        case .stateFree: self.counts.stateFree += 1
        case .policyAdd: self.counts.policyAdd += 1
        case .policyDelete: self.counts.policyDelete += 1
        case .policyFree: self.counts.policyFree += 1
        case .updateStats: self.counts.updateStats += 1
        case .advanceESN: self.counts.advanceESN += 1
        }
        if self.log.count >= CallRecord.logLimit { self.log.removeFirst(self.log.count / 2) }
        self.log.append(call)
    }
}
