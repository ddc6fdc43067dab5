import Testing
import XFRMESP
import XFRMPacket
import XFRMTestKit

/// `ESPClassification.isPlainIPv4` lets the input path skip the full classification of a decapsulated packet: it may
/// only say "plain" where `classify` (inner header, no checksum) says `.notESP` and leaves the packet as it is.
@Suite("The decapsulated-packet shortcut agrees with classify")
struct PlainInnerTests {
    let buffers = TestBuffers()

    func classify(_ bytes: [UInt8], nattPort: UInt16?) -> (plain: Bool, notESP: Bool, unchanged: Bool) {
        let plain = buffers.with(bytes) { ESPClassification.isPlainIPv4($0, nattPort: nattPort) }.0
        let (notESP, after) = buffers.with(bytes) { b -> Bool in
            if case .notESP = ESPClassification.classify(&b, nattPort: nattPort, verifyChecksum: false) { return true }
            return false
        }
        return (plain, notESP, after == bytes)
    }

    @Test("ordinary traffic is plain; ESP, NAT-T, IKE, keepalives, fragments and odd headers are left to classify")
    func knownCases() {
        let udp53 = PacketFactory.ipv4(payload: PacketFactory.udp(destinationPort: 53, payload: PacketFactory.pattern(30)))
        let tcp = PacketFactory.ipv4(proto: 6, payload: PacketFactory.pattern(40))
        let icmp = PacketFactory.ipv4(proto: 1, payload: PacketFactory.pattern(16))
        for p in [udp53, tcp, icmp] { #expect(classify(p, nattPort: 4500).plain) }
        #expect(classify(udp53, nattPort: nil).plain)
        let esp = PacketFactory.ipv4(proto: 50, payload: PacketFactory.pattern(40))
        let natt = PacketFactory.ipv4(payload: PacketFactory.udp(destinationPort: 4500, payload: PacketFactory.pattern(40)))
        let ike = PacketFactory.ipv4(payload: PacketFactory.udp(destinationPort: 4500, payload: [0, 0, 0, 0] + PacketFactory.pattern(20)))
        let keepalive = PacketFactory.ipv4(payload: PacketFactory.udp(destinationPort: 4500, payload: [0xff]))
        var fragment = udp53
        fragment[6] = 0x20  // MF
        let options = PacketFactory.ipv4(options: [1, 1, 1, 1], payload: PacketFactory.udp(payload: PacketFactory.pattern(8)))
        for p in [esp, natt, ike, keepalive, fragment, options] { #expect(!classify(p, nattPort: 4500).plain) }
        #expect(classify(natt, nattPort: nil).plain)
    }

    @Test("on 20,000 mutated and truncated packets, plain always means classify's notESP with the packet unchanged")
    func agreesOnRandomPackets() {
        var rng = XorShift(state: 0x0dd_ba11)
        let bases = [
            PacketFactory.ipv4(payload: PacketFactory.udp(destinationPort: 53, payload: PacketFactory.pattern(30))),
            PacketFactory.ipv4(payload: PacketFactory.udp(destinationPort: 4500, payload: PacketFactory.pattern(30))),
            PacketFactory.ipv4(proto: 6, payload: PacketFactory.pattern(40)),
            PacketFactory.ipv4(proto: 50, payload: PacketFactory.pattern(40)),
        ]
        var plain = 0
        for i in 0..<20_000 {
            var p = bases[i % bases.count]
            // Mutate the fields the shortcut reads (version/IHL, length, fragment word, protocol, UDP ports).
            for _ in 0..<Int(rng.next() % 3) {
                let at = [0, 2, 3, 6, 7, 9, 20, 21, 22, 23][Int(rng.next() % 10)]
                p[at] = UInt8(truncatingIfNeeded: rng.next())
            }
            if rng.next() % 4 == 0 { p = Array(p[0..<Int(rng.next() % UInt64(p.count + 1))]) }
            let port: UInt16? = [nil, 4500, 53, UInt16(truncatingIfNeeded: rng.next())][Int(rng.next() % 4)]
            let r = classify(p, nattPort: port)
            if r.plain {
                plain += 1
                #expect(r.notESP && r.unchanged, "packet \(i): \(p.prefix(28)), NAT-T port \(String(describing: port))")
            }
        }
        #expect(plain > 5_000)
    }
}
