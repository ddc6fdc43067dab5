// Names for numbers, both ways: XFRM protocols, algorithm kinds, modes, and IP protocol names as getprotobyname(3)
// resolves them from /etc/protocols (Debian's netbase table, so output does not depend on the machine).

import XFRMWire

/// Attribute numbers this module uses that `XfrmAttribute` has no case for (sent and read as `.unknown`).
enum RawAttr {
    static let algComp: UInt16 = 3
    static let secCtx: UInt16 = 8
    static let srcAddr: UInt16 = 13
    static let addressFilter: UInt16 = 26
    static let outputMark: UInt16 = 29  // XFRMA_SET_MARK, printed as output-mark
    static let setMarkMask: UInt16 = 30
}

enum IPProto {
    static let icmp: UInt8 = 1
    static let ipip: UInt8 = 4
    static let tcp: UInt8 = 6
    static let udp: UInt8 = 17
    static let dccp: UInt8 = 33
    static let ipv6: UInt8 = 41
    static let routing: UInt8 = 43
    static let gre: UInt8 = 47
    static let icmpv6: UInt8 = 58
    static let dstopts: UInt8 = 60
    static let sctp: UInt8 = 132
    static let mh: UInt8 = 135
}

// MARK: - XFRM protocols

private let xfrmProtoTable: [(String, UInt8)] = [
    ("esp", XfrmProto.esp), ("ah", XfrmProto.ah), ("comp", XfrmProto.comp),
    ("route2", IPProto.routing), ("hao", IPProto.dstopts), ("ipsec-any", XfrmProto.any),
]

func xfrmProtoByName(_ name: String) -> UInt8? {
    xfrmProtoTable.first { $0.0 == name }?.1
}

/// strxf_xfrmproto().
func xfrmProtoName(_ proto: UInt8) -> String {
    xfrmProtoTable.first { $0.1 == proto }?.0 ?? "\(proto)"
}

func isIPsecProto(_ p: UInt8) -> Bool { p == XfrmProto.esp || p == XfrmProto.ah || p == XfrmProto.comp }
func isROProto(_ p: UInt8) -> Bool { p == IPProto.routing || p == IPProto.dstopts }

// MARK: - Algorithm kinds

enum AlgoKind: Sendable {
    case crypt, auth, comp, aead, authTrunc

    var name: String {
        switch self {
        case .crypt: "enc"
        case .auth: "auth"
        case .comp: "comp"
        case .aead: "aead"
        case .authTrunc: "auth-trunc"
        }
    }

    static func byName(_ s: String) -> AlgoKind? {
        switch s {
        case "enc": .crypt
        case "auth": .auth
        case "comp": .comp
        case "aead": .aead
        case "auth-trunc": .authTrunc
        default: nil
        }
    }
}

// MARK: - Modes, shares, policy types

func modeName(_ mode: UInt8) -> String {
    switch mode {
    case 0: "transport"
    case 1: "tunnel"
    case 2: "ro"
    case 3: "in_trigger"
    case 4: "beet"
    default: "\(mode)"
    }
}

/// xfrm_mode_parse(): by prefix, in this order.
func modeByName(_ word: String) -> UInt8? {
    if matches(word, "transport") { return 0 }
    if matches(word, "tunnel") { return 1 }
    if matches(word, "ro") { return 2 }
    if matches(word, "in_trigger") { return 3 }
    if matches(word, "beet") { return 4 }
    return nil
}

func shareName(_ share: UInt8) -> String {
    switch share {
    case 0: "any"
    case 1: "session"
    case 2: "user"
    case 3: "unique"
    default: "\(share)"
    }
}

func policyTypeName(_ t: UInt8) -> String {
    switch t {
    case 0: "main"
    case 1: "sub"
    default: "\(t)"
    }
}

// MARK: - IP protocols (/etc/protocols)

/// name, number, aliases — Debian netbase 6.4.
private let protocolsDB: [(String, Int, [String])] = [
    ("ip", 0, ["IP"]), ("hopopt", 0, ["HOPOPT"]), ("icmp", 1, ["ICMP"]), ("igmp", 2, ["IGMP"]), ("ggp", 3, ["GGP"]),
    ("ipencap", 4, ["IP-ENCAP"]), ("st", 5, ["ST"]), ("tcp", 6, ["TCP"]), ("egp", 8, ["EGP"]), ("igp", 9, ["IGP"]),
    ("pup", 12, ["PUP"]), ("udp", 17, ["UDP"]), ("hmp", 20, ["HMP"]), ("xns-idp", 22, ["XNS-IDP"]),
    ("rdp", 27, ["RDP"]), ("iso-tp4", 29, ["ISO-TP4"]), ("dccp", 33, ["DCCP"]), ("xtp", 36, ["XTP"]),
    ("ddp", 37, ["DDP"]), ("idpr-cmtp", 38, ["IDPR-CMTP"]), ("ipv6", 41, ["IPv6"]), ("ipv6-route", 43, ["IPv6-Route"]),
    ("ipv6-frag", 44, ["IPv6-Frag"]), ("idrp", 45, ["IDRP"]), ("rsvp", 46, ["RSVP"]), ("gre", 47, ["GRE"]),
    ("esp", 50, ["IPSEC-ESP"]), ("ah", 51, ["IPSEC-AH"]), ("skip", 57, ["SKIP"]), ("ipv6-icmp", 58, ["IPv6-ICMP"]),
    ("ipv6-nonxt", 59, ["IPv6-NoNxt"]), ("ipv6-opts", 60, ["IPv6-Opts"]), ("rspf", 73, ["RSPF", "CPHB"]),
    ("vmtp", 81, ["VMTP"]), ("eigrp", 88, ["EIGRP"]), ("ospf", 89, ["OSPFIGP"]), ("ax.25", 93, ["AX.25"]),
    ("ipip", 94, ["IPIP"]), ("etherip", 97, ["ETHERIP"]), ("encap", 98, ["ENCAP"]), ("pim", 103, ["PIM"]),
    ("ipcomp", 108, ["IPCOMP"]), ("vrrp", 112, ["VRRP"]), ("l2tp", 115, ["L2TP"]), ("isis", 124, ["ISIS"]),
    ("sctp", 132, ["SCTP"]), ("fc", 133, ["FC"]), ("mobility-header", 135, ["Mobility-Header"]),
    ("udplite", 136, ["UDPLite"]), ("mpls-in-ip", 137, ["MPLS-in-IP"]), ("manet", 138, []), ("hip", 139, ["HIP"]),
    ("shim6", 140, ["Shim6"]), ("wesp", 141, ["WESP"]), ("rohc", 142, ["ROHC"]), ("ethernet", 143, ["Ethernet"]),
    ("mptcp", 262, ["MPTCP"]),
]

/// getprotobyname(): a name or an alias, case-sensitive. The number is an int (mptcp is 262), truncated by the caller
/// to the u8 a selector holds, as iproute2 does.
func protocolNumber(named name: String) -> Int? {
    protocolsDB.first { $0.0 == name || $0.2.contains(name) }?.1
}

/// strxf_proto(): getprotobynumber()'s name, or the number.
func protocolName(_ proto: UInt8) -> String {
    protocolsDB.first { $0.1 == Int(proto) }?.0 ?? "\(proto)"
}
