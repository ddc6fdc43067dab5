// The daemon's data path on the engine (XFRMEngine; its pipeline is written at the top of Engine.swift):
//
//   intake thread  [sequential]: poll(2) on the TUN and the outer sockets; reads batches (TUN: read(2) per packet;
//                  sockets: recvmmsg(2)) and submits them to the workers by affinity — or, with a simulated NIC as
//                  the outer interface, hands what the sockets received to the NIC's wire side.
//   workers        [parallel, one SA per worker]: XFRMStack.process over the batch, then the Dispatcher with the
//                  daemon's rules: only what ESP produced goes to the wire sink (one sendmmsg(2) per socket per
//                  batch) or the NIC's TX queue; only what came out of ESP goes to the TUN sink; anything else is
//                  dropped and counted (`tun_no_policy`, `not_esp`, `ike_dropped`).
//   NIC engines    [parallel, the device's own threads]: offloaded ESP; frames for the wire go out through a
//                  locked wire sink; packets for the host go to the workers by affinity.
//
// The stack's network model has one interface for the outer side, named and numbered as the daemon's TUN device on
// the host (so that `offload dev xfrm0` names it), holding the host's addresses (read with getifaddrs and refreshed
// every second) with default routes: outer packets leave through the host's IP stack.

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CXFRMSys
import Logging
import Synchronization
import XFRMCore
import XFRMEngine
import XFRMPacket
import XFRMSimulatedNIC

/// Counters of what the data path did with packets outside the stack's own xfrm_stat counters.
public final class DatapathCounters: Sendable {
    public let tunRead = Atomic<UInt64>(0)
    public let tunWritten = Atomic<UInt64>(0)
    public let wireSent = Atomic<UInt64>(0)
    public let wireReceived = Atomic<UInt64>(0)
    public let sendErrors = Atomic<UInt64>(0)
    public let noBuffer = Atomic<UInt64>(0)
    /// Arrived on an outer socket without being framable (no destination address): never given to the stack.
    public let notESP = Atomic<UInt64>(0)
    /// Outer datagrams larger than the receive buffer (truncated by the kernel): dropped.
    public let truncated = Atomic<UInt64>(0)
    /// The engine's counters (unprotected output, undecapsulated input, IKE, full rings).
    public let engine = EngineCounters()
    init() {}

    /// Every counter by its metric label.
    public var snapshot: [String: UInt64] {
        ["tun_read": self.tunRead.load(ordering: .relaxed), "tun_written": self.tunWritten.load(ordering: .relaxed),
         "tun_no_policy": self.engine.unprotected.load(ordering: .relaxed),
         "wire_sent": self.wireSent.load(ordering: .relaxed),
         "wire_received": self.wireReceived.load(ordering: .relaxed),
         "ike_dropped": self.engine.ike.load(ordering: .relaxed),
         "send_errors": self.sendErrors.load(ordering: .relaxed),
         "no_buffer": self.noBuffer.load(ordering: .relaxed),
         "not_esp": self.notESP.load(ordering: .relaxed) + self.engine.notDecapsulated.load(ordering: .relaxed),
         "truncated": self.truncated.load(ordering: .relaxed),
         "ring_full": self.engine.ringFull.load(ordering: .relaxed)]
    }
}

/// The offload a daemon's outer interface offers (`xfrmd --offload`): a simulated NIC between the stack and the
/// sockets, with the modes it takes.
public enum DaemonOffload: String, Sendable, CaseIterable {
    case crypto, packet, both
    var modes: Set<OffloadType> {
        switch self {
        case .crypto: [.crypto]
        case .packet: [.packet]
        case .both: [.crypto, .packet]
        }
    }
}

public final class Datapath: @unchecked Sendable {
    public let tunName: String
    public let counters = DatapathCounters()
    public let workerCount: Int
    private let stack: XFRMStack
    private let logger: Logger
    private let pool = PacketPool(count: 4096, slotSize: 4096, headroom: 256)
    /// Free packet buffers (a queue-depth view for the metrics).
    public var poolFree: Int { self.pool.available }
    /// Packets waiting per worker.
    public var workerDepths: [Int] { self.workers.depths }
    private let tunFD: Int32
    private let sockets: OuterSockets
    private let wanIfindex: Int32
    private var workers: WorkerPool!
    /// The simulated NIC on the outer side (`--offload`), if any.
    public private(set) var nic: SimulatedNIC? = nil
    private let stopping = Atomic<Bool>(false)
    private var thread: pthread_t? = nil
    /// Set when the data path had to stop on its own (its TUN device went away): the daemon exits with an error.
    public let failed = Atomic<Bool>(false)

    /// Opens the TUN device and the outer sockets and prepares the stack's network model. Throws one clear error
    /// (missing privileges, no /dev/net/tun, port in use).
    public init(stack: XFRMStack, tunName: String, udpPort: UInt16, rawESP: Bool, workers: Int, mark: UInt32,
                offload: DaemonOffload?, logger: Logger) throws(SocketError)
    {
        self.stack = stack
        self.logger = logger
        self.workerCount = max(1, workers)
        var name = [CChar](repeating: 0, count: 17)
        let fd = xfrm_tun_open(tunName, &name)
        guard fd >= 0 else { throw SocketError("cannot open TUN device \(tunName) (/dev/net/tun)", errno: -fd) }
        self.tunFD = fd
        self.tunName = String(cString: name)
        let up = xfrm_link_up(self.tunName)
        guard up == 0 else {
            close(fd)
            throw SocketError("cannot bring \(self.tunName) up", errno: -up)
        }
        do throws(SocketError) {
            self.sockets = try OuterSockets(udpPort: udpPort, rawESP: rawESP, mark: mark)
        } catch {
            close(fd)
            throw error
        }
        let net = stack.network
        let hostIndex = Int32(bitPattern: if_nametoindex(self.tunName))
        do throws(NetworkError) {
            let wan = try net.addInterface(name: self.tunName, kind: offload == nil ? "dummy" : "simnic",
                                           index: hostIndex > 0 ? hostIndex : nil)
            try net.modify(name: self.tunName) { (i: inout Interface) throws(NetworkError) in i.isUp = true }
            try net.addRoute(IPPrefix("0.0.0.0/0")!, device: self.tunName, via: nil)
            try net.addRoute(IPPrefix("::/0")!, device: self.tunName, via: nil)
            self.wanIfindex = wan.index
        } catch {
            close(fd)
            self.sockets.closeAll()
            throw SocketError("cannot set up the network model: \(error.message)", errno: EINVAL)
        }
        stack.nattPort.store(udpPort, ordering: .relaxed)
        if let offload {
            let nic = SimulatedNIC(name: self.tunName, ifindex: self.wanIfindex, modes: offload.modes, saCapacity: 1024,
                                   mtu: 1500, supportsForwardPolicies: true, algorithms: .all, pool: self.pool,
                                   engineThreads: 1)
            do throws(DeviceError) {
                try stack.attachDevice(nic, ifindex: self.wanIfindex)
            } catch {
                close(fd)
                self.sockets.closeAll()
                throw SocketError("cannot attach the simulated NIC: \(error.message)", errno: EINVAL)
            }
            nic.setLinkUp(true)
            self.nic = nic
        }
        self.refreshAddresses()
        self.makeWorkers()
    }

    deinit {
        close(self.tunFD)
        self.sockets.closeAll()
    }

    private func makeWorkers() {
        let tunSink = TUNSink(fd: self.tunFD, pool: self.pool, counters: self.counters)
        let engine = self.counters.engine
        self.workers = WorkerPool(workers: self.workerCount, stack: self.stack, pool: self.pool, counters: engine) {
            [stack, pool, sockets, counters, wanIfindex, nic] _ in
            let sinks = InterfaceSinks()
            if let nic {
                sinks.set(NICTransmitSink(nic), ifindex: wanIfindex)
            } else {
                sinks.set(WireSink(sockets: sockets, pool: pool, counters: counters, engine: engine),
                          ifindex: wanIfindex)
            }
            return Dispatcher(stack: stack, pool: pool, rules: .daemon, counters: engine, interfaces: sinks,
                              local: tunSink)
        }
        if let nic {
            // The device's wire is the sockets; what it hands to the host goes to the workers.
            let wire = LockedSink(WireSink(sockets: self.sockets, pool: self.pool, counters: self.counters,
                                           engine: engine))
            nic.wireSend = { buffer in wire.send(buffer) }
            let workers = self.workers!
            nic.hostReceive = { buffer, meta in
                workers.submitOne(PacketBatch.Packet(buffer, stage: .input, ifindex: nic.ifindex, metadata: meta))
            }
            nic.limitEvent = { [weak stack] _ in stack?.deviceLimitEvent() }
        }
    }

    /// Starts the workers and the intake thread.
    public func start() {
        self.workers.start()
        let context = Unmanaged.passRetained(self).toOpaque()
        var id = pthread_t()
        let rc = pthread_create(&id, nil, { arg in
            let datapath = Unmanaged<Datapath>.fromOpaque(arg!).takeRetainedValue()
            datapath.intake()
            return nil
        }, context)
        if rc == 0 { self.thread = id } else { Unmanaged<Datapath>.fromOpaque(context).release() }
    }

    /// Stops the intake, then the workers (after what is queued), then the NIC; waits for every thread.
    public func stop() {
        self.stopping.store(true, ordering: .relaxed)
        if let id = self.thread { pthread_join(id, nil) }
        self.thread = nil
        self.nic?.drain()
        self.workers.stop()
        self.nic?.shutdown()
    }

    // MARK: - The intake

    private func intake() {
        var lastRefresh: UInt64 = 0
        var batch = PacketBatch()
        let engine = self.counters.engine
        let tun = TUNSource(fd: self.tunFD, pool: self.pool, counters: self.counters, engine: engine)
        var fds = [pollfd(fd: self.tunFD, events: Int16(POLLIN), revents: 0)]
        var outer: [OuterSource] = []
        for (fd, framing) in [(self.sockets.udp4, Framing.udp4), (self.sockets.raw4, .raw4),
                              (self.sockets.udp6, .udp6), (self.sockets.raw6, .raw6)] where fd >= 0 {
            outer.append(OuterSource(fd: fd, framing: framing, udpPort: self.sockets.udpPort, ifindex: self.wanIfindex,
                                     pool: self.pool, counters: self.counters, engine: engine))
            fds.append(pollfd(fd: fd, events: Int16(POLLIN), revents: 0))
        }
        defer { for o in outer { o.releaseHeld() } }
        while !self.stopping.load(ordering: .relaxed) {
            for i in fds.indices { fds[i].revents = 0 }
            let n = poll(&fds, nfds_t(fds.count), 200)
            if n > 0 {
                if fds[0].revents & Int16(POLLERR | POLLHUP | POLLNVAL) != 0 {
                    self.logger.error("the TUN device \(self.tunName) went away; the data path stops")
                    self.failed.store(true, ordering: .relaxed)
                    return
                }
                // A bounded number of batches per source per wakeup, so one busy source cannot starve the others.
                if fds[0].revents & Int16(POLLIN) != 0 {
                    for _ in 0..<4 {
                        let got = tun.read(into: &batch)
                        self.workers.submit(&batch)
                        if got < batch.capacity { break }
                    }
                }
                for (i, source) in outer.enumerated() where fds[i + 1].revents & Int16(POLLIN) != 0 {
                    for _ in 0..<4 {
                        let got = source.read(into: &batch)
                        if let nic = self.nic {
                            for j in 0..<batch.count { nic.receiveFromWire(batch[j].buffer) }
                            batch.removeAll()
                        } else {
                            self.workers.submit(&batch)
                        }
                        if got < EngineConstants.batchSize { break }
                    }
                }
            }
            let now = self.stack.clock.now
            if now != lastRefresh {
                lastRefresh = now
                self.refreshAddresses()
            }
        }
    }

    // MARK: - Host addresses

    /// Puts the host's current addresses on the outer interface, so ESP for them counts as local (≈ the kernel's
    /// local routes).
    private func refreshAddresses() {
        var list: UnsafeMutablePointer<ifaddrs>? = nil
        guard getifaddrs(&list) == 0 else { return }
        defer { freeifaddrs(list) }
        let known = Set(self.stack.network.interface(named: self.tunName)?.addresses.map(\.address) ?? [])
        var cursor = list
        while let ifa = cursor {
            defer { cursor = ifa.pointee.ifa_next }
            guard let sa = ifa.pointee.ifa_addr else { continue }
            var address: IPAddress? = nil
            if Int32(sa.pointee.sa_family) == AF_INET {
                let a = sa.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { $0.pointee.sin_addr.s_addr }
                address = .v4(UInt32(bigEndian: a))
            } else if Int32(sa.pointee.sa_family) == AF_INET6 {
                var a6 = sa.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { $0.pointee.sin6_addr }
                address = withUnsafeMutableBytes(of: &a6) { IPAddress.loadV6(from: $0.baseAddress!, at: 0) }
            }
            guard let address, !known.contains(address) else { continue }
            let full: UInt8 = address.version == 4 ? 32 : 128
            try? self.stack.network.addAddress(IPPrefix(address, length: full), device: self.tunName)
        }
    }
}

/// The simulated NIC's TX queue, for the workers: plaintext with packet-offload metadata, ESP to seal with
/// crypto-offload metadata, or ESP already sealed in software.
final class NICTransmitSink: PacketSink {
    let nic: SimulatedNIC
    init(_ nic: SimulatedNIC) { self.nic = nic }
    func write(_ batch: inout PacketBatch) {
        for i in 0..<batch.count { self.nic.transmit(batch[i].buffer, metadata: batch[i].metadata ?? OffloadMetadata()) }
        batch.removeAll()
    }
}

/// A sink for callers on several threads (the NIC's engine threads), one packet at a time under a lock.
final class LockedSink: @unchecked Sendable {
    private let sink: any PacketSink
    private let lock = Mutex(())
    private var batch = PacketBatch(capacity: 1)

    init(_ sink: any PacketSink) { self.sink = sink }

    func send(_ buffer: PacketBuffer) {
        self.lock.withLock { _ in
            self.batch.append(PacketBatch.Packet(buffer, stage: .output))
            self.sink.write(&self.batch)
        }
    }
}
