// A simulated host: one XFRMStack, its packet pool, and its interfaces — dummy ones (whatever is "transmitted" on
// them is captured) and simulated NICs (offload devices with their own engines and wires).
//
// Data path of a host worker (synchronous, batch-friendly):
//   send:    bytes → pooled buffer → stack.output → transmit (dummy: captured; NIC: device TX queue) |
//            offload (NIC with metadata) | ICMP error (delivered back locally) | drop (counted by the stack)
//   receive: NIC engine → hostReceive → RX queue → poll(): stack.input → deliver (captured) |
//            forward → stack.output → as above | drop
// `settle()` runs until every NIC engine is idle and the RX queue is empty, so offline runs are deterministic.

import Synchronization
import XFRMCore
import XFRMESP
import XFRMPacket
import XFRMSimulatedNIC

/// A network configuration error on a host.
public struct HostError: Error, CustomStringConvertible {
    public let description: String
    public init(_ d: String) { self.description = d }
}

/// One simulated host.
public final class SimHost: @unchecked Sendable {
    public let stack: XFRMStack
    public let pool: PacketPool
    private let nicTable = Mutex<[Int32: SimulatedNIC]>([:])
    private let rxQueue = Mutex<[(PacketBuffer, OffloadMetadata, Int32)]>([])
    private let captured = Mutex<[[UInt8]]>([])
    private let deliveredCapture = Mutex<[[UInt8]]>([])
    /// Capture what leaves dummy interfaces, what NICs put on their wires, and what is delivered locally.
    public let capture: Bool
    /// Counters of the host's own data path (XFRM drops are counted by the stack).
    public let deliveredPackets = Atomic<UInt64>(0)
    public let deliveredBytes = Atomic<UInt64>(0)
    public let transmittedPackets = Atomic<UInt64>(0)
    public let poolExhausted = Atomic<UInt64>(0)

    public init(stack: XFRMStack, poolSlots: Int = 4096, slotSize: Int = 65_536 + 1024, capture: Bool = true) {
        self.stack = stack
        self.pool = PacketPool(count: poolSlots, slotSize: slotSize, headroom: 512)
        self.capture = capture
    }

    deinit {
        for nic in self.nics { nic.shutdown() }
    }

    public var nics: [SimulatedNIC] { self.nicTable.withLock { Array($0.values) } }

    public func nic(named name: String) -> SimulatedNIC? {
        self.nicTable.withLock { $0.values.first { $0.name == name } }
    }

    public func nic(ifindex: Int32) -> SimulatedNIC? { self.nicTable.withLock { $0[ifindex] } }

    /// `link add NAME type simnic [mtu N] [sa-capacity N] [offload crypto|packet|both] [peer NAME]`.
    @discardableResult
    public func addSimulatedNIC(name: String, mtu: Int = 1500, saCapacity: Int = 33, modes: Set<OffloadType>,
                                peer: SimulatedNIC? = nil, supportsForwardPolicies: Bool = false,
                                algorithms: NICAlgorithms = .all, engineThreads: Int = 1) throws(HostError)
        -> SimulatedNIC
    {
        let iface: Interface
        do throws(NetworkError) {
            iface = try self.stack.network.addInterface(name: name, kind: "simnic", mtu: mtu)
        } catch {
            throw HostError(error.message)
        }
        let nic = SimulatedNIC(name: name, ifindex: iface.index, modes: modes, saCapacity: saCapacity, mtu: mtu,
                               supportsForwardPolicies: supportsForwardPolicies, algorithms: algorithms, pool: self.pool,
                               engineThreads: engineThreads)
        do throws(DeviceError) {
            try self.stack.attachDevice(nic, ifindex: iface.index)
        } catch {
            _ = try? self.stack.network.deleteInterface(name: name)
            nic.shutdown()
            throw HostError(error.message)
        }
        // The NIC follows its interface: down until `link set up`, and every later state or MTU change.
        nic.setLinkUp(iface.isUp)
        nic.setMTU(iface.mtu)
        let ifindex = iface.index
        self.stack.network.observe { [weak nic] i in
            guard i.index == ifindex, let nic else { return }
            nic.setLinkUp(i.isUp)
            nic.setMTU(i.mtu)
        }
        self.wire(nic)
        if let peer { nic.connect(peer: peer) }
        self.nicTable.withLock { $0[iface.index] = nic }
        return nic
    }

    /// Connects a NIC's host side and taps to this host.
    public func wire(_ nic: SimulatedNIC) {
        let ifindex = nic.ifindex
        let pool = nic.pool
        nic.hostReceive = { [weak self] buffer, meta in
            guard let self else {
                pool.release(buffer)  // the host is gone: the buffer still goes back
                return
            }
            self.rxQueue.withLock { $0.append((buffer, meta, ifindex)) }
        }
        nic.limitEvent = { [weak self] _ in self?.stack.deviceLimitEvent() }
        if self.capture {
            nic.wireTap = { [weak self] bytes in self?.captured.withLock { $0.append(bytes) } }
        }
    }

    /// Removes a NIC (`link del`): its SAs and policies go with it.
    public func removeNIC(name: String) throws(HostError) {
        guard let nic = self.nic(named: name) else { throw HostError("Cannot find device \"\(name)\"") }
        self.stack.deviceDown(ifindex: nic.ifindex, detach: true)
        nic.disconnect()
        nic.shutdown()
        self.nicTable.withLock { _ = $0.removeValue(forKey: nic.ifindex) }
        _ = try? self.stack.network.deleteInterface(name: name)
    }

    // MARK: - Data path

    /// Sends a locally generated IP packet.
    public func send(_ bytes: [UInt8]) {
        guard var buf = self.pool.allocate() else {
            self.poolExhausted.wrappingAdd(1, ordering: .relaxed)
            return
        }
        guard buf.append(contentsOf: bytes) else {
            self.pool.release(buf)
            return
        }
        self.sendBuffer(&buf)
    }

    /// Sends a packet already in a pooled buffer; the host takes the buffer.
    public func sendBuffer(_ buf: inout PacketBuffer, forwarded: Bool = false) {
        let result = self.stack.output(&buf, forwarded: forwarded)
        self.dispatch(result, &buf, forwarded: forwarded)
    }

    private func dispatch(_ result: OutputResult, _ buf: inout PacketBuffer, forwarded: Bool) {
        switch result {
        case .transmit(let ifindex):
            self.transmittedPackets.wrappingAdd(1, ordering: .relaxed)
            if let nic = self.nic(ifindex: ifindex) {
                nic.transmit(buf, metadata: OffloadMetadata())
            } else {
                if self.capture { self.captured.withLock { $0.append(buf.bytes) } }
                self.pool.release(buf)
            }
        case .offload(let ifindex, let meta):
            self.transmittedPackets.wrappingAdd(1, ordering: .relaxed)
            if let nic = self.nic(ifindex: ifindex) {
                nic.transmit(buf, metadata: meta)
            } else {
                self.pool.release(buf)
            }
        case .icmpError:
            // The error goes back to the sender: delivered here for locally generated traffic, routed back for
            // forwarded traffic.
            if !forwarded || XFRMStack.destination(of: buf).map(self.stack.network.isLocal) ?? true {
                self.deliver(buf)
            } else {
                let r = self.stack.output(&buf)
                if case .icmpError = r {
                    self.pool.release(buf)  // never answer an error with an error
                } else {
                    self.dispatch(r, &buf, forwarded: false)
                }
            }
        case .dropped:
            self.pool.release(buf)
        }
    }

    private func deliver(_ buf: PacketBuffer) {
        self.deliveredPackets.wrappingAdd(1, ordering: .relaxed)
        self.deliveredBytes.wrappingAdd(UInt64(buf.count), ordering: .relaxed)
        if self.capture {
            let bytes = buf.bytes
            self.captured.withLock { $0.append(bytes) }
            self.deliveredCapture.withLock { $0.append(bytes) }
        }
        self.pool.release(buf)
    }

    /// Receives a packet on a dummy interface (as if from its wire).
    public func receive(_ bytes: [UInt8], ifindex: Int32) {
        guard var buf = self.pool.allocate() else {
            self.poolExhausted.wrappingAdd(1, ordering: .relaxed)
            return
        }
        guard buf.append(contentsOf: bytes) else {
            self.pool.release(buf)
            return
        }
        self.handleReceived(&buf, metadata: nil, ifindex: ifindex)
    }

    private func handleReceived(_ buf: inout PacketBuffer, metadata: OffloadMetadata?, ifindex: Int32) {
        switch self.stack.input(&buf, ifindex: ifindex, metadata: metadata) {
        case .deliver:
            self.deliver(buf)
        case .forward:
            self.sendBuffer(&buf, forwarded: true)
        case .ike, .dropped:
            self.pool.release(buf)
        }
    }

    /// Processes up to `limit` packets the NICs handed to the host; returns how many.
    @discardableResult
    public func poll(limit: Int = .max) -> Int {
        let batch = self.rxQueue.withLock { q -> [(PacketBuffer, OffloadMetadata, Int32)] in
            if q.count <= limit {
                let all = q
                q.removeAll(keepingCapacity: true)
                return all
            }
            let head = Array(q.prefix(limit))
            q.removeFirst(limit)
            return head
        }
        for var (buf, meta, ifindex) in batch {
            self.handleReceived(&buf, metadata: meta, ifindex: ifindex)
        }
        self.stack.pollDeviceEvents()
        return batch.count
    }

    /// Packets waiting in the RX queue.
    public var pendingReceive: Int { self.rxQueue.withLock { $0.count } }

    /// Runs until every NIC (of this host and `others`) is idle and every RX queue is empty.
    public func settle(with others: [SimHost] = []) {
        let hosts = [self] + others
        while true {
            for h in hosts { for nic in h.nics { nic.drain() } }
            var progress = 0
            for h in hosts { progress += h.poll() }
            if progress == 0 {
                for h in hosts { for nic in h.nics { nic.drain() } }
                if hosts.allSatisfy({ $0.pendingReceive == 0 }) { break }
            }
        }
    }

    /// Takes every captured packet (left, put on a wire, or delivered), in order.
    public func takeCaptured() -> [[UInt8]] {
        self.captured.withLock { c in
            let out = c
            c.removeAll()
            return out
        }
    }

    /// Takes the packets delivered locally since the last call.
    public func takeDelivered() -> [[UInt8]] {
        self.deliveredCapture.withLock { c in
            let out = c
            c.removeAll()
            return out
        }
    }
}
