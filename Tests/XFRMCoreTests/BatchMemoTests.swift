import Foundation
import Synchronization
import Testing
import XFRMCore
import XFRMCrypto
import XFRMESP
import XFRMPacket
import XFRMTestKit

/// `XFRMStack.process` lets consecutive packets of one flow share the bundle (output) and the SA and verdict
/// (input) the previous packet found. The memo may only save lookups: a packet whose flow differs in any field
/// goes through its own policy, SA and check.
@Suite("Batch memos: consecutive packets share lookups only when their flow is the same")
struct BatchMemoTests {
    /// Runs `packets` through `stack.process` as one batch; returns each packet's verdict and bytes.
    static func run(_ stack: XFRMStack, _ packets: [[UInt8]], stage: PacketBatch.Stage)
        -> [(PacketBatch.Verdict, [UInt8])]
    {
        let pool = PacketPool(count: packets.count, slotSize: 2048, headroom: 256)
        var batch = PacketBatch(capacity: packets.count)
        for p in packets {
            var b = pool.allocate()!
            precondition(b.append(contentsOf: p))
            precondition(batch.append(PacketBatch.Packet(b, stage: stage, ifindex: stage == .input ? 2 : 0)))
        }
        stack.process(&batch)
        var out: [(PacketBatch.Verdict, [UInt8])] = []
        for i in 0..<batch.count {
            out.append((batch[i].verdict, batch[i].buffer.bytes))
            pool.release(batch[i].buffer)
        }
        return out
    }

    static func spi(_ esp: [UInt8]) -> UInt32 {
        UInt32(esp[20]) << 24 | UInt32(esp[21]) << 16 | UInt32(esp[22]) << 8 | UInt32(esp[23])
    }

    @Test("interleaved flows differing in source, destination, port or protocol each leave through their own SA")
    func outputFlowsKeepTheirOwnBundles() throws {
        let h = try TwoHosts()
        // More specific policies send some flows through SPI 0x3003 (reqid 3); the tunnel's wider OUT policy,
        // added after them at the same priority, sends the rest through SPI 0x1001 (reqid 1).
        let t3 = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 3)
        for sel in [
            Selector(family: 4, source: IPPrefix("10.0.1.2/32")!, destination: IPPrefix("10.0.2.0/24")!),
            Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.0.2.9/32")!),
            Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.0.2.0/24")!, proto: 17,
                     sourcePort: 4321, sourcePortMask: 0xffff),
            Selector(family: 4, source: IPPrefix("10.0.1.0/24")!, destination: IPPrefix("10.0.2.0/24")!, proto: 6),
        ] {
            try h.a.addPolicy(Policy(selector: sel, direction: .outbound, templates: [t3]), update: false)
        }
        try h.tunnel()
        try h.a.addState(h.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x3003, reqid: 3, on: h.a))
        let base = h.packet()
        let otherSource = h.packet(from: "10.0.1.2")
        let otherDestination = h.packet(to: "10.0.2.9")
        let otherPort = PacketFactory.ipv4(payload: PacketFactory.udp(sourcePort: 4321, payload: PacketFactory.pattern(100)))
        let otherProto = PacketFactory.ipv4(proto: 6, payload: PacketFactory.pattern(120))
        let packets = [base, base, otherSource, base, otherDestination, otherDestination, base, otherPort, base,
                       otherProto, base]
        let expected: [UInt32] = [0x1001, 0x1001, 0x3003, 0x1001, 0x3003, 0x3003, 0x1001, 0x3003, 0x1001, 0x3003, 0x1001]
        let results = Self.run(h.a, packets, stage: .output)
        for (i, (verdict, bytes)) in results.enumerated() {
            #expect(verdict == .output(.transmit(ifindex: 2), transformed: true), "packet \(i)")
            #expect(bytes[9] == 50 && Self.spi(bytes) == expected[i], "packet \(i) left through the wrong SA")
        }
    }

    @Test("in one batch, a flow outside the IN policy between two allowed ones is refused; the allowed ones pass")
    func inputVerdictMemoIsPerFlow() throws {
        let h = try TwoHosts()
        try h.tunnel()
        // A sends 10.0.9.1 through the same SA; B's IN policy covers only 10.0.1.0/24.
        let sel = Selector(family: 4, source: IPPrefix("10.0.9.0/24")!, destination: IPPrefix("10.0.2.0/24")!)
        let t = Template(source: IPAddress("192.0.2.1"), destination: IPAddress("192.0.2.2"), mode: 1, reqid: 1)
        try h.a.addPolicy(Policy(selector: sel, direction: .outbound, templates: [t]), update: false)
        let sources = ["10.0.1.1", "10.0.1.1", "10.0.9.1", "10.0.1.1", "10.0.9.1", "10.0.1.1"]
        let wire = Self.run(h.a, sources.map { h.packet(from: $0) }, stage: .output).map(\.1)
        let results = Self.run(h.b, wire, stage: .input)
        for (i, (verdict, _)) in results.enumerated() {
            let want: PacketBatch.Verdict = sources[i] == "10.0.1.1"
                ? .input(.deliver, decapsulated: true) : .input(.dropped(.inNoPols), decapsulated: true)
            #expect(verdict == want, "packet \(i) from \(sources[i])")
        }
    }

    /// The input memo lends the batch's outermost SA to each packet's secpath without a reference count; its own
    /// reference must keep the SA alive while another thread deletes it (run under the address sanitizer in CI).
    @Test("an SA deleted and added again while batches run: each packet is delivered or counted as a missing or dead SA")
    func saReplacedWhileBatchesRun() throws {
        let h = try TwoHosts()
        try h.tunnel()
        // 60 batches of 64 packets from A, in sequence order: the SA B has at any moment accepts them (a new one
        // starts with an empty window; the old one has seen only lower numbers).
        let batches = (0..<60).map { _ in Self.run(h.a, (0..<64).map { _ in h.packet() }, stage: .output).map(\.1) }
        let shared = SharedHosts(h)
        let stop = Atomic<Bool>(false)
        let replaced = Atomic<Int>(0)
        let done = DispatchSemaphore(value: 0)
        let churn = Thread {
            let id = SAID(destination: IPAddress("192.0.2.2")!, spi: 0x1001)
            while !stop.load(ordering: .acquiring) {
                _ = try? shared.hosts.b.deleteState(id, mark: Mark())
                if let sa = try? shared.hosts.sa(from: "192.0.2.1", to: "192.0.2.2", spi: 0x1001, on: shared.hosts.b) {
                    try? shared.hosts.b.addState(sa)
                }
                // The events hold the SAs they name: drained, a deleted SA is freed as soon as nothing else holds it.
                _ = shared.hosts.eventsB.drain()
                replaced.add(1, ordering: .relaxed)
                // Each SA lives a little, so that packets get through between the replacements.
                Thread.sleep(forTimeInterval: 0.0002)
            }
            done.signal()
        }
        churn.start()
        // The batches start once the churn runs, so the two overlap.
        let started = Date()
        while replaced.load(ordering: .relaxed) < 5 && Date().timeIntervalSince(started) < 10 { Thread.sleep(forTimeInterval: 0.001) }
        var delivered = 0, noState = 0, dead = 0, other: [PacketBatch.Verdict] = []
        for wire in batches {
            for (verdict, _) in Self.run(h.b, wire, stage: .input) {
                switch verdict {
                case .input(.deliver, decapsulated: true): delivered += 1
                case .input(.dropped(.inNoStates), decapsulated: false): noState += 1
                // Deleted between its lookup and its locked section (the kernel's XfrmInStateInvalid too).
                case .input(.dropped(.inStateInvalid), decapsulated: false): dead += 1
                default: other.append(verdict)
                }
            }
        }
        stop.store(true, ordering: .releasing)
        done.wait()
        #expect(other.isEmpty, "unexpected verdicts: \(other.prefix(5))")
        #expect(delivered > 0)
        #expect(replaced.load(ordering: .relaxed) >= 5)
        #expect(Int(h.b.statistics[.inNoStates]) == noState && Int(h.b.statistics[.inStateInvalid]) == dead)
    }
}

/// The two hosts, handed to a thread that changes B's SAD while the test's thread runs B's input (the stacks are
/// thread-safe; the fixture's own fields are not touched meanwhile).
private final class SharedHosts: @unchecked Sendable {
    let hosts: TwoHosts
    init(_ hosts: TwoHosts) { self.hosts = hosts }
}
