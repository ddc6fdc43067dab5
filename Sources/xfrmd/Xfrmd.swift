// xfrmd: the swift-xfrm daemon. This stage serves the control plane: the SAD, SPD, lifetimes and events of one
// XFRM stack behind an XFRM-netlink control socket that `xfrm -S PATH` (and any XFRM netlink client speaking
// over a Unix socket) uses. The data path (TUN, ESP and ESP-in-UDP sockets) is the next stage.

import ArgumentParser
import Logging
import Synchronization
import XFRMControl
import XFRMCore
import XFRMDaemon

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Set by SIGINT/SIGTERM; the serve loop checks it every tick.
let stopRequested = Atomic<Bool>(false)

@main
struct Xfrmd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "xfrmd",
        abstract: "The swift-xfrm daemon: an XFRM stack behind an XFRM-netlink control socket.")

    @Option(help: "The control socket (a Unix SOCK_SEQPACKET socket, mode 0600).")
    var socket = "/run/xfrmd.sock"

    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error or critical.")
    var logLevel = "info"

    func validate() throws {
        guard Logger.Level(rawValue: self.logLevel) != nil else {
            throw ValidationError("--log-level must be one of trace, debug, info, notice, warning, error, critical")
        }
    }

    func run() throws {
        LoggingSystem.bootstrap(StreamLogHandler.standardError)
        var logger = Logger(label: "xfrmd")
        logger.logLevel = Logger.Level(rawValue: self.logLevel) ?? .info
        let stack = XFRMStack()
        let control: ControlSocketServer
        do throws(SocketError) {
            control = try ControlSocketServer(path: self.socket, stack: stack, logger: logger)
        } catch {
            // One clear line, then a failing exit status.
            var err = FileHandleStream.standardError
            print("xfrmd: \(error.description)", to: &err)
            throw ExitCode(1)
        }
        signal(SIGINT) { _ in stopRequested.store(true, ordering: .relaxed) }
        signal(SIGTERM) { _ in stopRequested.store(true, ordering: .relaxed) }
        signal(SIGPIPE, SIG_IGN)
        logger.info("listening", metadata: ["socket": "\(self.socket)"])
        control.run { stopRequested.load(ordering: .relaxed) }
        // Leave nothing behind: every SA (and so every key) goes, the socket file too.
        stack.flushStates(proto: 0)
        stack.flushPolicies()
        control.shutdown()
        logger.info("stopped")
    }
}

/// stderr as a TextOutputStream.
struct FileHandleStream: TextOutputStream {
    static var standardError: FileHandleStream { FileHandleStream() }
    mutating func write(_ string: String) { _ = string.withCString { Glibc.write(2, $0, strlen($0)) } }
}
