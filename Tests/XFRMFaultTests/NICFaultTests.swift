import Foundation
import Synchronization
import Testing
import XFRMCore
import XFRMPacket
import XFRMSimHost
import XFRMSimulatedNIC

let faultErrnos: [NICFaultErrno] = [.enospc, .eio, .etimedout]

@Suite("Faults injected into the simulated NIC: the core stays consistent, packet offload never falls back, nothing leaves in clear")
struct NICFaultTests {
    @Test("a packet-offload SA add that fails leaves neither SAD nor device holding it; its traffic is dropped, never sent by a software SA or in clear",
          arguments: faultErrnos)
    func packetStateAddFails(_ errno: NICFaultErrno) throws {
        let t = try FaultTopology(mode: .packet)
        try t.addPolicies()
        try t.addInbound(spi: 0x1001)
        // A software SA for the same template: an offloaded policy must not fall back to it.
        let software = try t.addOutbound(spi: 0x2001, offloaded: false)
        t.nicA.injectFault(.stateAdd, errno: errno)
        do {
            try t.addOutbound(spi: 0x1001)
            Issue.record("the add succeeded despite the fault")
        } catch let error as StateDatabaseError {
            #expect(error.errno == errno.rawValue)
        }
        #expect(t.nicA.faultCounts.fired[.stateAdd] == 1)
        #expect(t.a.stack.states.list().map(\.id.spi) == [0x2001], "only the software SA is in the SAD")
        #expect(t.nicA.saCount == 0)
        t.expectConsistent()
        t.send(100)
        t.settle()
        var wire = t.wireFromA()
        #expect(wire.frames == 0 && wire.clear == 0)
        #expect(software.current.packets == 0, "the offloaded policy never used the software SA")
        #expect(t.b.deliveredPackets == 0)
        // The fault fired once: the same add now works and the tunnel carries traffic.
        try t.addOutbound(spi: 0x1001)
        t.expectConsistent()
        t.send(100, seed: 1)
        t.settle()
        wire = t.wireFromA()
        #expect(wire.frames == 100 && wire.clear == 0 && wire.spis == [0x1001])
        #expect(t.b.deliveredPackets == 100)
        #expect(software.current.packets == 0)
        t.expectNoLeak()
    }

    @Test("a crypto-offload SA add that fails with anything but EOPNOTSUPP fails (no silent fallback); nothing is left behind",
          arguments: faultErrnos)
    func cryptoStateAddFails(_ errno: NICFaultErrno) throws {
        let t = try FaultTopology(mode: .crypto)
        try t.addPolicies()
        t.nicA.injectFault(.stateAdd, errno: errno)
        #expect(throws: StateDatabaseError.self) { try t.addOutbound(spi: 0x1001) }
        #expect(t.a.stack.states.count == 0 && t.nicA.saCount == 0)
        t.expectConsistent()
        t.send(20)
        t.settle()
        let wire = t.wireFromA()
        #expect(wire.frames == 0 && wire.clear == 0, "the protected flow has no SA: dropped, not sent in clear")
        t.expectNoLeak()
    }

    @Test("a policy add that fails leaves neither SPD nor device holding it", arguments: faultErrnos)
    func policyAddFails(_ errno: NICFaultErrno) throws {
        let t = try FaultTopology(mode: .packet)
        t.nicA.injectFault(.policyAdd, errno: errno, count: 2)
        for _ in 0..<2 {
            #expect(throws: PolicyDatabaseError.self) { try t.addPolicies() }
            #expect(t.a.stack.policies.list().isEmpty && t.nicA.policyCount == 0)
            t.expectConsistent()
        }
        try t.addTunnel()
        t.expectConsistent()
        t.send(50)
        t.settle()
        #expect(t.wireFromA().clear == 0 && t.b.deliveredPackets == 50)
        t.expectNoLeak()
    }

    @Test("a device that will not release a deleted SA's or policy's slot stops using it at once; the slot comes back with the next add",
          arguments: faultErrnos)
    func releaseFails(_ errno: NICFaultErrno) throws {
        let t = try FaultTopology(mode: .packet)
        try t.addPolicies()
        try t.addInbound(spi: 0x1001)
        let old = try t.addOutbound(spi: 0x1001)
        t.send(50)
        t.settle()
        #expect(t.b.deliveredPackets == 50)
        t.nicA.injectFault(.stateFree, errno: errno)
        _ = try t.a.stack.deleteState(old.id, mark: old.config.mark)
        #expect(t.nicA.faultCounts.stuckSAs == 1 && t.nicA.saCount == 1, "the slot is still held")
        #expect(t.nicA.liveSAHandles.isEmpty, "but the device no longer uses it")
        t.expectConsistent()
        _ = t.wireFromA()
        t.send(50, seed: 2)
        t.settle()
        var wire = t.wireFromA()
        #expect(wire.frames == 0 && wire.clear == 0, "no SA: dropped, neither through the stuck entry nor in clear")
        #expect(t.b.deliveredPackets == 50)
        // Rekey: the next add releases the stuck slot first.
        try t.addInbound(spi: 0x1002)
        try t.addOutbound(spi: 0x1002)
        #expect(t.nicA.faultCounts.stuckSAs == 0 && t.nicA.saCount == 1)
        t.expectConsistent()
        t.send(50, seed: 3)
        t.settle()
        wire = t.wireFromA()
        #expect(wire.frames == 50 && wire.clear == 0 && wire.spis == [0x1002])
        #expect(t.b.deliveredPackets == 100)
        // The same for a policy: deleted from the SPD, no longer classifying, its slot stuck until the next add.
        // With no OUT policy left the SPD says this flow is not protected: the device must agree and not encrypt
        // it through the stuck entry.
        t.nicA.injectFault(.policyFree, errno: errno)
        let out = try #require(t.a.stack.policies.list().first { $0.direction == .outbound })
        _ = try t.a.stack.deletePolicy(key: out.key)
        #expect(t.nicA.faultCounts.stuckPolicies == 1 && t.nicA.livePolicies.count == 0 && t.nicA.policyCount == 1)
        t.expectConsistent()
        let espBefore = t.nicA.counter(.espTX)
        t.send(20, seed: 4)
        t.settle()
        wire = t.wireFromA()
        #expect(wire.frames == 20 && t.nicA.counter(.espTX) == espBefore, "the stuck policy classifies nothing")
        // Re-adding the policy releases the stuck slot and protects the flow again.
        _ = try t.a.stack.addPolicy(out, update: false)
        #expect(t.nicA.faultCounts.stuckPolicies == 0 && t.nicA.policyCount == 1)
        t.expectConsistent()
        t.send(20, seed: 5)
        t.settle()
        wire = t.wireFromA()
        #expect(wire.frames == 20 && wire.clear == 0 && wire.spis == [0x1002])
        t.expectNoLeak()
    }

    @Test("a counter query that fails answers the last counts: the core's counters never go backwards, nothing expires early, and they catch up",
          arguments: faultErrnos)
    func statsFail(_ errno: NICFaultErrno) throws {
        let t = try FaultTopology(mode: .packet)
        try t.addPolicies()
        try t.addInbound(spi: 0x1001)
        var lifetime = LifetimeConfig()
        lifetime.softPacketLimit = 150
        lifetime.hardPacketLimit = 10_000
        let sa = try t.addOutbound(spi: 0x1001, lifetime: lifetime)
        let events = t.a.stack.events.subscribe()
        t.send(100)
        t.settle()
        t.a.stack.syncDeviceStats()
        #expect(sa.current.packets == 100)
        t.nicA.injectFault(.stats, errno: errno, count: nil)
        t.send(100, seed: 1)
        t.settle()
        for _ in 0..<3 { t.a.stack.syncDeviceStats() }
        #expect(sa.current.packets == 100, "the last counts, not zero and not the device's unread ones")
        #expect(t.nicA.faultCounts.fired[.stats, default: 0] >= 3)
        #expect(!events.drain().contains { if case .expire = $0 { true } else { false } })
        t.nicA.clearFaults()
        t.a.stack.syncDeviceStats()
        #expect(sa.current.packets == 200)
        #expect(events.drain().contains { if case .expire(_, hard: false) = $0 { true } else { false } },
                "the soft limit crossed while the query failed is reported once it works")
        t.expectConsistent()
        #expect(t.wireFromA().clear == 0)
        t.expectNoLeak()
    }

    @Test("a stalled engine drops what does not fit its queue, counted (sent = delivered + drops); it resumes where it left off",
          arguments: [OffloadType.packet, .crypto])
    func stall(_ mode: OffloadType) throws {
        let t = try FaultTopology(mode: mode)
        try t.addTunnel()
        t.nicA.setStalled(true)
        let sent = 1500
        t.send(sent)
        t.settle()
        #expect(t.wireFromA().frames == 0, "nothing leaves a stalled device")
        let queueFull = t.nicA.counter(.txQueueFull)
        #expect(queueFull == UInt64(sent - t.nicA.queueDepth))
        t.expectConsistent()
        t.nicA.setStalled(false)
        t.settle()
        var wire = t.wireFromA()
        #expect(wire.clear == 0 && wire.frames == t.nicA.queueDepth)
        #expect(t.b.deliveredPackets + queueFull == UInt64(sent))
        t.send(100, seed: 5)
        t.settle()
        wire = t.wireFromA()
        #expect(wire.clear == 0 && wire.frames == 100)
        #expect(t.b.deliveredPackets == UInt64(t.nicA.queueDepth + 100))
        t.expectConsistent()
        t.expectNoLeak()
    }

    @Test("a device that vanishes while traffic flows sends nothing more, nothing leaves in clear, and removing it empties SAD and SPD of its entries",
          arguments: [OffloadType.packet, .crypto])
    func vanish(_ mode: OffloadType) throws {
        let t = try FaultTopology(mode: mode)
        try t.addTunnel()
        let state = SenderState()
        let sender = Thread {
            let deadline = Date().addingTimeInterval(10)
            while !state.stop.load(ordering: .relaxed) && state.sent.load(ordering: .relaxed) < 200_000
                && Date() < deadline
            {
                t.send(16)
                state.sent.add(16, ordering: .relaxed)
            }
        }
        sender.start()
        let deadline = Date().addingTimeInterval(10)
        while t.b.deliveredPackets < 500 && Date() < deadline { t.b.poll() }
        #expect(t.b.deliveredPackets >= 500, "traffic flowed before the fault")
        t.nicA.vanish()
        Thread.sleep(forTimeInterval: 0.02)
        let txAtVanish = t.nicA.counter(.txPackets)
        #expect(t.nicA.liveSAHandles.isEmpty && t.nicA.livePolicies.isEmpty, "the device holds nothing")
        #expect(throws: StateDatabaseError.self) { try t.addOutbound(spi: 0x1002) }
        Thread.sleep(forTimeInterval: 0.05)
        try t.a.removeNIC(name: "sim0")  // the host notices (≈ NETDEV_UNREGISTER)
        Thread.sleep(forTimeInterval: 0.05)
        state.stop.store(true, ordering: .relaxed)
        while !sender.isFinished { Thread.sleep(forTimeInterval: 0.01) }
        t.settle()
        #expect(t.nicA.counter(.txPackets) == txAtVanish, "a vanished device puts nothing on the wire")
        let stackDrops = XfrmStatCounter.allCases.reduce(UInt64(0)) { $0 + t.a.stack.statistics[$1] }
        #expect(t.nicA.counter(.txShutdown) + stackDrops > 0,
                "what was sent afterwards was dropped and counted (device \(t.nicA.counter(.txShutdown)), stack \(stackDrops))")
        #expect(t.a.stack.states.list().isEmpty, "the device's SAs left the SAD")
        #expect(t.a.stack.policies.list().allSatisfy { $0.offload == nil })
        t.send(100, seed: 9)
        t.settle()
        let wire = t.wireFromA()
        #expect(wire.clear == 0, "\(wire.clear) of \(wire.frames) frames left A in clear")
        #expect(wire.spis == [0x1001])
        #expect(t.b.deliveredPackets <= UInt64(state.sent.load(ordering: .relaxed)))
        t.expectNoLeak()
    }
}

/// What a sender thread and the test share.
final class SenderState: Sendable {
    let stop = Atomic<Bool>(false)
    let sent = Atomic<Int>(0)
}
