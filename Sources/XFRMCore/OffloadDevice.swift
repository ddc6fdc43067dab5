// The offload device API (≈ struct xfrmdev_ops in include/linux/netdevice.h, Documentation/networking/
// xfrm_device.rst) and the per-object offload bindings (≈ struct xfrm_dev_offload: `xso` in a state, `xdo` in a
// policy).
//
// Call order, as the kernel's: `stateAdd` once when an offloaded SA is created (before it enters the SAD);
// `stateDelete` when it leaves the SAD (delete, flush, hard expiry, device down); `stateFree` after the last
// reference is gone (immediately on a device flush). Policies likewise (packet offload only).

import XFRMPacket

/// Offload type (≈ XFRM_DEV_OFFLOAD_CRYPTO / XFRM_DEV_OFFLOAD_PACKET).
public enum OffloadType: UInt8, Sendable {
    /// The device ciphers; the stack builds and strips ESP.
    case crypto = 1
    /// The device owns the whole ESP data path.
    case packet = 2

    public var name: String { self == .crypto ? "crypto" : "packet" }
}

/// Direction of an offloaded object (≈ XFRM_DEV_OFFLOAD_IN/OUT/FWD; FWD for policies only).
public enum OffloadDirection: UInt8, Sendable {
    case inbound = 1
    case outbound = 2
    case forward = 3
}

/// An SA's binding to a device (≈ xso).
///
/// The widest field first, so the struct (and an SA's optional of it) has no holes.
public struct StateOffload: Sendable, Equatable {
    /// The driver's opaque cookie (≈ offload_handle).
    public var handle: UInt64
    public var ifindex: Int32
    public var direction: OffloadDirection
    public var type: OffloadType
    /// A larval SA a packet-offload policy's acquire offers the device (≈ XFRM_DEV_OFFLOAD_FLAG_ACQ): no keys;
    /// a driver may keep a placeholder (mlx5 skips validation and programs nothing) or refuse it.
    public var acquire: Bool
    public init(ifindex: Int32, direction: OffloadDirection, type: OffloadType, handle: UInt64 = 0,
                acquire: Bool = false) {
        self.ifindex = ifindex
        self.direction = direction
        self.type = type
        self.handle = handle
        self.acquire = acquire
    }
}

/// What a device advertises (≈ NETIF_F_HW_ESP, NETIF_F_HW_ESP_TX_CSUM, NETIF_F_GSO_ESP).
public struct DeviceFeatures: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let hwESP = DeviceFeatures(rawValue: 1 << 0)
    public static let hwESPTxChecksum = DeviceFeatures(rawValue: 1 << 1)
    public static let gsoESP = DeviceFeatures(rawValue: 1 << 2)
}

/// Which `xfrmdev_ops` callbacks a device implements (an absent callback is a NULL pointer in the kernel's table).
public struct DeviceCallbacks: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let stateAdd = DeviceCallbacks(rawValue: 1 << 0)
    public static let stateDelete = DeviceCallbacks(rawValue: 1 << 1)
    public static let stateFree = DeviceCallbacks(rawValue: 1 << 2)
    public static let offloadOK = DeviceCallbacks(rawValue: 1 << 3)
    public static let advanceESN = DeviceCallbacks(rawValue: 1 << 4)
    public static let updateStats = DeviceCallbacks(rawValue: 1 << 5)
    public static let policyAdd = DeviceCallbacks(rawValue: 1 << 6)
    public static let policyDelete = DeviceCallbacks(rawValue: 1 << 7)
    public static let policyFree = DeviceCallbacks(rawValue: 1 << 8)
}


/// Counters a device reports for one SA (≈ what xdo_dev_state_update_stats copies into curlft, stats and the MIB).
public struct DeviceSACounters: Sendable, Equatable {
    public var bytes: UInt64 = 0
    public var packets: UInt64 = 0
    /// Device-side drops, folded into the SA's stats and the global counters by the core.
    public var replayWindow: UInt64 = 0
    public var replay: UInt64 = 0
    public var integrityFailed: UInt64 = 0
    public var headerErrors: UInt64 = 0
    /// Sequence number 0 received: counted in XfrmInStateSeqError only (the kernel keeps it out of the SA's stats).
    public var sequenceZero: UInt64 = 0
    /// Highest received / last sent sequence numbers (for listings and ESN).
    public var inboundSequence: UInt64 = 0
    public var outboundSequence: UInt64 = 0
    public init() {}
}

/// Metadata that travels with a packet between the host stack and an offload device (≈ the xfrm_offload in an
/// skb's secpath plus the skb's dst/xso bookkeeping).
public struct OffloadMetadata: Sendable, Equatable {
    /// Crypto offload TX: the ESP header offset and the length to encrypt (the device seals in place).
    public var espOffset: Int = 0
    public var cryptLength: Int = 0
    public var esnHigh: UInt32? = nil
    /// The SA the packet belongs to (its device handle), or 0.
    public var handle: UInt64 = 0
    /// RX: the device already decrypted and verified (≈ CRYPTO_DONE) with this status.
    public var cryptoDone = false
    public var cryptoSuccess = false
    /// RX packet offload: the device also stripped ESP and checked its policy (the packet is plaintext).
    public var packetOffloaded = false
    public init() {}
}

/// An offload-capable network device (≈ a net_device with xfrmdev_ops). The core calls these on the control path;
/// `transmit` is the data path from the host to the device (≈ ndo_start_xmit).
public protocol XfrmOffloadDevice: AnyObject, Sendable {
    var name: String { get }
    var features: DeviceFeatures { get }
    var callbacks: DeviceCallbacks { get }
    /// Which offload types the device can take at all.
    var supportedTypes: Set<OffloadType> { get }

    /// ≈ xdo_dev_state_add: program the SA; returns the driver handle. EOPNOTSUPP lets crypto offload fall back.
    func stateAdd(_ sa: SecurityAssociation, offload: StateOffload) throws(DeviceError) -> UInt64
    /// ≈ xdo_dev_state_delete: stop using the SA in hardware.
    func stateDelete(_ sa: SecurityAssociation, offload: StateOffload)
    /// ≈ xdo_dev_state_free: release the SA's device resources.
    func stateFree(_ sa: SecurityAssociation, offload: StateOffload)
    /// ≈ xdo_dev_offload_ok: can the device take this packet for this SA?
    func offloadOK(_ packet: PacketBuffer, sa: SecurityAssociation, offload: StateOffload) -> Bool
    /// ≈ xdo_dev_state_advance_esn.
    func advanceESN(_ sa: SecurityAssociation, offload: StateOffload)
    /// ≈ xdo_dev_state_update_stats: the device's current counts for the SA.
    func updateStats(_ sa: SecurityAssociation, offload: StateOffload) -> DeviceSACounters
    /// ≈ xdo_dev_policy_add / delete / free (packet offload).
    func policyAdd(_ policy: Policy) throws(DeviceError)
    func policyDelete(_ policy: Policy)
    func policyFree(_ policy: Policy)

    /// Hands a packet to the device for transmission. The device takes the buffer (and returns it to its pool).
    func transmit(_ packet: PacketBuffer, metadata: OffloadMetadata)
}
