// Numbers from include/uapi/linux/xfrm.h and linux/netlink.h (Specification constants).

/// XFRM netlink message types (XFRM_MSG_*).
public enum XfrmMessageType: UInt16, Sendable, CaseIterable {
    case newSA = 16, delSA, getSA, newPolicy, delPolicy, getPolicy, allocSPI, acquire, expire, updPolicy, updSA
    case polExpire, flushSA, flushPolicy, newAE, getAE, report, migrate, newSADInfo, getSADInfo, newSPDInfo
    case getSPDInfo, mapping, setDefault, getDefault
}

/// netlink message flags and control types.
public enum NetlinkFlags {
    public static let request: UInt16 = 0x1
    public static let multi: UInt16 = 0x2
    public static let ack: UInt16 = 0x4
    public static let dump: UInt16 = 0x300
    public static let replace: UInt16 = 0x100
    public static let excl: UInt16 = 0x200
    public static let create: UInt16 = 0x400
    /// On an error/ACK message: the request was not echoed beyond its header (NETLINK_CAP_ACK, as iproute2 asks).
    public static let capped: UInt16 = 0x100
    /// On an error/ACK message: extended-ACK attributes (the message text) follow.
    public static let ackTLVs: UInt16 = 0x200
}

extension XfrmMessageType {
    /// The fixed body a request of this type must carry at least (≈ xfrm_msg_min[] with the 64-bit layouts):
    /// a shorter message — a 32-bit client's smaller structs, say — is refused with EINVAL, never misread.
    public var minimumBodySize: Int {
        switch self {
        case .newSA, .updSA: 224  // xfrm_usersa_info
        case .delSA, .getSA: 24  // xfrm_usersa_id
        case .newPolicy, .updPolicy: 168  // xfrm_userpolicy_info
        case .delPolicy, .getPolicy: 64  // xfrm_userpolicy_id
        case .allocSPI: 232  // xfrm_userspi_info
        case .acquire: 280  // xfrm_user_acquire
        case .expire: 232  // xfrm_user_expire
        case .polExpire: 176  // xfrm_user_polexpire
        case .flushSA: 1  // xfrm_usersa_flush
        case .flushPolicy: 0
        case .newAE, .getAE: 48  // xfrm_aevent_id
        case .report: 60  // xfrm_user_report
        case .migrate: 64  // xfrm_userpolicy_id
        case .newSADInfo, .getSADInfo, .newSPDInfo, .getSPDInfo: 4  // u32 flags
        case .mapping: 64  // xfrm_user_mapping
        case .setDefault, .getDefault: 3  // xfrm_userpolicy_default
        }
    }
}

public enum NetlinkControlType {
    public static let noop: UInt16 = 1
    public static let error: UInt16 = 2
    public static let done: UInt16 = 3
}

/// XFRM attribute types (XFRMA_*).
public enum XfrmAttributeType: UInt16, Sendable {
    case algAuth = 1, algCrypt, algComp, encap, tmpl, sa, policy, secCtx, ltimeVal, replayVal, replayThresh
    case etimerThresh, srcAddr, coAddr, lastUsed, policyType, migrate, algAEAD, kmAddress, algAuthTrunc, mark
    case tfcPad, replayESNVal, saExtraFlags, proto, addressFilter, pad, offloadDev, setMark, setMarkMask, ifID
    case mtimerThresh, saDir, natKeepaliveInterval, saPCPU
}

/// Address families.
public enum AddressFamily {
    public static let unspec: UInt16 = 0
    public static let inet: UInt16 = 2
    public static let inet6: UInt16 = 10
}

/// Modes (XFRM_MODE_*).
public enum XfrmMode: UInt8, Sendable {
    case transport = 0, tunnel, routeOptimization, inTrigger, beet, iptfs
}

/// SA flags (XFRM_STATE_*).
public enum XfrmStateFlag {
    public static let noECN: UInt8 = 1
    public static let decapDSCP: UInt8 = 2
    public static let noPMTUDisc: UInt8 = 4
    public static let wildRecv: UInt8 = 8
    public static let icmp: UInt8 = 16
    public static let afUnspec: UInt8 = 32
    public static let align4: UInt8 = 64
    public static let esn: UInt8 = 128
}

/// SA extra flags (XFRM_SA_XFLAG_*).
public enum XfrmStateExtraFlag {
    public static let dontEncapDSCP: UInt32 = 1
    public static let oseqMayWrap: UInt32 = 2
}

/// Policy directions, actions, flags and defaults.
public enum XfrmPolicyDir: UInt8, Sendable, CaseIterable {
    case inbound = 0, outbound = 1, forward = 2
}
public enum XfrmPolicyAction {
    public static let allow: UInt8 = 0
    public static let block: UInt8 = 1
}
public enum XfrmPolicyFlag {
    public static let localOK: UInt8 = 1
    public static let icmp: UInt8 = 2
    /// XFRM_POLICY_CPU_ACQUIRE (Linux 6.13): ask the key manager for an SA per CPU (RFC 9611).
    public static let cpuAcquire: UInt8 = 4
}
public enum XfrmPolicyDefault {
    public static let unset: UInt8 = 0
    public static let block: UInt8 = 1
    public static let accept: UInt8 = 2
}

/// SA direction attribute values (XFRM_SA_DIR_*).
public enum XfrmSADir {
    public static let inbound: UInt8 = 1
    public static let outbound: UInt8 = 2
}

/// Offload flags (XFRM_OFFLOAD_*).
public enum XfrmOffloadFlag {
    public static let ipv6: UInt8 = 1
    public static let inbound: UInt8 = 2
    public static let packet: UInt8 = 4
}

/// UDP encapsulation types.
public enum XfrmEncapType {
    public static let espInUDPNonIKE: UInt16 = 1
    public static let espInUDP: UInt16 = 2
    public static let espInTCP: UInt16 = 7
}

/// IPPROTO values for XFRM protocols.
public enum XfrmProto {
    public static let esp: UInt8 = 50
    public static let ah: UInt8 = 51
    public static let comp: UInt8 = 108
    public static let route2: UInt8 = 43
    public static let hao: UInt8 = 60
    public static let any: UInt8 = 255  // IPSEC_PROTO_ANY
}

/// XFRM_INF: an unlimited byte/packet lifetime.
public let xfrmInfinity: UInt64 = ~0

/// Multicast groups (XFRMNLGRP_*).
public enum XfrmGroup {
    public static let acquire: UInt32 = 1
    public static let expire: UInt32 = 2
    public static let sa: UInt32 = 3
    public static let policy: UInt32 = 4
    public static let mapping: UInt32 = 8
}
