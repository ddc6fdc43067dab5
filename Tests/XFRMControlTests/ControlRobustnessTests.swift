import Testing
import XFRMCommandLine
import XFRMControl
import XFRMCore
import XFRMPacket
import XFRMWire

/// A transport that records the requests the command layer sends and forwards them to a server.
final class Recorder: XfrmTransport {
    let server: XfrmControlServer
    var requests: [XfrmMessage] = []
    init(_ s: XfrmControlServer) { self.server = s }
    func request(_ message: XfrmMessage) -> [XfrmMessage] {
        self.requests.append(message)
        return self.server.request(message)
    }
}

struct Rng {
    var state: UInt64
    mutating func next() -> UInt64 {
        self.state ^= self.state << 13
        self.state ^= self.state >> 7
        self.state ^= self.state << 17
        return self.state
    }
}

@Suite("User API robustness")
struct ControlRobustnessTests {
    static let commands: [[String]] = [
        "state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 reqid 1 mode tunnel aead rfc4106(gcm(aes)) 0x0102030405060708090a0b0c0d0e0f1011121314 128 replay-window 64 flag esn",
        "state add src 2001:db8::1 dst 2001:db8::2 proto esp spi 0x200 mode transport enc cbc(aes) 0x00112233445566778899aabbccddeeff auth-trunc hmac(sha256) 0x0000000000000000000000000000000000000000000000000000000000000000 128 encap espinudp 4500 4500 0.0.0.0 limit packet-soft 10",
        "policy add src 10.0.1.0/24 dst 10.0.2.0/24 proto tcp dport 443 dir out priority 10 mark 5 mask 0xff tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 1 mode tunnel",
        "state allocspi src 192.0.2.1 dst 192.0.2.2 proto esp min 0x1000 max 0x2000",
        "policy setdefault in block out accept",
        "state delete src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100",
    ].map { $0.split(separator: " ").map(String.init) }

    @Test("the command layer's requests survive an encode/decode round trip unchanged")
    func roundTrip() throws {
        let rec = Recorder(XfrmControlServer(stack: XFRMStack(clock: ManualClock())))
        for c in Self.commands { _ = try? runXfrmCommand(c, options: XfrmCLIOptions(), transport: rec) }
        #expect(rec.requests.count == Self.commands.count)
        for m in rec.requests {
            let decoded = try XfrmMessage.decode(m.encode())
            #expect(decoded.encode() == m.encode())
        }
    }

    @Test("a success is acknowledged only with NLM_F_ACK; an error is always answered (netlink_rcv_skb)")
    func acknowledgements() throws {
        let rec = Recorder(XfrmControlServer(stack: XFRMStack(clock: ManualClock())))
        _ = try runXfrmCommand(Self.commands[0], options: XfrmCLIOptions(), transport: rec)
        var add = try #require(rec.requests.first)
        #expect(add.flags & NetlinkFlags.ack != 0)
        let server = XfrmControlServer(stack: XFRMStack(clock: ManualClock()))
        add.flags &= ~NetlinkFlags.ack
        #expect(server.request(add).isEmpty)
        guard case .error(let errno, _)? = server.request(add).first?.body else {
            Issue.record("a duplicate add without NLM_F_ACK got no error")
            return
        }
        #expect(errno == -17)
    }

    @Test("mutated and random requests never crash the server and get an answer (silence only for a success not asking for NLM_F_ACK)")
    func mutations() throws {
        let stack = XFRMStack(clock: ManualClock())
        let server = XfrmControlServer(stack: stack)
        let rec = Recorder(server)
        for c in Self.commands { _ = try? runXfrmCommand(c, options: XfrmCLIOptions(), transport: rec) }
        let seeds = rec.requests.map { $0.encode() }
        var rng = Rng(state: 0x5eed_1234_abcd_0001)
        var answered = 0
        var decoded = 0
        for i in 0..<6000 {
            var bytes: [UInt8]
            if i % 3 == 0 {
                bytes = (0..<Int(rng.next() % 400)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            } else {
                bytes = seeds[Int(rng.next() % UInt64(seeds.count))]
                for _ in 0..<(1 + Int(rng.next() % 6)) where !bytes.isEmpty {
                    let at = Int(rng.next() % UInt64(bytes.count))
                    bytes[at] = UInt8(truncatingIfNeeded: rng.next())
                }
                if rng.next() % 5 == 0 { bytes = Array(bytes.prefix(Int(rng.next() % UInt64(bytes.count + 1)))) }
            }
            guard let msgs = try? XfrmMessage.decodeAll(bytes) else { continue }
            for m in msgs where m.flags & NetlinkFlags.request != 0 {
                decoded += 1
                let replies = server.request(m)
                // ≈ netlink_rcv_skb: a success is acknowledged only when asked; an error always is.
                if !replies.isEmpty || m.flags & NetlinkFlags.ack == 0 { answered += 1 }
            }
        }
        #expect(decoded > 100)
        #expect(answered == decoded)
    }
}
