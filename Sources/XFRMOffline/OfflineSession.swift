// An in-process stack driven by `xfrm` command lines (`xfrm --offline`, `xfrm -batch FILE`, `xfrm pcap`): the
// command layer talks to it through XfrmControlServer in XFRM netlink messages, exactly as it will talk to a daemon
// or the kernel. The clock is simulated: `clock advance SECONDS` moves it and runs the lifetime timers.

import Foundation
import XFRMCommandLine
import XFRMControl
import XFRMCore
import XFRMESP
import XFRMPacket
import XFRMSimHost
import XFRMWire

/// An error in a batch line, worded for the user.
public struct SessionError: Error, CustomStringConvertible {
    public let description: String
    /// The process exit status.
    public let exitStatus: Int32
    /// True for `ip xfrm` errors: iproute2's xfrm code exits at once, so a batch ends without its
    /// "Command failed FILE:LINE" line.
    public let exitsAtOnce: Bool
    public init(_ d: String, exitStatus: Int32 = 1, exitsAtOnce: Bool = false) {
        self.description = d
        self.exitStatus = exitStatus
        self.exitsAtOnce = exitsAtOnce
    }
}

/// Resolves interface names for the command layer from the stack's network model.
final class NetworkNames: InterfaceNameResolver {
    let network: NetworkModel
    init(_ n: NetworkModel) { self.network = n }
    func ifindex(named: String) -> Int32? { self.network.interface(named: named)?.index }
    func name(ofIndex: Int32) -> String? { self.network.interface(index: ofIndex)?.name }
}

/// One offline stack plus the state of the command session around it (monitoring on/off, options).
public final class OfflineSession {
    public let clock = ManualClock()
    public let stack: XFRMStack
    /// The simulated host around the stack: packet pool, simulated NICs, capture of what leaves.
    public let host: SimHost
    public let server: XfrmControlServer
    public var options: XfrmCLIOptions
    private let names: NetworkNames
    private let subscription: EventBus.Subscription
    /// Messages for stderr that do not stop the session (e.g. a batch's missing continuation line).
    public var warnings: [String] = []
    /// Whether a `monitor` line switched event printing on.
    public private(set) var monitoring = false
    /// Other hosts whose simulated NICs `link add ... peer HOST:NAME` may join (the demo's two hosts).
    public var peers: [String: SimHost] = [:]

    public init(options: XfrmCLIOptions = XfrmCLIOptions()) {
        self.stack = XFRMStack(clock: self.clock)
        self.host = SimHost(stack: self.stack, poolSlots: 256, capture: true)
        self.server = XfrmControlServer(stack: self.stack)
        self.options = options
        self.names = NetworkNames(self.stack.network)
        // Not a key manager until `monitor` (a listener on the ACQUIRE group): before it, acquires leave no larval SA.
        self.subscription = self.stack.events.subscribe(capacity: 1 << 16, acquire: false)
    }

    /// Splits one command line into words as `ip -batch` does (quotes, `#` comments; see BatchReader) and
    /// normalizes them with `command(_:)`.
    public static func words(of line: String) throws(BatchSyntaxError) -> [String] {
        var words: [String] = []
        for c in BatchReader.commands(line).commands { words += try BatchReader.words(c.text) }
        return Self.command(words)
    }

    /// Drops a leading `xfrm`, `ip xfrm` or `ip`, keeping options such as `-s` in front (`ip -s xfrm state list`).
    public static func command(_ words: [String]) -> [String] {
        var out = words
        if out.first == "ip" { out.removeFirst() }
        var options: [String] = []
        while let o = out.first, o.hasPrefix("-") {
            options.append(o)
            out.removeFirst()
        }
        if out.first == "xfrm" { out.removeFirst() }
        return options + out
    }

    /// Runs one command (already split into words); returns its output.
    public func run(_ args: [String]) throws(SessionError) -> String {
        var args = args
        var extraStats = 0
        while let o = args.first, o.hasPrefix("-") {
            guard ["-s", "-stats", "-statistics"].contains(o) else {
                throw SessionError("Option \"\(o)\" is unknown, try \"xfrm -help\".")
            }
            extraStats += 1
            args.removeFirst()
        }
        if extraStats > 0 {
            let saved = self.options
            self.options.stats += extraStats
            defer { self.options = saved }
            return try self.run(args)
        }
        guard let head = args.first else { return "" }
        var out = ""
        switch head {
        case "policy" where args.count >= 2 && args[1] == "set" && args.contains("offload-priority"):
            // A stack setting (like a sysctl), not an XFRM netlink request.
            guard args.count == 4, args[2] == "offload-priority", ["strict", "default"].contains(args[3]) else {
                throw SessionError("Error: usage: policy set offload-priority { strict | default }")
            }
            self.stack.strictOffloadPriority.store(args[3] == "strict", ordering: .relaxed)
        case "state", "policy":
            do throws(CommandError) {
                out = try runXfrmCommand(args, options: self.options, transport: self.server, interfaces: self.names)
            } catch {
                out = self.drainEvents()
                throw SessionError(out + error.description, exitStatus: error.exitStatus, exitsAtOnce: true)
            }
        case "monitor":
            guard args.count == 1 || (args.count == 2 && args[1] == "all") else {
                throw SessionError("Error: monitor takes no arguments here (it prints the events of the lines that follow).")
            }
            self.monitoring = true
            self.subscription.listensForAcquire.store(true, ordering: .relaxed)
            _ = self.subscription.drain()
        case "stat", "stats":
            guard args.count == 1 else { throw SessionError("Error: \"stat\" takes no arguments.") }
            self.stack.syncDeviceStats()
            out = self.stack.statistics.procText()
        case "clock":
            guard args.count == 3, args[1] == "advance", let n = UInt64(args[2]) else {
                throw SessionError("Error: usage: clock advance SECONDS")
            }
            // One timer run per second, as the kernel's timers would have fired — or, when no timer is armed (time
            // alone cannot change anything), one run at the end.
            let everySecond = self.stack.timersArmed ? min(n, 86_400) : 0
            for _ in 0..<everySecond {
                self.clock.advance(by: 1)
                self.stack.runTimers()
            }
            if n > everySecond {
                self.clock.advance(by: n - everySecond)
                self.stack.runTimers()
            }
        case "link", "addr", "address", "route":
            out = try NetworkCommands.run(args, host: self.host, peers: self.peers, stats: self.options.stats > 0)
            self.host.settle()
        default:
            throw SessionError("Object \"\(head)\" is unknown, try \"xfrm help\".")
        }
        return out + self.drainEvents()
    }

    /// Prints (when monitoring) the events published since the last call, in `ip xfrm monitor` format.
    public func drainEvents() -> String {
        let (events, lost) = self.subscription.drainReportingLoss()
        guard self.monitoring else { return "" }
        // A monitor that could not keep up hears of it, as `ip xfrm monitor` does when its socket overruns.
        if lost > 0 { self.warnings.append("netlink receive error No buffer space available (105)") }
        var out = ""
        for e in events {
            if let m = self.server.message(for: e) {
                out += formatMonitorEvent(m, options: self.options, interfaces: self.names)
            } else if case .deviceFlushed(let ifindex, let states, let policies) = e {
                let name = self.names.name(ofIndex: ifindex) ?? "if\(ifindex)"
                out += "Device \(name) flushed: \(states.count) states, \(policies.count) policies\n"
            }
        }
        return out
    }

    /// Runs a batch file as `ip -batch` does: stops at the first failing command, reporting "Command failed
    /// FILE:LINE"; an unterminated quote stops the batch with "Unterminated quoted string"; a continuation with
    /// no next line stops reading ("Missing continuation line" on `warnings`) without running that command.
    public func runBatch(path: String) throws(SessionError) -> String {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw SessionError("Cannot open file \"\(path)\" for reading: No such file or directory")
        }
        return try self.runBatch(text: String(decoding: data, as: UTF8.self), name: path)
    }

    /// `runBatch(path:)` on a batch's text; `name` stands for the file in "Command failed NAME:LINE".
    public func runBatch(text: String, name path: String) throws(SessionError) -> String {
        var out = ""
        let (commands, missing) = BatchReader.commands(text)
        for c in commands {
            let words: [String]
            do throws(BatchSyntaxError) {
                words = Self.command(try BatchReader.words(c.text))
            } catch {
                throw SessionError(out + error.description)
            }
            if words.isEmpty { continue }
            do throws(SessionError) {
                out += try self.run(words)
            } catch where error.exitsAtOnce {
                throw SessionError(out + error.description, exitStatus: error.exitStatus, exitsAtOnce: true)
            } catch {
                throw SessionError(out + error.description + "\nCommand failed \(path):\(c.line)")
            }
        }
        if missing { self.warnings.append("Missing continuation line") }
        return out
    }
}
