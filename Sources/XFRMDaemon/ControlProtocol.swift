// What the daemon's control socket speaks beyond the kernel's XFRM netlink: how a client joins the event groups.
// On NETLINK_XFRM that is setsockopt(NETLINK_ADD_MEMBERSHIP); a Unix socket has no such option, so a client sends
// one NLMSG_NOOP whose 4-byte body is the bitmask of the XFRMNLGRP_* groups it wants (bit g − 1 for group g).
// And what a key manager asks the kernel's ethtool about (does this interface have `esp-hw-offload`?) is the
// daemon's to answer for its own devices: `xfrm-bridge` asks with one XFRMD_MSG_GETOFFLOADDEV (below).

import XFRMControl
import XFRMCore
import XFRMWire

public enum ControlProtocol {
    /// XFRMNLGRP_ACQUIRE, EXPIRE, SA, POLICY (the groups the daemon's events belong to).
    public static let groupAcquire: UInt32 = 1
    public static let groupExpire: UInt32 = 2
    public static let groupSA: UInt32 = 3
    public static let groupPolicy: UInt32 = 4
    public static let groupMapping: UInt32 = 8
    /// Every group `ip xfrm monitor` listens to.
    public static let allGroups: UInt32 = 0xff

    /// XFRMD_MSG_GETOFFLOADDEV, the daemon's own message type (far above XFRM_MSG_MAX): a request with no body is
    /// answered by one message of the same type carrying an XFRMA_OFFLOAD_DEV attribute per interface with an ESP
    /// offload device (flags XFRM_OFFLOAD_PACKET when it takes packet offload).
    public static let getOffloadDevices: UInt16 = 0x7ff0

    /// The answer to XFRMD_MSG_GETOFFLOADDEV.
    static func offloadDevices(_ stack: XFRMStack, sequence: UInt32, portID: UInt32) -> XfrmMessage {
        XfrmMessage(type: getOffloadDevices, flags: 0, sequence: sequence, portID: portID, body: .empty,
                    attributes: stack.offloadDevices().map { d in
                        .offloadDevice(XfrmUserOffload(ifindex: d.ifindex,
                                                       flags: d.types.contains(.packet) ? XfrmOffloadFlag.packet : 0))
                    })
    }

    /// The largest datagram either side sends or reads; dumps are split across datagrams below it.
    public static let maximumDatagram = 64 * 1024
    static let replyBatch = 32 * 1024

    /// The group-join message.
    public static func joinMessage(groups: UInt32) -> XfrmMessage {
        XfrmMessage(type: NetlinkControlType.noop, flags: NetlinkFlags.request, body: .infoRequest(flags: groups))
    }

    /// The group an event message goes to (≈ xfrm_send_state_notify / xfrm_send_policy_notify / km_*).
    static func group(of m: XfrmMessage) -> UInt32? {
        switch XfrmMessageType(rawValue: m.type) {
        case .acquire: groupAcquire
        case .expire, .polExpire: groupExpire
        case .newSA, .updSA, .delSA, .flushSA: groupSA
        case .newPolicy, .updPolicy, .delPolicy, .flushPolicy: groupPolicy
        case .mapping: groupMapping
        default: nil
        }
    }

    static func bit(_ group: UInt32) -> UInt32 { 1 << (group - 1) }

    /// Answers every netlink message in one datagram from a client, each on its own (≈ netlink_rcv_skb): a
    /// message whose length runs past the datagram (or is below a header), or trailing bytes shorter than a header,
    /// end the datagram — silently after a message, as the kernel (keepalived sends a 16-byte message in a larger
    /// zeroed buffer), but with an EINVAL reply when nothing came before them (the kernel stays silent there too; a
    /// client is not left waiting for an answer to garbage). An NLMSG_NOOP with a 4-byte body is the group join,
    /// passed to `join` and not answered.
    public static func answer(datagram: [UInt8], server: XfrmControlServer, join: (UInt32) -> Void) -> [XfrmMessage] {
        let n = datagram.count
        var replies: [XfrmMessage] = []
        var off = 0
        while off + 16 <= n {
            let length = Int(UInt32(datagram[off]) | UInt32(datagram[off + 1]) << 8 | UInt32(datagram[off + 2]) << 16
                             | UInt32(datagram[off + 3]) << 24)
            guard length >= 16, off + length <= n else {
                if off == 0 { replies += server.request(raw: datagram) }  // the malformed message's error reply
                break
            }
            let message = Array(datagram[off..<(off + length)])
            let type = UInt16(message[4]) | UInt16(message[5]) << 8
            if type == NetlinkControlType.noop {
                if length >= 20 {
                    join(UInt32(message[16]) | UInt32(message[17]) << 8 | UInt32(message[18]) << 16
                         | UInt32(message[19]) << 24)
                }
            } else if type == getOffloadDevices {
                let h = NetlinkHeader(bytes: message) ?? NetlinkHeader()
                replies.append(offloadDevices(server.stack, sequence: h.sequence, portID: h.portID))
            } else {
                replies += server.request(raw: message)
            }
            off += (length + 3) & ~3
        }
        if off == 0 && n > 0 && n < 16 {
            replies += server.request(raw: datagram)  // a datagram shorter than a header
        }
        return replies
    }
}
