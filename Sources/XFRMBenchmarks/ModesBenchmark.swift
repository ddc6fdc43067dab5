// `xfrm-bench modes`: the four-mode table of the packet-offload series, on simulated hosts.
//
// The same traffic — 1420-byte inner IPv4/UDP packets, one direction, host A (10.0.1.1) → host B (10.0.2.1) — goes
// through two SimHosts joined by two SimulatedNICs (A.sim0 192.0.2.1 ⟷ B.sim0 192.0.2.2, tunnel mode,
// rfc4106(gcm(aes)) with a 128-bit key) in four configurations:
//
//   baseline   no IPsec at all
//   software   ESP in the host stacks (A seals; B opens, checks replay and policy)
//   crypto     crypto offload: A's stack builds ESP and A's NIC seals; B's NIC opens and B's stack does the rest
//   packet     packet offload: the NICs do all of ESP (with their copies of the policies); the host stacks only
//              route and look policies (and, on A, the SA) up
//
// with 1 and 2 worker threads per host: A's threads loop sending (one UDP flow, policy pair and SA pair per
// thread), B's threads loop `poll`. Per configuration, best of N rounds (rounds interleave modes and thread counts):
//   - throughput: inner bytes delivered at B × 8 / wall time, in Gbps;
//   - host CPU per packet: the CPU time (CLOCK_THREAD_CPUTIME_ID) of the host worker threads — A's senders plus
//     B's pollers, never the NICs' engine threads — divided by the packets delivered at B. The headline figure is
//     the threads' busy time: their whole loops minus the time they spent waiting (window full, nothing to poll),
//     because on this VM a sleep that idles a core charges the sleeper up to ~40 µs of CPU time, which would
//     measure the hypervisor, not the stack. The loop figure with the waits is printed beside it;
//   - both as a ratio to the baseline at the same thread count, measured in the same run.
//
// Flow control: A's senders keep at most `--window` packets in flight (sent and not yet delivered at B) and never
// send without free pool slots, so the NICs' bounded queues and the pools never overflow; an idle thread sleeps
// 50 µs (≈ interrupt moderation; `--wait yield` spins on sched_yield instead). Every run must deliver every packet
// it sent with no drop anywhere, and the NIC and SA counters must show ESP on the wire done where the mode says
// (and clear traffic in baseline), or the benchmark stops with an error.
//
// The simulated NICs' engine threads run on the same cores as the host threads (this machine has 2), so the
// throughput column is bounded by the total CPU of hosts plus NICs, not by the host stacks alone.
//
// Options: --packets N (per run; default 250000, ~30 s in all on 2 cores), --rounds N (default 5), --svg PATH
// (write the chart there; no chart without it — `--svg docs/modes.svg` refreshes the README's), --threads 1,2, --modes baseline,software,crypto,packet, --nic-threads N (default 1: the
// simulated NIC does not keep one SA's packets in order across engine threads, so with more packet offload can
// see replay drops), --window N (in-flight packets, default 512), --wait sleep|yield.

import Foundation
import Synchronization
import XFRMCore
import XFRMCrypto
import XFRMESP
import XFRMPacket
import XFRMSimHost
import XFRMSimulatedNIC

enum TrafficMode: String, CaseIterable {
    case baseline
    case software
    case crypto
    case packet
}

/// What a host thread does while it has nothing to do (window full, RX queue empty).
enum WaitStrategy: String {
    /// sched_yield: the core goes to a runnable NIC engine thread if there is one.
    case yield
    /// A 50 µs sleep (≈ interrupt moderation). On this VM a sleep that idles the core costs the sleeper up to
    /// ~40 µs of CPU time, which is why the headline figure leaves waits out.
    case sleep

    @inline(__always) func pause() {
        switch self {
        case .yield: sched_yield()
        case .sleep: usleep(50)
        }
    }
}

struct ModesOptions {
    var packets = 250_000
    var rounds = 5
    var threadCounts = [1, 2]
    /// Modes to run (the table needs baseline for its ratios; it is always run).
    var modes = TrafficMode.allCases
    var nicThreads = 1
    var window = 512
    var wait = WaitStrategy.sleep
    /// Where to write the chart; nil: no chart (a plain run leaves the checkout clean).
    var svgPath: String? = nil
    var innerSize = 1420

    /// The in-flight window actually used: with more than one engine thread per NIC, packet offload's device-side
    /// replay check can see reordering too, so the window stays below its replay window (same for every mode).
    var effectiveWindow: Int {
        self.nicThreads > 1 ? min(self.window, ModesTopology.packetReplayWindow - 32) : self.window
    }
}

/// Thrown when a run does not deliver what it sent, or the wire did not carry what the mode says.
struct ModesFailure: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { self.description = d }
}

@inline(__always)
func threadCPUNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

@inline(__always)
func processCPUNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

@inline(__always)
func monotonicNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

// MARK: - Topology

/// Hosts A and B, their NICs joined by a wire, configured for one mode and `flows` flows.
///
/// Each flow (one per host thread: UDP from port 40000+i) has its own policy pair and SA pair (SPI 0x1001+i,
/// reqid 1+i), as per-CPU SAs or one tunnel per queue would: with one SA shared by two sender threads, the threads
/// race between sequence numbering (under the SA's lock) and the NIC queue and reorder the SA's packets without
/// bound, so B's replay check drops some.
final class ModesTopology {
    let mode: TrafficMode
    let a: SimHost
    let b: SimHost
    let nicA: SimulatedNIC
    let nicB: SimulatedNIC
    /// The SAs of the IPsec modes, one per flow (A: outbound, B: inbound).
    var sasA: [SecurityAssociation] = []
    var sasB: [SecurityAssociation] = []

    static let baseSPI: UInt32 = 0x1001
    static func sourcePort(flow: Int) -> UInt16 { UInt16(40_000 + flow) }
    /// Inbound replay windows. Packet offload: 128, checked by B's NIC, whose single engine thread sees each SA's
    /// packets in the order A's NIC numbered them (with more engine threads the in-flight window is capped below
    /// this). Software and crypto: B's stack checks, and B's pollers share one RX queue (SimHost has no RSS), so a
    /// poller preempted with a batch in hand lets the other get ahead of it; the largest window the stack supports
    /// keeps that from dropping packets. The check costs the same at any size (ReplayWindow is a 4096-bit ring).
    static let packetReplayWindow = 128
    static let hostReplayWindow = ReplayWindow.maximumSize

    init(mode: TrafficMode, flows: Int, nicThreads: Int, poolSlots: Int) throws {
        self.mode = mode
        self.a = SimHost(stack: XFRMStack(), poolSlots: poolSlots, slotSize: 4096, capture: false)
        self.b = SimHost(stack: XFRMStack(), poolSlots: poolSlots, slotSize: 4096, capture: false)
        self.nicA = try self.a.addSimulatedNIC(name: "sim0", mtu: 1500, modes: [.crypto, .packet],
                                               engineThreads: nicThreads)
        self.nicB = try self.b.addSimulatedNIC(name: "sim0", mtu: 1500, modes: [.crypto, .packet], peer: self.nicA,
                                               engineThreads: nicThreads)
        let sides: [(SimHost, String, String, String, String)] = [
            (self.a, "192.0.2.1/24", "10.0.1.1/24", "10.0.2.0/24", "192.0.2.2"),
            (self.b, "192.0.2.2/24", "10.0.2.1/24", "10.0.1.0/24", "192.0.2.1"),
        ]
        for (host, outer, inner, remote, gateway) in sides {
            try host.configureGateway(outer: outer, inner: inner, remote: remote, gateway: gateway)
        }
        if mode != .baseline {
            for flow in 0..<flows { try self.configureIPsec(flow: flow) }
        }
    }

    private func configureIPsec(flow: Int) throws {
        let spec = try ESPCryptoSpec.aead(name: "rfc4106(gcm(aes))",
                                          key: modesKey(20, seed: UInt8(0x42 + flow)), icvBits: 128)
        let spi = Self.baseSPI + UInt32(flow)
        let reqid = UInt32(1 + flow)
        let template = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1,
                                reqid: reqid)
        let selector = Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.0.2.0/24")!,
                                proto: 17, sourcePort: Self.sourcePort(flow: flow), sourcePortMask: 0xffff)
        func config(window: Int) -> SAConfig {
            SAConfig(id: SAID(destination: IPAddress("192.0.2.2")!, spi: spi), source: IPAddress("192.0.2.1")!,
                     selector: .any(family: 0), reqid: reqid, mode: .tunnel, replayWindow: window, crypto: spec)
        }
        let saA = try self.a.stack.makeSA(config(window: 0))
        let saB = try self.b.stack.makeSA(
            config(window: self.mode == .packet ? Self.packetReplayWindow : Self.hostReplayWindow))
        let type: OffloadType? = switch self.mode {
        case .crypto: .crypto
        case .packet: .packet
        default: nil
        }
        try self.a.stack.addState(saA, offload: type.map {
            OffloadRequest(ifindex: self.nicA.ifindex, direction: .outbound, type: $0)
        })
        try self.b.stack.addState(saB, offload: type.map {
            OffloadRequest(ifindex: self.nicB.ifindex, direction: .inbound, type: $0)
        })
        // Crypto offload falls back to software silently: make sure the device took both SAs.
        guard saA.offload?.type == type, saB.offload?.type == type else {
            throw ModesFailure("\(self.mode): the SAs were not offloaded as asked "
                               + "(A: \(String(describing: saA.offload)), B: \(String(describing: saB.offload)))")
        }
        let packet = self.mode == .packet
        try self.a.stack.addPolicy(
            Policy(selector: selector, direction: .outbound, templates: [template],
                   offload: packet ? PolicyOffload(ifindex: self.nicA.ifindex) : nil), update: false)
        try self.b.stack.addPolicy(
            Policy(selector: selector, direction: .inbound, templates: [template],
                   offload: packet ? PolicyOffload(ifindex: self.nicB.ifindex) : nil), update: false)
        self.sasA.append(saA)
        self.sasB.append(saB)
    }

    func shutdown() {
        self.nicA.disconnect()
        self.nicA.shutdown()
        self.nicB.shutdown()
    }
}

/// A snapshot of the NIC counters a run checks.
struct WireCounters {
    var txPackets: UInt64 = 0
    var txBytes: UInt64 = 0
    var cryptoTX: UInt64 = 0
    var espTX: UInt64 = 0
    var cryptoRX: UInt64 = 0
    var espRX: UInt64 = 0
    var rxPacketsB: UInt64 = 0
    var dropsA: UInt64 = 0
    var dropsB: UInt64 = 0

    init() {}

    init(_ t: ModesTopology) {
        self.txPackets = t.nicA.counter(.txPackets)
        self.txBytes = t.nicA.counter(.txBytes)
        self.cryptoTX = t.nicA.counter(.cryptoTX)
        self.espTX = t.nicA.counter(.espTX)
        self.cryptoRX = t.nicB.counter(.cryptoRX)
        self.espRX = t.nicB.counter(.espRX)
        self.rxPacketsB = t.nicB.counter(.rxPackets)
        self.dropsA = t.nicA.txDropped + t.nicA.rxDropped
        self.dropsB = t.nicB.txDropped + t.nicB.rxDropped
    }
}

// MARK: - One run

struct ModesRun {
    let mode: TrafficMode
    let threads: Int
    let packets: Int
    let wallSeconds: Double
    let deliveredBytes: UInt64
    /// CPU of A's senders plus B's pollers around their loops, of it the part spent waiting (window full, RX queue
    /// empty), and the busy part of A's senders.
    let hostCPUNanos: UInt64
    let hostWaitNanos: UInt64
    let senderBusyNanos: UInt64
    /// CPU of the whole process over the same interval (NIC engines, main thread, host threads).
    let processCPUNanos: UInt64
    /// Pauses (sleeps or yields) of A's senders (window or pool full) and of B's pollers (nothing to poll).
    let senderWaits: Int
    let pollerWaits: Int
    let wireBytesPerPacket: Double

    var gbps: Double { Double(self.deliveredBytes) * 8 / self.wallSeconds / 1e9 }
    /// Host CPU per packet doing work: the loops minus their waits.
    var hostNsPerPacket: Double { Double(self.hostCPUNanos - self.hostWaitNanos) / Double(self.packets) }
    /// Host CPU per packet around the whole loops, waits included.
    var hostLoopNsPerPacket: Double { Double(self.hostCPUNanos) / Double(self.packets) }
    var senderNsPerPacket: Double { Double(self.senderBusyNanos) / Double(self.packets) }
    var otherNsPerPacket: Double {
        Double(self.processCPUNanos &- min(self.processCPUNanos, self.hostCPUNanos)) / Double(self.packets)
    }
    /// Cores busy on average (this machine has `ProcessInfo.activeProcessorCount`).
    var coresBusy: Double { Double(self.processCPUNanos) / 1e9 / self.wallSeconds }
}

/// Shared state of one run's threads.
private final class RunControl: @unchecked Sendable {
    let go = Atomic<Bool>(false)
    let ready = Atomic<Int>(0)
    let failed = Atomic<Bool>(false)
    let sent = Atomic<Int>(0)
    /// Packets a sender could not send for want of a pool buffer.
    let drops = Atomic<Int>(0)
    let cpu: UnsafeMutablePointer<UInt64>
    /// Of `cpu`, the CPU spent waiting (window full, nothing to poll).
    let waitCPU: UnsafeMutablePointer<UInt64>
    let end: UnsafeMutablePointer<UInt64>
    let waits: UnsafeMutablePointer<Int>

    init(threads: Int) {
        self.cpu = .allocate(capacity: threads)
        self.cpu.initialize(repeating: 0, count: threads)
        self.waitCPU = .allocate(capacity: threads)
        self.waitCPU.initialize(repeating: 0, count: threads)
        self.end = .allocate(capacity: threads)
        self.end.initialize(repeating: 0, count: threads)
        self.waits = .allocate(capacity: threads)
        self.waits.initialize(repeating: 0, count: threads)
    }

    deinit {
        self.cpu.deallocate()
        self.waitCPU.deallocate()
        self.end.deallocate()
        self.waits.deallocate()
    }

    func awaitStart() {
        self.ready.wrappingAdd(1, ordering: .acquiringAndReleasing)
        while !self.go.load(ordering: .acquiring) { sched_yield() }
    }
}

/// What `SimHost.send(bytes)` does — a pooled buffer, a copy of the bytes, `sendBuffer` — with the copy made by
/// memcpy: `send` copies through `PacketBuffer.append(contentsOf:)`, a generic over `Collection` that is not
/// specialized across modules and walks the 1420 bytes one witness call (and allocation) at a time, which made the
/// copy cost ~30x the rest of the host path. False when the pool is empty (the packet is not sent).
@inline(__always)
func sendTemplate(_ host: SimHost, _ template: [UInt8]) -> Bool {
    guard var buf = host.pool.allocate() else { return false }
    let n = template.count
    template.withUnsafeBytes { buf.append(n).copyMemory(from: $0.baseAddress!, byteCount: n) }
    host.sendBuffer(&buf)
    return true
}

/// The inner packet a sender thread sends: UDP from 10.0.1.1 to 10.0.2.1, `size` bytes in all, one flow per thread
/// (built here with the stack's own header writer, so the benchmark links no test kit).
func modesTemplate(size: Int, flow: Int) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: size)
    for i in 28..<size { bytes[i] = UInt8(truncatingIfNeeded: i - 28 + flow) }
    bytes.withUnsafeMutableBytes { b in
        let p = b.baseAddress!
        IPv4Header.write(p, tos: 0, totalLength: size, identification: UInt16(flow), flags: IPv4Header.flagDF,
                         ttl: 64, proto: 17, source: 0x0a00_0101, destination: 0x0a00_0201)
        (p + 20).storeBE16(ModesTopology.sourcePort(flow: flow), at: 0)
        (p + 20).storeBE16(5201, at: 2)
        (p + 20).storeBE16(UInt16(size - 20), at: 4)
        (p + 20).storeBE16(0, at: 6)
    }
    return bytes
}

/// A fixed test key of `count` bytes (0, 1, 2, ... from `seed`).
func modesKey(_ count: Int, seed: UInt8) -> [UInt8] { (0..<count).map { UInt8(truncatingIfNeeded: $0 &+ Int(seed)) } }

func runModes(_ mode: TrafficMode, threads: Int, options o: ModesOptions) throws -> ModesRun {
    let poolSlots = max(2048, 2 * o.effectiveWindow + 512)
    let topo = try ModesTopology(mode: mode, flows: threads, nicThreads: o.nicThreads, poolSlots: poolSlots)
    defer { topo.shutdown() }
    let a = topo.a
    let b = topo.b
    let templates = (0..<threads).map { modesTemplate(size: o.innerSize, flow: $0) }

    // Warm-up on the main thread: the whole path once per flow, a few hundred packets, all of them delivered.
    let warmup = 256
    for i in 0..<warmup {
        guard sendTemplate(a, templates[i % threads]) else { throw ModesFailure("warm-up: A's pool is empty") }
    }
    let warmDeadline = monotonicNanos() + 5_000_000_000
    while b.deliveredPackets < UInt64(warmup) {
        if b.poll(limit: 64) == 0 { usleep(50) }
        if monotonicNanos() > warmDeadline {
            throw ModesFailure("\(mode)/\(threads): warm-up delivered \(b.deliveredPackets) "
                               + "of \(warmup) packets; NIC A: \(topo.nicA.debugDescription)")
        }
    }
    let base = WireCounters(topo)
    let deliveredBase = b.deliveredPackets
    let bytesBase = b.deliveredBytes
    let exhaustedBase = a.poolExhausted + b.poolExhausted
    let target = UInt64(o.packets)

    let control = RunControl(threads: 2 * threads)
    let done = DispatchGroup()
    let window = o.effectiveWindow
    let wait = o.wait
    let burst = 16

    // A's senders.
    for i in 0..<threads {
        let quota = o.packets / threads + (i < o.packets % threads ? 1 : 0)
        let template = templates[i]
        done.enter()
        let t = Thread {
            control.awaitStart()
            let c0 = threadCPUNanos()
            var sent = 0
            var waits = 0
            var waitCPU: UInt64 = 0
            var drops = 0
            @inline(__always) func mayContinue() -> Bool {
                let delivered = Int(b.deliveredPackets &- deliveredBase)
                let inFlight = control.sent.load(ordering: .relaxed) - delivered
                return inFlight + burst <= window && a.pool.available > 2 * burst
            }
            while sent < quota {
                if !mayContinue() {
                    let w0 = threadCPUNanos()
                    repeat {
                        waits += 1
                        wait.pause()
                    } while !mayContinue() && !control.failed.load(ordering: .relaxed)
                    waitCPU &+= threadCPUNanos() &- w0
                    if control.failed.load(ordering: .relaxed) { break }
                }
                // Counted in flight before they are numbered, so a sender preempted mid-burst holds back the
                // others.
                let n = min(burst, quota - sent)
                control.sent.wrappingAdd(n, ordering: .relaxed)
                for _ in 0..<n {
                    // ≈ SimHost.send(template), with the copy done by memcpy (see `sendTemplate`).
                    if !sendTemplate(a, template) { drops += 1 }
                }
                sent += n
            }
            control.cpu[i] = threadCPUNanos() &- c0
            control.waitCPU[i] = waitCPU
            control.end[i] = monotonicNanos()
            control.waits[i] = waits
            control.drops.wrappingAdd(drops, ordering: .relaxed)
            done.leave()
        }
        t.name = "hostA-send\(i)"
        t.start()
    }
    // B's pollers.
    for i in 0..<threads {
        let slot = threads + i
        done.enter()
        let t = Thread {
            control.awaitStart()
            let c0 = threadCPUNanos()
            var waits = 0
            var waitCPU: UInt64 = 0
            var lastSeen: UInt64 = 0
            var lastChange = monotonicNanos()
            while true {
                if b.poll(limit: 64) > 0 { continue }
                var delivered = b.deliveredPackets &- deliveredBase
                if delivered >= target || control.failed.load(ordering: .relaxed) { break }
                // Nothing to do: wait until the NIC hands the host something (or the run ends).
                let w0 = threadCPUNanos()
                repeat {
                    waits += 1
                    wait.pause()
                    delivered = b.deliveredPackets &- deliveredBase
                    if delivered != lastSeen {
                        lastSeen = delivered
                        lastChange = monotonicNanos()
                    } else if waits & 1023 == 0 && monotonicNanos() - lastChange > 3_000_000_000 {
                        control.failed.store(true, ordering: .relaxed)  // nothing delivered for 3 s: packets lost
                    }
                } while b.pendingReceive == 0 && delivered < target && !control.failed.load(ordering: .relaxed)
                waitCPU &+= threadCPUNanos() &- w0
            }
            control.cpu[slot] = threadCPUNanos() &- c0
            control.waitCPU[slot] = waitCPU
            control.end[slot] = monotonicNanos()
            control.waits[slot] = waits
            done.leave()
        }
        t.name = "hostB-poll\(i)"
        t.start()
    }

    while control.ready.load(ordering: .acquiring) < 2 * threads { usleep(100) }
    let p0 = processCPUNanos()
    let t0 = monotonicNanos()
    control.go.store(true, ordering: .releasing)
    done.wait()
    let p1 = processCPUNanos()
    let t1 = (0..<2 * threads).map { control.end[$0] }.max() ?? monotonicNanos()

    // Checks: every packet delivered, nothing dropped, the wire carried what the mode says.
    a.settle(with: [b])
    let after = WireCounters(topo)
    let delivered = b.deliveredPackets - deliveredBase
    let exhausted = a.poolExhausted + b.poolExhausted - exhaustedBase
    let wirePackets = after.txPackets - base.txPackets
    let wireBytesPerPacket = wirePackets == 0 ? 0 : Double(after.txBytes - base.txBytes) / Double(wirePackets)
    var problems: [String] = []
    if control.failed.load(ordering: .relaxed) { problems.append("the run stalled (no delivery for 3 s)") }
    if delivered != target { problems.append("delivered \(delivered) of \(target) packets sent") }
    let senderDrops = control.drops.load(ordering: .relaxed)
    if exhausted > 0 || senderDrops > 0 {
        problems.append("\(exhausted + UInt64(senderDrops)) packets dropped for lack of pool buffers")
    }
    if after.dropsA != base.dropsA || after.dropsB != base.dropsB {
        problems.append("NIC drops: A \(after.dropsA - base.dropsA), B \(after.dropsB - base.dropsB)")
    }
    if wirePackets != target || after.rxPacketsB - base.rxPacketsB != target {
        problems.append("A's NIC put \(wirePackets) frames on the wire and B's took "
                        + "\(after.rxPacketsB - base.rxPacketsB) for \(target) packets")
    }
    let n = target
    let cryptoTX = after.cryptoTX - base.cryptoTX
    let espTX = after.espTX - base.espTX
    let cryptoRX = after.cryptoRX - base.cryptoRX
    let espRX = after.espRX - base.espRX
    switch mode {
    case .baseline:
        if wireBytesPerPacket != Double(o.innerSize) || cryptoTX + espTX + cryptoRX + espRX != 0 {
            problems.append("baseline: the wire carried \(wireBytesPerPacket) bytes per packet (expected clear "
                            + "\(o.innerSize)), device ESP counts \(cryptoTX + espTX + cryptoRX + espRX)")
        }
    case .software, .crypto, .packet:
        // Outer IPv4 20 + ESP header 8 + IV 8 + trailer and padding + ICV 16 around the inner packet.
        if wireBytesPerPacket < Double(o.innerSize + 20 + 8 + 8 + 2 + 16) {
            problems.append("\(mode): \(wireBytesPerPacket) bytes per packet on the wire: not ESP")
        }
        let expected: (UInt64, UInt64, UInt64, UInt64) = switch mode {
        case .crypto: (n, 0, n, 0)
        case .packet: (0, n, 0, n)
        default: (0, 0, 0, 0)
        }
        if (cryptoTX, espTX, cryptoRX, espRX) != expected {
            problems.append("\(mode): device counts crypto_tx \(cryptoTX) esp_tx \(espTX) crypto_rx \(cryptoRX) "
                            + "esp_rx \(espRX), expected \(expected)")
        }
        if mode != .packet {
            // The hosts' SAs did the ESP (software) or the framing and replay (crypto) for every packet.
            let total = n + UInt64(warmup)
            let pa = topo.sasA.reduce(UInt64(0)) { $0 + $1.current.packets }
            let pb = topo.sasB.reduce(UInt64(0)) { $0 + $1.current.packets }
            if pa != total || pb != total {
                problems.append("\(mode): host SA counts A \(pa), B \(pb), expected \(total)")
            }
        }
    }
    if !problems.isEmpty {
        throw ModesFailure("\(mode) with \(threads) thread(s) per host: " + problems.joined(separator: "; ")
                           + "\nB's nonzero XFRM statistics: "
                           + XfrmStatCounter.allCases.filter { b.stack.statistics[$0] != 0 }
                               .map { "\($0.name) \(b.stack.statistics[$0])" }.joined(separator: ", ")
                           + "\nNIC A: \(topo.nicA.debugDescription)\nNIC B: \(topo.nicB.debugDescription)")
    }
    let hostCPU = (0..<2 * threads).reduce(UInt64(0)) { $0 + control.cpu[$1] }
    return ModesRun(
        mode: mode, threads: threads, packets: o.packets, wallSeconds: Double(t1 - t0) / 1e9,
        deliveredBytes: b.deliveredBytes - bytesBase, hostCPUNanos: hostCPU,
        hostWaitNanos: (0..<2 * threads).reduce(UInt64(0)) { $0 + control.waitCPU[$1] },
        senderBusyNanos: (0..<threads).reduce(UInt64(0)) { $0 + control.cpu[$1] - control.waitCPU[$1] },
        processCPUNanos: p1 - p0, senderWaits: (0..<threads).reduce(0) { $0 + control.waits[$1] },
        pollerWaits: (threads..<2 * threads).reduce(0) { $0 + control.waits[$1] },
        wireBytesPerPacket: wireBytesPerPacket)
}

// MARK: - The benchmark

/// One row of the table: the best of the rounds for a (mode, threads) configuration.
struct ModesRow {
    let mode: TrafficMode
    let threads: Int
    /// Highest throughput of the rounds.
    let gbps: Double
    /// Lowest host CPU per packet of the rounds, and the spread (highest) for the noise estimate.
    let hostNs: Double
    let hostNsWorst: Double
    /// Lowest host CPU per packet around the whole loops (waits included).
    let loopNs: Double
    /// A's senders' share of `hostNs` (B's pollers have the rest), from the same round.
    let senderNs: Double
    /// Sender and poller pauses per 1000 packets, from the same round.
    let senderWaitsPerK: Double
    let pollerWaitsPerK: Double
    let otherNs: Double
    let coresBusy: Double
    let wireBytes: Double
    var hostRatio = 1.0
    var loopRatio = 1.0
    var gbpsRatio = 1.0
}

func parseModesOptions(_ arguments: [String]) -> ModesOptions {
    var o = ModesOptions()
    var args = arguments
    func fail(_ message: String) -> Never {
        FileHandle.standardError.write("xfrm-bench modes: \(message)\n".data(using: .utf8)!)
        exit(2)
    }
    func value(_ name: String) -> String {
        guard !args.isEmpty else { fail("\(name) needs a value") }
        return args.removeFirst()
    }
    while !args.isEmpty {
        let a = args.removeFirst()
        switch a {
        case "modes": continue
        case "--packets":
            guard let n = Int(value(a)), n > 0 else { fail("--packets takes a positive integer") }
            o.packets = n
        case "--rounds":
            guard let n = Int(value(a)), n > 0 else { fail("--rounds takes a positive integer") }
            o.rounds = n
        case "--threads":
            let list = value(a).split(separator: ",").compactMap { Int($0) }
            guard !list.isEmpty, list.allSatisfy({ $0 > 0 }) else { fail("--threads takes a list like 1,2") }
            o.threadCounts = list
        case "--modes":
            let list = value(a).split(separator: ",").compactMap { TrafficMode(rawValue: String($0)) }
            guard !list.isEmpty else { fail("--modes takes a list like baseline,packet") }
            o.modes = list
        case "--nic-threads":
            guard let n = Int(value(a)), n > 0 else { fail("--nic-threads takes a positive integer") }
            o.nicThreads = n
        case "--window":
            guard let n = Int(value(a)), n >= 32, n <= 896 else { fail("--window takes 32...896 packets") }
            o.window = n
        case "--svg": o.svgPath = value(a)
        case "--wait":
            guard let w = WaitStrategy(rawValue: value(a)) else { fail("--wait takes yield or sleep") }
            o.wait = w
        default: fail("unknown argument \(a)")
        }
    }
    return o
}

public func modesBenchmark(arguments: [String]) {
    let o = parseModesOptions(arguments)
    let cores = ProcessInfo.processInfo.activeProcessorCount
    var runs: [String: [ModesRun]] = [:]
    let started = monotonicNanos()
    do {
        for round in 0..<o.rounds {
            for threads in o.threadCounts {
                // Rotate the order each round so no mode always runs first (or right after another).
                let modes = TrafficMode.allCases.filter { $0 == .baseline || o.modes.contains($0) }
                let shift = (round + threads) % modes.count
                for mode in modes[shift...] + modes[..<shift] {
                    let r = try runModes(mode, threads: threads, options: o)
                    runs["\(mode.rawValue)/\(threads)", default: []].append(r)
                }
            }
        }
    } catch {
        FileHandle.standardError.write("xfrm-bench modes: FAILED: \(error)\n".data(using: .utf8)!)
        exit(1)
    }
    let elapsed = Double(monotonicNanos() - started) / 1e9

    var rows: [ModesRow] = []
    for threads in o.threadCounts {
        var group: [ModesRow] = []
        for mode in TrafficMode.allCases {
            guard let rs = runs["\(mode.rawValue)/\(threads)"] else { continue }
            let best = rs.min { $0.hostNsPerPacket < $1.hostNsPerPacket }!
            group.append(ModesRow(
                mode: mode, threads: threads, gbps: rs.map(\.gbps).max()!, hostNs: best.hostNsPerPacket,
                hostNsWorst: rs.map(\.hostNsPerPacket).max()!, loopNs: rs.map(\.hostLoopNsPerPacket).min()!,
                senderNs: best.senderNsPerPacket,
                senderWaitsPerK: Double(best.senderWaits) * 1000 / Double(best.packets),
                pollerWaitsPerK: Double(best.pollerWaits) * 1000 / Double(best.packets),
                otherNs: rs.map(\.otherNsPerPacket).min()!, coresBusy: rs.map(\.coresBusy).max()!,
                wireBytes: best.wireBytesPerPacket))
        }
        let base = group[0]
        for i in group.indices {
            group[i].hostRatio = group[i].hostNs / base.hostNs
            group[i].loopRatio = group[i].loopNs / base.loopNs
            group[i].gbpsRatio = group[i].gbps / base.gbps
        }
        rows += group
    }

    print("Four modes: \(o.innerSize)-byte inner IPv4/UDP packets A → B between two simulated hosts joined by "
          + "simulated NICs; tunnel mode,")
    print("rfc4106(gcm(aes)) 128-bit key, one flow/policy/SA per host thread; \(o.packets) packets per run, best of "
          + "\(o.rounds) interleaved rounds;")
    print("\(o.nicThreads) engine thread(s) per NIC; in-flight window \(o.effectiveWindow) packets; idle threads "
          + "\(o.wait == .sleep ? "sleep 50 µs" : "sched_yield"); \(cores) cores, shared by host and NIC threads.")
    print("host ns/pkt: busy CPU (CLOCK_THREAD_CPUTIME_ID) of A's senders + B's pollers, waits excluded, per packet "
          + "delivered (best round; worst beside it);")
    print("incl. waits: the same threads' whole loops; NIC+other: the rest of the process (NIC engines, main thread); "
          + "waits/k: pauses per 1000 packets.")
    print("")
    print("mode      thr    Gbps  ×base  host ns/pkt  ×base  (worst)   A send  B recv  |  incl. waits  ×base  "
          + "waits/k A     B  |  NIC+other ns/pkt  cores busy  wire B/pkt")
    for r in rows {
        print(String(format: "%-8@  %3d  %6.2f  %5.2f  %11.0f  %5.2f  %7.0f  %7.0f  %6.0f  |  %11.0f  %5.2f  "
                     + "%9.1f %5.1f  |  %16.0f  %10.2f  %10.0f",
                     r.mode.rawValue as NSString, r.threads, r.gbps, r.gbpsRatio, r.hostNs, r.hostRatio,
                     r.hostNsWorst, r.senderNs, r.hostNs - r.senderNs, r.loopNs, r.loopRatio, r.senderWaitsPerK,
                     r.pollerWaitsPerK, r.otherNs, r.coresBusy, r.wireBytes))
    }
    print("")
    for t in o.threadCounts where o.modes.count == TrafficMode.allCases.count {
        let g = rows.filter { $0.threads == t }
        func ratio(_ m: TrafficMode) -> Double { g.first { $0.mode == m }!.hostRatio }
        let packetWithin = ratio(.packet) <= 1.15
        let ordered = ratio(.packet) <= ratio(.crypto) && ratio(.crypto) <= ratio(.software)
        print(String(format: "threads %d: packet/baseline %.2f (%@ 15%%); order packet ≤ crypto ≤ software: %@", t,
                     ratio(.packet), (packetWithin ? "within" : "NOT within") as NSString,
                     (ordered ? "yes" : "no") as NSString))
    }
    print(String(format: "total %.1f s", elapsed))
    print("")
    for r in rows {
        print(String(format: "{\"mode\": \"%@\", \"threads\": %d, \"gbps\": %.3f, \"host_ns_per_packet\": %.1f, "
                     + "\"host_ratio_to_baseline\": %.3f}",
                     r.mode.rawValue as NSString, r.threads, r.gbps, r.hostNs, r.hostRatio))
    }

    guard let svgPath = o.svgPath else { return }
    let svg = modesChartSVG(rows: rows, options: o, cores: cores)
    let url = URL(fileURLWithPath: svgPath)
    do {
        try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
        try svg.write(to: url, atomically: true, encoding: .utf8)
        FileHandle.standardError.write("xfrm-bench modes: wrote \(url.path)\n".data(using: .utf8)!)
    } catch {
        FileHandle.standardError.write("xfrm-bench modes: cannot write \(svgPath): \(error)\n".data(using: .utf8)!)
        exit(1)
    }
}

/// The table as a grouped bar chart: host ns/packet per mode, one group per thread count.
func modesChartSVG(rows: [ModesRow], options o: ModesOptions, cores: Int) -> String {
    let colors: [TrafficMode: String] = [
        .baseline: "#7f8c8d", .software: "#c0392b", .crypto: "#e67e22", .packet: "#2e86c1",
    ]
    var groups: [BarChart.Group] = []
    for t in o.threadCounts {
        let g = rows.filter { $0.threads == t }
        let base = g.first { $0.mode == .baseline }!.hostNs
        groups.append(BarChart.Group(
            label: "\(t) host thread\(t == 1 ? "" : "s") per host",
            bars: g.map { r in
                BarChart.Bar(series: r.mode.rawValue, value: r.hostNs,
                             labels: [String(format: "%.0f ns", r.hostNs), String(format: "×%.2f", r.hostRatio),
                                      String(format: "%.2f Gbps", r.gbps)])
            },
            reference: BarChart.Reference(value: base * 1.15, caption: ["baseline", "+15%"], series: "packet")))
    }
    let chart = BarChart(
        title: "Host CPU per packet by IPsec mode (swift-xfrm simulated hosts)",
        subtitle: "\(o.innerSize)-byte inner IPv4 A→B, tunnel rfc4106(gcm(aes)) 128-bit. Bars: busy CPU of the host "
            + "threads only (A senders + B pollers; waits and NIC engine threads excluded) per delivered packet, "
            + "with the ratio to baseline and the throughput. Best of \(o.rounds) rounds × \(o.packets) packets; "
            + "\(cores) cores shared by host threads and \(o.nicThreads) engine thread(s) per NIC.",
        yLabel: "host CPU ns / packet (lower is better)",
        series: TrafficMode.allCases.map { ($0.rawValue, colors[$0]!) },
        groups: groups,
        referenceLegend: "the claim: packet offload within baseline +15%")
    return chart.svg()
}

