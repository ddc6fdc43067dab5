// `xfrm demo`: two simulated hosts joined by simulated NICs, configured with the commands a user would type
// (printed as they run), traffic sent and verified both ways in software, crypto-offload and packet-offload
// modes, a soft expiry followed by a rekey, a device-down flush, and finally the four-mode table. Needs no root.

import Foundation
import XFRMCommandLine
import XFRMCore
import XFRMPacket
import XFRMSimHost

/// Runs the demo, printing as it goes; returns false if any check failed.
public enum Demo {
    struct Failure: Error, CustomStringConvertible {
        let description: String
    }

    static let aeadKeyAB = "0x" + String(repeating: "a1", count: 16) + "01020304"
    static let aeadKeyBA = "0x" + String(repeating: "b2", count: 16) + "05060708"

    public static func run(fourModeTable: (() -> String)? = nil) -> Bool {
        let a = OfflineSession()
        let b = OfflineSession()
        a.peers["B"] = b.host
        b.peers["A"] = a.host
        do {
            try self.script(a, b)
            if let table = fourModeTable {
                print("\n== The four-mode table: the same traffic without IPsec, in software, with crypto offload, with packet offload ==")
                print(table(), terminator: "")
            }
            print("\ndemo: all checks passed")
            return true
        } catch {
            print("\ndemo: FAILED: \(error)")
            return false
        }
    }

    static func run(_ s: OfflineSession, _ name: String, _ line: String) throws {
        print("\(name)# xfrm \(line)")
        let words: [String]
        do throws(BatchSyntaxError) {
            words = try OfflineSession.words(of: line)
        } catch {
            throw Failure(description: "\(name): \(line): \(error.description)")
        }
        do throws(SessionError) {
            var out = try s.run(words)
            while out.hasSuffix("\n") { out.removeLast() }
            if !out.isEmpty {
                print(out.split(separator: "\n", omittingEmptySubsequences: false).map { "    " + $0 }.joined(separator: "\n"))
            }
        } catch {
            throw Failure(description: "\(name): \(line): \(error.description)")
        }
    }

    static func check(_ ok: Bool, _ what: String) throws {
        print(ok ? "    ok: \(what)" : "    FAILED: \(what)")
        if !ok { throw Failure(description: what) }
    }

    /// Sends `count` UDP packets from `from` to `to` and checks they all arrive intact, and what the wire carried.
    static func traffic(_ src: OfflineSession, _ dst: OfflineSession, from: String, to: String, count: Int,
                        expectSPI: UInt32?, label: String) throws {
        _ = src.host.takeCaptured()
        _ = dst.host.takeCaptured()
        _ = dst.host.takeDelivered()
        var sent: [[UInt8]] = []
        for i in 0..<count {
            let payload = (0..<(100 + i * 50)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ i) }
            var udp: [UInt8] = [0x30, 0x39, 0x00, 0x35, UInt8((payload.count + 8) >> 8), UInt8((payload.count + 8) & 0xff), 0, 0]
            udp += payload
            let pkt = Self.ipv4(src: from, dst: to, payload: udp, id: UInt16(i))
            sent.append(pkt)
            src.host.send(pkt)
        }
        src.host.settle(with: [dst.host])
        let delivered = dst.host.takeDelivered()
        let wire = src.host.takeCaptured().filter { $0.count > 20 }
        print("    \(label): \(sent.count) sent, \(delivered.count) delivered")
        try check(delivered.count == sent.count && zip(delivered, sent).allSatisfy { d, s in d[20...] == s[20...] },
                  "\(label): every packet arrived intact")
        if let spi = expectSPI {
            let esp = wire.filter { $0[9] == 50 && Array($0[20..<24]) == [UInt8(spi >> 24), UInt8(spi >> 16 & 0xff), UInt8(spi >> 8 & 0xff), UInt8(spi & 0xff)] }
            try check(esp.count == sent.count && !wire.contains { $0[9] != 50 },
                      String(format: "\(label): the wire carried only ESP with SPI 0x%08x, never plaintext", spi))
        }
    }

    static func ipv4(src: String, dst: String, payload: [UInt8], id: UInt16) -> [UInt8] {
        let total = 20 + payload.count
        var h: [UInt8] = [0x45, 0, UInt8(total >> 8), UInt8(total & 0xff), UInt8(id >> 8), UInt8(id & 0xff), 0x40, 0, 64, 17, 0, 0]
        h += IPAddress(src)!.bytes + IPAddress(dst)!.bytes
        let c = InternetChecksum.compute(h)
        h[10] = UInt8(c >> 8)
        h[11] = UInt8(c & 0xff)
        return h + payload
    }

    static func configure(_ a: OfflineSession, _ b: OfflineSession, mode: String) throws {
        // mode: "software", "crypto", "packet"
        let saOff = { (dir: String) -> String in mode == "software" ? "" : " offload \(mode) dev sim0 dir \(dir)" }
        let polOff = mode == "packet" ? " offload packet dev sim0" : ""
        let win = mode == "packet" ? "128" : "128"
        for (s, n, me, peer, myLan, peerLan, outKey, inKey, outSPI, inSPI) in [
            (a, "A", "192.0.2.1", "192.0.2.2", "10.0.1.0/24", "10.0.2.0/24", aeadKeyAB, aeadKeyBA, "0x1000", "0x2000"),
            (b, "B", "192.0.2.2", "192.0.2.1", "10.0.2.0/24", "10.0.1.0/24", aeadKeyBA, aeadKeyAB, "0x2000", "0x1000"),
        ] {
            try run(s, n, "state add src \(me) dst \(peer) proto esp spi \(outSPI) reqid 1 mode tunnel aead rfc4106(gcm(aes)) \(outKey) 128\(saOff("out"))")
            try run(s, n, "state add src \(peer) dst \(me) proto esp spi \(inSPI) reqid 2 mode tunnel aead rfc4106(gcm(aes)) \(inKey) 128 replay-window \(win)\(saOff("in"))")
            try run(s, n, "policy add src \(myLan) dst \(peerLan) dir out tmpl src \(me) dst \(peer) proto esp reqid 1 mode tunnel\(polOff)")
            try run(s, n, "policy add src \(peerLan) dst \(myLan) dir in tmpl src \(peer) dst \(me) proto esp reqid 2 mode tunnel\(polOff)")
        }
    }

    static func script(_ a: OfflineSession, _ b: OfflineSession) throws {
        print("== swift-xfrm demo: hosts A and B, each with a simulated NIC (sim0) and a LAN; sim0s joined by a wire ==")
        for (s, n, me, lan, peerLan, peer) in [(a, "A", "192.0.2.1", "10.0.1.1", "10.0.2.0/24", "192.0.2.2"),
                                               (b, "B", "192.0.2.2", "10.0.2.1", "10.0.1.0/24", "192.0.2.1")] {
            try run(s, n, n == "A" ? "link add sim0 type simnic offload both" : "link add sim0 type simnic offload both peer A:sim0")
            try run(s, n, "link set sim0 up")
            try run(s, n, "addr add \(me)/24 dev sim0")
            try run(s, n, "link add lan0 type dummy")
            try run(s, n, "link set lan0 up")
            try run(s, n, "addr add \(lan)/24 dev lan0")
            try run(s, n, "route add \(peerLan) dev sim0 via \(peer)")
        }
        print("\n== No IPsec: traffic goes in clear ==")
        try traffic(a, b, from: "10.0.1.1", to: "10.0.2.1", count: 3, expectSPI: nil, label: "A -> B (clear)")

        for mode in ["software", "crypto", "packet"] {
            print("\n== \(mode == "software" ? "Software IPsec" : mode == "crypto" ? "Crypto offload" : "Packet offload") ==")
            try configure(a, b, mode: mode)
            try traffic(a, b, from: "10.0.1.1", to: "10.0.2.1", count: 10, expectSPI: 0x1000, label: "A -> B")
            try traffic(b, a, from: "10.0.2.1", to: "10.0.1.1", count: 10, expectSPI: 0x2000, label: "B -> A")
            try run(a, "A", "-s state get src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x1000".replacingOccurrences(of: "-s ", with: ""))
            if mode == "packet" {
                try run(a, "A", "link show -s sim0")
            }
            if mode != "packet" {
                try run(a, "A", "state flush")
                try run(a, "A", "policy flush")
                try run(b, "B", "state flush")
                try run(b, "B", "policy flush")
            }
        }

        print("\n== Soft expiry then rekey (packet offload: the NIC counts and raises the event, the core expires) ==")
        print("    a fresh SA pair A -> B (SPI 0x1100, new key) with a soft limit of 15 packets replaces 0x1000")
        let key2 = "0x" + String(repeating: "d4", count: 16) + "0d0e0f10"
        let key3 = "0x" + String(repeating: "e5", count: 16) + "11121314"
        try run(a, "A", "state delete src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x1000")
        try run(b, "B", "state delete src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x1000")
        try run(b, "B", "state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x1100 reqid 2 mode tunnel aead rfc4106(gcm(aes)) \(key2) 128 replay-window 128 offload packet dev sim0 dir in")
        try run(a, "A", "state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x1100 reqid 1 mode tunnel aead rfc4106(gcm(aes)) \(key2) 128 limit packet-soft 15 limit packet-hard 1000 offload packet dev sim0 dir out")
        try run(a, "A", "monitor")
        try traffic(a, b, from: "10.0.1.1", to: "10.0.2.1", count: 20, expectSPI: 0x1100, label: "A -> B (20 packets)")
        print(a.drainEvents().split(separator: "\n").map { "    " + $0 }.joined(separator: "\n"))
        let old = a.stack.states.lookup(SAID(destination: IPAddress("192.0.2.2")!, spi: 0x1100))
        try check(old?.isDying == true && old?.current.packets == 20,
                  "the NIC counted 20 packets and signalled the soft limit; the core sent EXPIRE hard 0 and marked the SA dying")
        print("    the key manager rekeys with SPI 0x1101")
        try run(b, "B", "state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x1101 reqid 2 mode tunnel aead rfc4106(gcm(aes)) \(key3) 128 replay-window 128 offload packet dev sim0 dir in")
        try run(a, "A", "state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x1101 reqid 1 mode tunnel aead rfc4106(gcm(aes)) \(key3) 128 offload packet dev sim0 dir out")
        try traffic(a, b, from: "10.0.1.1", to: "10.0.2.1", count: 5, expectSPI: 0x1101, label: "A -> B after the rekey (the fresh SA wins over the dying one)")
        try run(a, "A", "state delete src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x1100")
        try run(b, "B", "state delete src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x1100")

        print("\n== Device down: sim0 takes its offloaded SAs and policies with it ==")
        try run(a, "A", "link set sim0 down")
        try run(a, "A", "state count")
        try run(a, "A", "policy count")
        try check(a.stack.states.count == 0 && a.stack.policies.totalCount == 0, "nothing offloaded to sim0 is left on A")
        _ = a.host.takeCaptured()
        a.host.send(ipv4(src: "10.0.1.1", dst: "10.0.2.1", payload: [0, 1, 0, 2, 0, 8, 0, 0], id: 99))
        a.host.settle(with: [b.host])
        try check(a.host.takeCaptured().isEmpty && b.host.takeDelivered().isEmpty, "with sim0 down nothing leaves A")
    }
}
