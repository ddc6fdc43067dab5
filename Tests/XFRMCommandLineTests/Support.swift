#if canImport(Glibc)
import Glibc
#endif
import XFRMWire
@testable import XFRMCommandLine

/// Local time is UTC for every test that prints one (set once, before the first such print).
enum UTC {
    static let set: Bool = {
        setenv("TZ", "UTC", 1)
        tzset()
        return true
    }()
}

/// 2024-05-01 10:00:00 UTC.
let may1 = UInt64(1_714_557_600)

func v4(_ s: String) -> XfrmAddress {
    let parts = s.split(separator: ".").map { UInt8($0)! }
    return XfrmAddress(bytes: parts + [UInt8](repeating: 0, count: 12))
}

func v6(_ s: String) -> XfrmAddress { XfrmAddress(bytes: parseIPv6(s)!) }

struct Interfaces: InterfaceNameResolver {
    let table: [String: Int32] = ["lo": 1, "eth0": 2, "eth4": 5]
    func ifindex(named: String) -> Int32? { self.table[named] }
    func name(ofIndex: Int32) -> String? { self.table.first { $0.value == ofIndex }?.key }
}

let ack = XfrmMessage(type: NetlinkControlType.error, flags: 0, body: .error(errno: 0, message: ""))
let done = XfrmMessage(type: NetlinkControlType.done, flags: NetlinkFlags.multi, body: .done(status: 0, message: ""))

func errorReply(_ errno: Int32, _ text: String = "") -> XfrmMessage {
    XfrmMessage(type: NetlinkControlType.error, flags: 0, body: .error(errno: -errno, message: text))
}

/// Records every request and answers with `reply`.
final class RecordingTransport: XfrmTransport {
    var requests: [XfrmMessage] = []
    let reply: (XfrmMessage) -> [XfrmMessage]
    init(reply: @escaping (XfrmMessage) -> [XfrmMessage] = { _ in [ack] }) { self.reply = reply }
    func request(_ message: XfrmMessage) -> [XfrmMessage] {
        self.requests.append(message)
        return self.reply(message)
    }
}

/// A tiny kernel: SAs and policies it dumps, deletes it honours.
final class FakeKernel: XfrmTransport {
    var states: [XfrmMessage]
    var policies: [XfrmMessage]
    var requests: [XfrmMessage] = []
    init(states: [XfrmMessage] = [], policies: [XfrmMessage] = []) {
        self.states = states
        self.policies = policies
    }

    func request(_ m: XfrmMessage) -> [XfrmMessage] {
        self.requests.append(m)
        switch (m.messageType, m.body) {
        case (.getSA?, .empty): return self.states.map { var s = $0; s.flags = NetlinkFlags.multi; return s } + [done]
        case (.getPolicy?, .empty):
            return self.policies.map { var p = $0; p.flags = NetlinkFlags.multi; return p } + [done]
        case (.delSA?, .saID(let id)):
            let before = self.states.count
            self.states.removeAll {
                guard case .saInfo(let s) = $0.body else { return false }
                return s.id.daddr == id.daddr && s.id.spi == id.spi && s.id.proto == id.proto
            }
            return before == self.states.count ? [errorReply(Errno.ESRCH)] : []
        case (.delPolicy?, .policyID(let id)):
            let before = self.policies.count
            self.policies.removeAll {
                guard case .policyInfo(let p) = $0.body else { return false }
                return p.index == id.index && p.dir == id.dir && p.sel == id.sel
            }
            return before == self.policies.count ? [errorReply(Errno.ENOENT)] : []
        default:
            return [errorReply(Errno.EOPNOTSUPP)]
        }
    }
}

// MARK: - Builders

func saInfo(src: String, dst: String, spi: UInt32, proto: UInt8 = XfrmProto.esp, reqid: UInt32 = 0, mode: UInt8 = 0)
    -> XfrmUserSAInfo
{
    var s = XfrmUserSAInfo()
    let six = src.contains(":")
    s.family = six ? AddressFamily.inet6 : AddressFamily.inet
    s.saddr = six ? v6(src) : v4(src)
    s.id = XfrmID(daddr: six ? v6(dst) : v4(dst), spi: spi, proto: proto)
    s.reqid = reqid
    s.mode = mode
    return s
}

func selector(src: String, _ ls: UInt8, dst: String, _ ld: UInt8, proto: UInt8 = 0) -> XfrmSelector {
    var sel = XfrmSelector()
    let six = src.contains(":")
    sel.family = six ? AddressFamily.inet6 : AddressFamily.inet
    sel.saddr = six ? v6(src) : v4(src)
    sel.daddr = six ? v6(dst) : v4(dst)
    sel.prefixlenS = ls
    sel.prefixlenD = ld
    sel.proto = proto
    return sel
}

func template(src: String, dst: String, proto: UInt8 = XfrmProto.esp, reqid: UInt32, mode: UInt8) -> XfrmUserTmpl {
    var t = XfrmUserTmpl()
    t.family = AddressFamily.inet
    t.saddr = v4(src)
    t.id = XfrmID(daddr: v4(dst), spi: 0, proto: proto)
    t.reqid = reqid
    t.mode = mode
    return t
}

let authKey = [UInt8](repeating: 0xaa, count: 32)
let encKey: [UInt8] = Array(1...16)
let authHex = String(repeating: "aa", count: 32)
let encHex = "0102030405060708090a0b0c0d0e0f10"

/// An ESP transport SA as `ip xfrm state list` gets it from the kernel: AUTH and AUTH_TRUNC both, CRYPT, REPLAY_VAL.
func basicSA() -> XfrmMessage {
    var s = saInfo(src: "10.0.0.1", dst: "10.0.0.2", spi: 0x1000, reqid: 1)
    s.replayWindow = 32
    s.sel = XfrmSelector()
    s.sel.family = AddressFamily.inet
    s.curlft.addTime = may1
    var r = XfrmReplayState()
    r.seq = 3
    r.oseq = 5
    r.bitmap = 7
    return XfrmMessage(.newSA, flags: 0, body: .saInfo(s), attributes: [
        .algAuth(XfrmAlgorithm(name: "hmac(sha256)", key: authKey)),
        .algAuthTrunc(XfrmAlgorithm(name: "hmac(sha256)", key: authKey, lengthBits: 128)),
        .algCrypt(XfrmAlgorithm(name: "cbc(aes)", key: encKey)),
        .replay(r),
    ])
}

/// An outbound tunnel policy with one ESP template.
func basicPolicy(index: UInt32 = 25) -> XfrmMessage {
    var p = XfrmUserPolicyInfo()
    p.sel = selector(src: "10.0.1.0", 24, dst: "10.0.2.0", 24)
    p.dir = XfrmPolicyDir.outbound.rawValue
    p.priority = 100
    p.index = index
    p.curlft.addTime = may1
    return XfrmMessage(.newPolicy, flags: 0, body: .policyInfo(p), attributes: [
        .templates([template(src: "192.0.2.1", dst: "192.0.2.2", reqid: 1, mode: 1)]),
    ])
}
