import Synchronization
import XFRMCore
import XFRMPacket

/// An offload device that records every call and fails on request (for the core's offload rules; the simulated
/// NIC is the faithful one).
public final class FakeOffloadDevice: XfrmOffloadDevice, @unchecked Sendable {
    public let name: String
    public var features: DeviceFeatures
    public var callbacks: DeviceCallbacks
    public var supportedTypes: Set<OffloadType>
    /// The next stateAdd/policyAdd fails with this error (once).
    public var failNextAdd: DeviceError?
    /// Every call in order, e.g. "stateAdd 0x1000", "stateDelete 0x1000", "stateFree 0x1000".
    public let calls = XFRMMutex<[String]>([])
    /// Counters updateStats returns, by SPI.
    public let counters = XFRMMutex<[UInt32: DeviceSACounters]>([:])
    /// Packets the host handed to the device.
    public let transmitted = XFRMMutex<[([UInt8], OffloadMetadata)]>([])
    public var acceptOffloadOK = true
    /// Runs inside `offloadOK`: between an output lookup that found the SA and the SA's lock (a test's way to race
    /// a rekey with a packet deterministically).
    public var duringOffloadOK: ((SecurityAssociation) -> Void)? = nil
    private var nextHandle: UInt64 = 0x8000_0000

    public init(name: String = "fake0", features: DeviceFeatures = [.hwESP],
                callbacks: DeviceCallbacks = DeviceCallbacks(rawValue: 0x1ff),
                supportedTypes: Set<OffloadType> = [.crypto, .packet]) {
        self.name = name
        self.features = features
        self.callbacks = callbacks
        self.supportedTypes = supportedTypes
    }

    public var callLog: [String] { self.calls.withLock { $0 } }

    private func log(_ s: String) { self.calls.withLock { $0.append(s) } }

    public func stateAdd(_ sa: SecurityAssociation, offload: StateOffload) throws(DeviceError) -> UInt64 {
        self.log("stateAdd 0x\(String(sa.id.spi, radix: 16)) \(offload.type.name)\(offload.acquire ? " acq" : "")")
        if let e = self.failNextAdd {
            self.failNextAdd = nil
            throw e
        }
        guard self.supportedTypes.contains(offload.type) else { throw .notSupported() }
        self.nextHandle += 1
        return self.nextHandle
    }
    public func stateDelete(_ sa: SecurityAssociation, offload: StateOffload) {
        self.log("stateDelete 0x\(String(sa.id.spi, radix: 16))")
    }
    public func stateFree(_ sa: SecurityAssociation, offload: StateOffload) {
        self.log("stateFree 0x\(String(sa.id.spi, radix: 16))")
    }
    /// `offloadOK` also refuses an SA the device no longer holds (deleted: unbound), as a real driver does.
    public var refusesUnboundSAs = false

    /// `acceptOffloadOK` (and with `refusesUnboundSAs`, never for an SA the device no longer holds).
    public func offloadOK(_ packet: PacketBuffer, sa: SecurityAssociation, offload: StateOffload) -> Bool {
        self.duringOffloadOK?(sa)
        return self.acceptOffloadOK && (!self.refusesUnboundSAs || sa.offload != nil)
    }
    public func advanceESN(_ sa: SecurityAssociation, offload: StateOffload) { self.log("advanceESN") }
    public func updateStats(_ sa: SecurityAssociation, offload: StateOffload) -> DeviceSACounters {
        self.counters.withLock { $0[sa.id.spi] } ?? DeviceSACounters()
    }
    public func policyAdd(_ policy: Policy) throws(DeviceError) {
        self.log("policyAdd \(policy.direction.name)")
        if let e = self.failNextAdd {
            self.failNextAdd = nil
            throw e
        }
    }
    public func policyDelete(_ policy: Policy) { self.log("policyDelete \(policy.direction.name)") }
    public func policyFree(_ policy: Policy) { self.log("policyFree \(policy.direction.name)") }
    public func transmit(_ packet: PacketBuffer, metadata: OffloadMetadata) {
        self.transmitted.withLock { $0.append((packet.bytes, metadata)) }
    }
}
