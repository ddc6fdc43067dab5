// The `ip xfrm` command layer: one command line in, iproute2's stdout out, over XFRM netlink messages only
// (this module sees XFRMWire, as iproute2 sees only the uapi header).

import XFRMWire

/// Global `ip` options that change what `ip xfrm` prints.
public struct XfrmCLIOptions: Sendable {
    /// How many times `-s` was given: 0, 1 or 2.
    public var stats: Int
    /// `-o`/`-oneline`: each entry on one line, line breaks inside it printed as a backslash.
    public var oneline = false

    public init(stats: Int = 0, oneline: Bool = false) {
        self.stats = stats
        self.oneline = oneline
    }
}

/// A command that failed: a parse error (nothing was sent) or an error reply. One line, in iproute2's words.
public struct CommandError: Error, CustomStringConvertible, Equatable, Sendable {
    public let description: String
    /// The status `ip xfrm` exits with for this error (its xfrm code exits on the spot, also inside `-batch`):
    /// 2 after an error reply (rtnl_talk failed), 1 for "Not enough information", 255 for other argument errors
    /// (invarg/missarg/duparg: exit(-1)).
    public let exitStatus: Int32
    /// What the command printed to standard output before it failed (a listing's entries before its dump failed),
    /// for the caller to print ahead of the error.
    public var output = ""
    public init(_ description: String, exitStatus: Int32? = nil) {
        self.description = description
        self.exitStatus = exitStatus ?? (description.hasPrefix("Not enough information") ? 1 : 255)
    }

    /// Errors are equal when they say the same thing.
    public static func == (a: CommandError, b: CommandError) -> Bool { a.description == b.description }
}

/// Turns device names into interface indexes and back (iproute2's ll_name_to_index / ll_index_to_name).
public protocol InterfaceNameResolver {
    func ifindex(named: String) -> Int32?
    func name(ofIndex: Int32) -> String?
}

/// Runs one `ip xfrm` command line (the words after "xfrm", e.g. ["state", "add", "src", ...]) against `transport` and
/// returns what iproute2 would print on stdout. Throws on a parse error (before anything is sent: a failed command
/// changes nothing) or on an error reply.
public func runXfrmCommand(
    _ args: [String], options: XfrmCLIOptions, transport: any XfrmTransport,
    interfaces: (any InterfaceNameResolver)? = nil
) throws(CommandError) -> String {
    let ctx = CLIContext(options: options, interfaces: interfaces, transport: transport)
    guard let object = args.first else { throw CommandError(xfrmUsage) }
    if matches(object, "state") || matches(object, "sa") {
        return try StateCommand(ctx: ctx, argv: args).run()
    }
    if matches(object, "policy") {
        return try PolicyCommand(ctx: ctx, argv: args).run()
    }
    if matches(object, "monitor") {
        throw CommandError(
            "Error: \"ip xfrm monitor\" listens for events and cannot run as one command; format each event with formatMonitorEvent.")
    }
    throw CommandError(xfrmUsage)
}

/// Formats one event message exactly as `ip xfrm monitor` prints it.
public func formatMonitorEvent(
    _ message: XfrmMessage, options: XfrmCLIOptions, interfaces: (any InterfaceNameResolver)? = nil
) -> String {
    var p = Printer(options: options, interfaces: interfaces)
    p.monitorEvent(message)
    return p.out
}

/// Formats an SA (a NEWSA-type message; UPDSA, DELSA and EXPIRE get iproute2's "Updated "/"Deleted "/"Expired ")
/// exactly as `ip xfrm state list` prints one entry.
public func formatState(
    _ message: XfrmMessage, options: XfrmCLIOptions, nokeys: Bool = false,
    interfaces: (any InterfaceNameResolver)? = nil
) -> String {
    var p = Printer(options: options, interfaces: interfaces)
    p.statePrint(message, nokeys: nokeys, filter: nil)
    return p.out
}

/// Formats a policy (a NEWPOLICY-type message; UPDPOLICY, DELPOLICY and POLEXPIRE get their prefixes) exactly as
/// `ip xfrm policy list` prints one entry.
public func formatPolicy(
    _ message: XfrmMessage, options: XfrmCLIOptions, interfaces: (any InterfaceNameResolver)? = nil
) -> String {
    var p = Printer(options: options, interfaces: interfaces)
    p.policyPrint(message, filter: nil)
    return p.out
}

/// What one command run shares: options, the transport, the interface names, and iproute2's `preferred_family`,
/// which parsing updates as it goes (and printing falls back on).
final class CLIContext {
    let options: XfrmCLIOptions
    let interfaces: (any InterfaceNameResolver)?
    let transport: any XfrmTransport
    var preferredFamily: UInt16 = AddressFamily.unspec
    var filter = XfrmFilter()

    init(options: XfrmCLIOptions, interfaces: (any InterfaceNameResolver)?, transport: any XfrmTransport) {
        self.options = options
        self.interfaces = interfaces
        self.transport = transport
    }

    func printer() -> Printer {
        var p = Printer(options: self.options, interfaces: self.interfaces)
        p.preferredFamily = self.preferredFamily
        return p
    }

    /// ll_name_to_index(): the resolver's answer, else the "ifN" form; 0 when unknown.
    func ifindex(named name: String) -> UInt32 {
        if let i = self.interfaces?.ifindex(named: name), i != 0 { return UInt32(bitPattern: i) }
        return ifIndexFromIfName(name)
    }
}

/// ll_idx_a2n(): "if%u".
func ifIndexFromIfName(_ name: String) -> UInt32 {
    guard name.hasPrefix("if") else { return 0 }
    let digits = name.dropFirst(2).prefix { $0.isASCII && $0.isNumber }
    return UInt32(digits) ?? 0
}

let xfrmUsage = "Usage: ip xfrm XFRM-OBJECT { COMMAND | help }\nwhere  XFRM-OBJECT := state | policy | monitor"

// MARK: - Talking to the transport

extension CLIContext {
    /// rtnl_talk() without an answer: NLM_F_ACK is added; an error reply fails the command.
    func talk(_ message: XfrmMessage) throws(CommandError) {
        var m = message
        m.flags |= NetlinkFlags.ack
        for r in self.transport.request(m) {
            if case .error(let errno, let text) = r.body, errno != 0 { throw replyError(errno: errno, extack: text) }
        }
    }

    /// rtnl_talk() with an answer: the reply message, or the error.
    func talkAnswer(_ message: XfrmMessage) throws(CommandError) -> XfrmMessage? {
        let replies = self.transport.request(message)
        for r in replies {
            if case .error(let errno, let text) = r.body, errno != 0 { throw replyError(errno: errno, extack: text) }
        }
        return replies.first
    }

    /// A dump: every message before NLMSG_DONE. A failure ends it as rtnl_dump_filter and its caller end it
    /// (`terminated`: "Dump terminated" after a list, "Delete-all terminated" in a deleteall round; exit status 1):
    /// an NLMSG_ERROR (a dump refused before it started) is reported by perror, an NLMSG_DONE carrying -errno (a
    /// dump the kernel ended, netlink_dump_done) as rtnl_dump_done reports it — its extack as "Error: MSG.", else
    /// nothing for ENOENT and EOPNOTSUPP, a fixed text for EMSGSIZE, perror for the rest.
    func dump(_ message: XfrmMessage, terminated: String = "Dump terminated") throws(CommandError) -> [XfrmMessage] {
        let (entries, failure) = self.dumpEntries(message, terminated: terminated)
        if let failure { throw failure }
        return entries
    }

    /// `dump`, with the entries that came before a failure: a listing prints them, then fails (iproute2 prints each
    /// entry as it arrives; the failure is in the dump's last message).
    func dumpEntries(_ message: XfrmMessage, terminated: String = "Dump terminated")
        -> (entries: [XfrmMessage], failure: CommandError?)
    {
        var out: [XfrmMessage] = []
        for r in self.transport.request(message) {
            if case .done(let status, let text) = r.body {
                guard status < 0 else { break }
                var lines: [String] = []
                if !text.isEmpty {
                    lines.append("Error: \(text)\(text.hasSuffix(".") ? "" : ".")")
                } else if -status == Errno.EMSGSIZE {
                    lines.append("Error: Buffer too small for object.")
                } else if -status != Errno.ENOENT && -status != Errno.EOPNOTSUPP {
                    lines.append("RTNETLINK answers: \(errnoText(-status))")
                }
                return (out, CommandError((lines + [terminated]).joined(separator: "\n"), exitStatus: 1))
            }
            if case .error(let errno, _) = r.body {
                return (out, CommandError("RTNETLINK answers: \(errnoText(-errno))\n\(terminated)", exitStatus: 1))
            }
            out.append(r)
        }
        return (out, nil)
    }
}

/// iproute2's report of an error reply: the extended ack as "Error: MSG." when there is one, else strerror.
func replyError(errno: Int32, extack: String) -> CommandError {
    if !extack.isEmpty {
        return CommandError("Error: \(extack)\(extack.hasSuffix(".") ? "" : ".")", exitStatus: 2)
    }
    return CommandError("RTNETLINK answers: \(errnoText(-errno))", exitStatus: 2)
}

/// strerror() for a positive errno.
func errnoText(_ errno: Int32) -> String {
    errno == 0 ? "Success" : libcStrerror(errno)
}
