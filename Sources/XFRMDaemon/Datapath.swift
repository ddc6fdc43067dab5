// The daemon's data path on the engine (XFRMEngine; its pipeline is written at the top of Engine.swift). How many
// threads run the stack is `--workers N`:
//
//   N = 1   one intake thread polls the TUN and the outer sockets and runs every batch to completion itself.
//   N = 2   two intake threads, each running its batches to completion [parallel]: the TUN intake (read(2) per
//           packet → output path → one sendmmsg(2) per socket per batch) and the wire intake (recvmmsg(2) → input
//           path → write(2) into the TUN). An SA is either outbound or inbound, so each SA stays on one thread.
//   N > 2   the two intakes only read [sequential each] and hand batches to N workers by affinity (the SPI on input,
//           the OUT policy's first template on output) [parallel across SAs, sequential per SA]. A tunnel whose
//           template has per-CPU SAs (RFC 9611, `pcpu-num`) is spread by flow instead; worker i is CPU i and uses
//           the SA with pcpu-num i, or the tunnel's SA without one.
//
// Per-CPU SAs with N ≤ 2: all output runs on the TUN intake, which is CPU 0 (pcpu-num 0, else the unbound SA).
//
// Either way, the daemon's dispatcher rules apply: only what ESP produced goes to the wire sink or the NIC's TX
// queue; only what came out of ESP goes to the TUN sink; anything else is dropped and counted (`tun_no_policy`,
// `not_esp`, `ike_dropped`). With `--offload`, the NIC's engine threads [parallel, the device's own] do offloaded
// ESP; frames for the wire go out through a locked wire sink; packets for the host go to a worker by affinity.
// Run to completion saves a thread wake-up per packet on each side, which is what bounds a single TCP stream
// through a userspace tunnel on a small machine.
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
import XFRMWire

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
    /// The XFRM interface the TUN stands for (`--if-id`; 0: an ordinary interface): packets read from it are looked up
    /// with this if_id, so only policies (and so SAs) with it protect them, as for traffic routed into
    /// `ip link add ... type xfrm if_id N` (≈ xfrmi_xmit).
    public let ifID: UInt32
    /// The TUN device was opened with IFF_VNET_HDR and TSO/CSUM offloads.
    public private(set) var tunOffload: Bool
    /// The TUN also took USO4/USO6 (UDP superpackets both ways; kernel 6.2 and later).
    public private(set) var tunUSO: Bool = false
    private let stack: XFRMStack
    private let logger: Logger
    private let pool = PacketPool(count: 4096, slotSize: 4096, headroom: 256)
    /// Free packet buffers (a queue-depth view for the metrics).
    public var poolFree: Int { self.pool.available }
    /// Packets waiting per worker.
    public var workerDepths: [Int] { self.workers?.depths ?? [] }
    private let tunFD: Int32
    /// A NETLINK_ROUTE socket in the IPv4 and IPv6 address groups: an address added on the host counts as local from
    /// the packet after (as the kernel's local table does), not from the next once-a-second refresh; -1 if the
    /// kernel refused it (the refresh alone then).
    private let addressEvents: Int32
    private let sockets: OuterSockets
    private let wanIfindex: Int32
    /// The outer interface in the stack's network model: the TUN's name, or the kernel interface the NIC stands for.
    public let outerName: String
    /// The workers when the intakes hand off (N > 2, or the NIC's host side); nil when the intakes run to completion.
    private var workers: WorkerPool? = nil
    /// One dispatcher per intake thread when it runs its batches itself.
    private var inlineDispatchers: [Dispatcher] = []
    /// The key manager's relay (`--ike-port`), if any.
    private var ikeRelay: IKERelay? = nil
    /// The simulated NIC on the outer side (`--offload`), if any.
    public private(set) var nic: SimulatedNIC? = nil
    private let stopping = Atomic<Bool>(false)
    private var threads: [pthread_t] = []
    /// Set when the data path had to stop on its own (its TUN device went away): the daemon exits with an error.
    public let failed = Atomic<Bool>(false)

    /// Opens the TUN device and the outer sockets and prepares the stack's network model. Throws one clear error
    /// (missing privileges, no /dev/net/tun, port in use).
    ///
    /// `offloadDevice`: the kernel interface the simulated NIC stands for (its name and index), so that a key manager
    /// that finds the interface holding its outer address can name it in XFRMA_OFFLOAD_DEV; default: the TUN's.
    public init(stack: XFRMStack, tunName: String, udpPort: UInt16, rawESP: Bool, workers: Int, mark: UInt32,
                offload: DaemonOffload?, offloadDevice: String? = nil, tunOffload: Bool, ikePort: UInt16? = nil,
                shareUDPPort: Bool = false, outerMTU: Int = 1500, ifID: UInt32 = 0, logger: Logger) throws(SocketError)
    {
        self.stack = stack
        self.logger = logger
        self.workerCount = max(1, workers)
        self.ifID = ifID
        // The host's XFRM interfaces are the TUN's if_id alone: an SA of another if_id delivers as no interface's.
        stack.setXFRMInterface(ifID: ifID)
        // Every ICMP error goes into the TUN, whose kernel refuses its own addresses as a source.
        stack.icmpErrorsFromDestination.store(true, ordering: .relaxed)
        // The daemon's CPUs are its workers: `pcpu-num` may name any of them (≈ num_possible_cpus()).
        let cpus = stack.possibleCPUs.load(ordering: .relaxed)
        stack.possibleCPUs.store(max(cpus, UInt32(self.workerCount)), ordering: .relaxed)
        var name = [CChar](repeating: 0, count: 17)
        var offloaded = tunOffload
        var uso: Int32 = 0
        var fd = tunOffload ? xfrm_tun_open_offload(tunName, &name, &uso) : xfrm_tun_open(tunName, &name)
        if fd == -EINVAL && tunOffload {
            logger.warning("the kernel refuses TUN offloads (IFF_VNET_HDR, TSO); one packet per read and write")
            offloaded = false
            fd = xfrm_tun_open(tunName, &name)
        }
        self.tunOffload = offloaded
        self.tunUSO = offloaded && uso != 0
        guard fd >= 0 else { throw SocketError("cannot open TUN device \(tunName) (/dev/net/tun)", errno: -fd) }
        self.tunFD = fd
        self.tunName = String(cString: name)
        let up = xfrm_link_up(self.tunName)
        guard up == 0 else {
            close(fd)
            throw SocketError("cannot bring \(self.tunName) up", errno: -up)
        }
        do throws(SocketError) {
            // UDP_GRO stays off on a shared port: the GRO lookup picks a socket without the steering program, and a merged
            // batch could mix IKE into ESP (a datagram lost to each side).
            self.sockets = try OuterSockets(udpPort: udpPort, rawESP: rawESP, mark: mark, gro: !shareUDPPort,
                                            shareUDPPort: shareUDPPort)
        } catch {
            close(fd)
            throw error
        }
        let net = stack.network
        self.outerName = offloadDevice ?? self.tunName
        let hostIndex = Int32(bitPattern: if_nametoindex(self.outerName))
        if offloadDevice != nil && hostIndex <= 0 {
            close(fd)
            self.sockets.closeAll()
            throw SocketError("--offload-dev \(self.outerName): no such interface", errno: ENODEV)
        }
        do throws(NetworkError) {
            // Its MTU is the outer path's (`--outer-mtu`): what is larger is cut into fragments or refused with ICMP.
            let wan = try net.addInterface(name: self.outerName, kind: offload == nil ? "dummy" : "simnic",
                                           mtu: outerMTU, index: hostIndex > 0 ? hostIndex : nil)
            try net.modify(name: self.outerName) { (i: inout Interface) throws(NetworkError) in i.isUp = true }
            try net.addRoute(IPPrefix("0.0.0.0/0")!, device: self.outerName, via: nil)
            try net.addRoute(IPPrefix("::/0")!, device: self.outerName, via: nil)
            self.wanIfindex = wan.index
        } catch {
            close(fd)
            self.sockets.closeAll()
            throw SocketError("cannot set up the network model: \(error.message)", errno: EINVAL)
        }
        stack.nattPort.store(udpPort, ordering: .relaxed)
        if let offload {
            let nic = SimulatedNIC(name: self.outerName, ifindex: self.wanIfindex, modes: offload.modes, saCapacity: 1024,
                                   mtu: outerMTU, supportsForwardPolicies: true, algorithms: .all, pool: self.pool,
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
        if let ikePort {
            do throws(SocketError) {
                self.ikeRelay = try IKERelay(port: ikePort, sockets: self.sockets, counters: self.counters)
            } catch {
                close(fd)
                self.sockets.closeAll()
                throw error
            }
        }
        self.addressEvents = Self.openAddressEvents()
        self.refreshAddresses()
        self.makeWorkers()
    }

    deinit {
        close(self.tunFD)
        if self.addressEvents >= 0 { close(self.addressEvents) }
        self.sockets.closeAll()
    }

    private func makeDispatcher() -> Dispatcher {
        let engine = self.counters.engine
        let sinks = InterfaceSinks()
        if let nic = self.nic {
            sinks.set(nic, ifindex: self.wanIfindex)
        } else {
            sinks.set(WireSink(sockets: self.sockets, pool: self.pool, counters: self.counters, engine: engine),
                      ifindex: self.wanIfindex)
        }
        let tunSink = TUNSink(fd: self.tunFD, pool: self.pool, counters: self.counters, offload: self.tunOffload,
                              uso: self.tunUSO)
        let d = Dispatcher(stack: self.stack, pool: self.pool, rules: .daemon, counters: engine, interfaces: sinks,
                           local: tunSink, ike: self.ikeRelay.map { IKESink($0, pool: self.pool) })
        d.ifID = self.ifID
        return d
    }

    private func makeWorkers() {
        let engine = self.counters.engine
        let intakes = self.workerCount == 1 ? 1 : 2
        if self.workerCount <= 2 {
            self.inlineDispatchers = (0..<intakes).map { _ in self.makeDispatcher() }
        }
        // Workers: the configured ones when the intakes hand off; one for the NIC's host side otherwise.
        if self.workerCount > 2 || self.nic != nil {
            self.workers = WorkerPool(workers: self.workerCount > 2 ? self.workerCount : 1, stack: self.stack,
                                      pool: self.pool, counters: engine, ifID: self.ifID) { _ in self.makeDispatcher() }
        }
        if let nic = self.nic, let workers = self.workers {
            // The device's wire is the sockets; what it hands to the host goes to the workers.
            let wire = LockedSink(WireSink(sockets: self.sockets, pool: self.pool, counters: self.counters,
                                           engine: engine))
            nic.wireSend = { batch in wire.write(&batch) }
            // One submitter per engine thread (its staging arrays are the thread's own): one push per worker ring
            // per engine batch.
            let submitters = (0..<nic.engineThreads).map { _ in SendableSubmitter(workers.makeSubmitter()) }
            nic.hostReceiveBatch = { batch, thread in submitters[thread].submitter.submit(&batch) }
            nic.limitEvent = { [weak stack] _ in stack?.deviceLimitEvent() }
        }
    }

    /// Starts the workers and the intake threads.
    public func start() {
        self.workers?.start()
        let roles: [IntakeRole] = self.workerCount == 1 ? [.all] : [.tun, .wire]
        for (i, role) in roles.enumerated() {
            let context = Unmanaged.passRetained(IntakeContext(self, role, i)).toOpaque()
            var id = pthread_t()
            let rc = pthread_create(&id, nil, { arg in
                let c = Unmanaged<IntakeContext>.fromOpaque(arg!).takeRetainedValue()
                c.datapath.intake(c.role, index: c.index)
                return nil
            }, context)
            if rc == 0 { self.threads.append(id) } else { Unmanaged<IntakeContext>.fromOpaque(context).release() }
        }
    }

    /// Stops the intakes, then the workers (after what is queued), then the NIC; waits for every thread.
    public func stop() {
        self.stopping.store(true, ordering: .relaxed)
        for id in self.threads { pthread_join(id, nil) }
        self.threads = []
        self.nic?.drain()
        self.workers?.stop()
        self.nic?.shutdown()
        // The hooks hold the workers and the wire sink, which (through the dispatchers' interface sinks) hold the
        // NIC: let go of them so that a stopped datapath is freed.
        self.nic?.wireSend = nil
        self.nic?.hostReceiveBatch = nil
    }

    enum IntakeRole { case all, tun, wire }

    private final class IntakeContext {
        let datapath: Datapath
        let role: IntakeRole
        let index: Int
        init(_ d: Datapath, _ r: IntakeRole, _ i: Int) {
            self.datapath = d
            self.role = r
            self.index = i
        }
    }

    // MARK: - The intake

    /// One intake thread: polls its descriptors, reads batches and runs them itself (`inlineDispatchers[index]`) or
    /// submits them to the workers; the TUN (or only) intake also refreshes the host's addresses once a second.
    private func intake(_ role: IntakeRole, index: Int) {
        var lastRefresh: UInt64 = 0
        // Room for a whole superpacket's segments (64 KB at a 1,360-byte MSS is 49).
        var batch = PacketBatch(capacity: 2 * EngineConstants.batchSize)
        let engine = self.counters.engine
        let inline = index < self.inlineDispatchers.count ? self.inlineDispatchers[index] : nil
        let submitter = self.workers?.makeSubmitter()
        func deliver(_ batch: inout PacketBatch) {
            if let inline { inline.run(&batch) } else { submitter!.submit(&batch) }
        }
        var fds: [pollfd] = []
        var tun: TUNSource? = nil
        if role != .wire {
            tun = TUNSource(fd: self.tunFD, pool: self.pool, counters: self.counters, engine: engine,
                            offload: self.tunOffload)
            fds.append(pollfd(fd: self.tunFD, events: Int16(POLLIN), revents: 0))
        }
        var outer: [any OuterReader] = []
        if role != .tun {
            let s = self.sockets
            for (fd, framing, gro) in [(s.udp4, Framing.udp4, s.udp4GRO), (s.raw4, .raw4, false),
                                       (s.udp6, .udp6, s.udp6GRO), (s.raw6, .raw6, false)] where fd >= 0 {
                if gro {
                    outer.append(OuterGROSource(fd: fd, framing: framing, udpPort: s.udpPort, ifindex: self.wanIfindex,
                                                pool: self.pool, counters: self.counters, engine: engine))
                } else {
                    outer.append(OuterSource(fd: fd, framing: framing, udpPort: s.udpPort, ifindex: self.wanIfindex,
                                             pool: self.pool, counters: self.counters, engine: engine))
                }
                fds.append(pollfd(fd: fd, events: Int16(POLLIN), revents: 0))
            }
        }
        let first = tun == nil ? 0 : 1  // the index of the first outer socket in fds
        let relay = role != .tun ? self.ikeRelay : nil
        if let relay { fds.append(pollfd(fd: relay.fd, events: Int16(POLLIN), revents: 0)) }
        // The address events go with the refresh, to the TUN (or only) intake: after the relay, last.
        let addresses = role != .wire && self.addressEvents >= 0 ? fds.count : nil
        if addresses != nil { fds.append(pollfd(fd: self.addressEvents, events: Int16(POLLIN), revents: 0)) }
        defer { for o in outer { o.releaseHeld() } }
        while !self.stopping.load(ordering: .relaxed) && !self.failed.load(ordering: .relaxed) {
            for i in fds.indices { fds[i].revents = 0 }
            // A superpacket half cut (its batch was full, or the pool ran dry) goes on without waiting for the TUN.
            let pending = (tun?.hasPending ?? false) || outer.contains { $0.hasPending }
            let n = poll(&fds, nfds_t(fds.count), pending ? 0 : 200)
            if n > 0 || pending {
                if let tun {
                    if fds[0].revents & Int16(POLLERR | POLLHUP | POLLNVAL) != 0 {
                        self.logger.error("the TUN device \(self.tunName) went away; the data path stops")
                        self.failed.store(true, ordering: .relaxed)
                        return
                    }
                    // A bounded number of batches per source per wakeup, so one busy source cannot starve another.
                    if fds[0].revents & Int16(POLLIN) != 0 || pending {
                        for _ in 0..<4 {
                            let got = tun.read(into: &batch)
                            let full = got == batch.capacity
                            deliver(&batch)
                            if !full && !tun.hasPending { break }
                        }
                    }
                }
                if let relay, fds[first + outer.count].revents & Int16(POLLIN) != 0 { relay.drainReplies() }
                if let a = addresses, fds[a].revents & Int16(POLLIN) != 0 {
                    Self.drain(self.addressEvents)
                    self.refreshAddresses()
                }
                for (i, source) in outer.enumerated()
                where fds[first + i].revents & Int16(POLLIN) != 0 || source.hasPending {
                    for _ in 0..<4 {
                        _ = source.read(into: &batch)
                        if let nic = self.nic {
                            for j in 0..<batch.count { nic.receiveFromWire(batch[j].buffer) }
                            batch.removeAll()
                        } else {
                            deliver(&batch)
                        }
                        if !source.mayHaveMore { break }
                    }
                }
            }
            if role != .wire {
                let now = self.stack.clock.now
                if now != lastRefresh {
                    lastRefresh = now
                    self.refreshAddresses()
                }
            }
        }
    }

    // MARK: - Host addresses

    /// A non-blocking NETLINK_ROUTE socket joined to RTMGRP_IPV4_IFADDR and RTMGRP_IPV6_IFADDR, or -1.
    private static func openAddressEvents() -> Int32 {
        let fd = socket(AF_NETLINK, Int32(SOCK_RAW.rawValue) | Int32(SOCK_CLOEXEC.rawValue)
                            | Int32(SOCK_NONBLOCK.rawValue), netlinkRoute)
        guard fd >= 0 else { return -1 }
        var local = SockaddrNetlink(groups: 0x10 | 0x100)  // RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR
        let bound = withUnsafePointer(to: &local) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<SockaddrNetlink>.size))
            }
        }
        guard bound == 0 else {
            close(fd)
            return -1
        }
        return fd
    }

    /// Reads whatever the socket holds (the messages only say "something changed"; an overrun, ENOBUFS, too).
    private static func drain(_ fd: Int32) {
        var scratch = [UInt8](repeating: 0, count: 8192)
        while scratch.withUnsafeMutableBytes({ recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }) > 0 {}
    }

    /// Puts the host's current addresses on the outer interface, so ESP for them counts as local (≈ the kernel's
    /// local routes).
    private func refreshAddresses() {
        var list: UnsafeMutablePointer<ifaddrs>? = nil
        guard getifaddrs(&list) == 0 else { return }
        defer { freeifaddrs(list) }
        let known = Set(self.stack.network.interface(named: self.outerName)?.addresses.map(\.address) ?? [])
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
            try? self.stack.network.addAddress(IPPrefix(address, length: full), device: self.outerName)
        }
    }
}

/// A worker pool submitter that only one NIC engine thread uses (the thread whose index it has).
struct SendableSubmitter: @unchecked Sendable {
    let submitter: WorkerPool.Submitter
    init(_ submitter: WorkerPool.Submitter) { self.submitter = submitter }
}

/// A sink for callers on several threads (the NIC's engine threads): each hands over its engine batch of frames
/// under one lock, so the wire sink groups them as it does the stack's batches (one sendmmsg(2) per socket, UDP GSO
/// where the datagrams allow) instead of one send per frame.
final class LockedSink: @unchecked Sendable {
    private let sink: any PacketSink
    private let lock = XFRMMutex(())

    init(_ sink: any PacketSink) { self.sink = sink }

    func write(_ batch: inout PacketBatch) {
        self.lock.withLock { _ in self.sink.write(&batch) }
    }
}
