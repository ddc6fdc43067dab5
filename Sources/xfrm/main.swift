// xfrm: the `ip xfrm` command for swift-xfrm, against one of three XFRM stacks:
//
//   xfrm [-s] [-S PATH] COMMAND...  |  -batch FILE            the xfrmd daemon (default; -S or XFRMD_SOCKET pick
//                                                           the socket, /run/xfrmd.sock otherwise)
//   xfrm [-s] --offline -batch FILE | COMMAND...              a fresh in-process stack with a simulated network:
//                                                           state, policy, link, addr, route, monitor, clock
//                                                           advance N, stat (as `ip -batch`)
//   xfrm [-s] --kernel { state | policy | monitor } ...       the Linux kernel's XFRM over NETLINK_XFRM
//   xfrm [-s] pcap --batch SETUP [--then AFTER] (--output-path | --input-path [--dev NAME]) IN.pcap OUT.pcap
//   xfrm demo                                               two simulated hosts, every offload mode, no root
// `pcap` and `demo` always run offline.

import Foundation
import XFRMCommandLine
import XFRMDaemon
import XFRMKernel
import XFRMOffline
import XFRMWire

func fail(_ message: String) -> Never {
    FileHandle.standardError.write((message + "\n").data(using: .utf8)!)
    exit(1)
}

var args = Array(CommandLine.arguments.dropFirst())
var options = XfrmCLIOptions()
var batch: String? = nil
var kernel = false
var offline = false
var socketPath: String? = nil
while let a = args.first, a.hasPrefix("-") {
    args.removeFirst()
    switch a {
    case "-s", "-stats", "-statistics", "--stats": options.stats += 1
    case "--offline", "-offline": offline = true
    case "-S", "--socket":
        guard let p = args.first else { fail("Option \"\(a)\" requires an argument") }
        socketPath = p
        args.removeFirst()
    case "--kernel", "-kernel": kernel = true
    case "-b", "-batch", "--batch":
        guard let f = args.first else { fail("Option \"\(a)\" requires an argument") }
        batch = f
        args.removeFirst()
    case "-h", "-help", "--help":
        print("""
            Usage: xfrm [ -s ] [ -S PATH ] { -batch FILE | { state | policy | monitor } COMMAND... }   (xfrmd)
                   xfrm [ -s ] --offline { -batch FILE | OBJECT COMMAND... }   (an in-process stack)
                   xfrm [ -s ] --kernel { state | policy | monitor } ...   (the Linux kernel, over NETLINK_XFRM)
                   xfrm [ -s ] pcap --batch SETUP [ --then AFTER ] { --output-path | --input-path [ --dev NAME ] } IN.pcap OUT.pcap
            where  OBJECT := { state | policy | monitor | stat | link | addr | route | clock }
            """)
        exit(0)
    default: fail("Option \"\(a)\" is unknown, try \"xfrm -help\".")
    }
}

if kernel {
    guard batch == nil else { fail("Error: -batch runs against the offline stack; --kernel takes one command.") }
    args = OfflineSession.command(args)
    let transport: KernelXfrmTransport
    do throws(KernelNetlinkError) {
        transport = try KernelXfrmTransport()
    } catch {
        fail(error.description)
    }
    if let object = args.first, "monitor".hasPrefix(object) {
        // `ip xfrm monitor [all]`: every XFRM event the kernel multicasts, until interrupted.
        do throws(KernelNetlinkError) {
            try transport.monitor { m in
                // Written straight to the descriptor: each event is visible at once, also through a pipe.
                FileHandle.standardOutput.write(Data(
                    formatMonitorEvent(m, options: options, interfaces: KernelInterfaceNames()).utf8))
                return true
            }
        } catch {
            fail(error.description)
        }
        exit(0)
    }
    do throws(CommandError) {
        print(try runXfrmCommand(args, options: options, transport: transport, interfaces: KernelInterfaceNames()),
              terminator: "")
        exit(0)
    } catch {
        print(error.output, terminator: "")  // what a listing printed before its dump failed
        FileHandle.standardError.write((error.description + "\n").data(using: .utf8)!)
        exit(error.exitStatus)
    }
}

/// `xfrm [-S PATH]` without --offline or --kernel: the daemon. Only XFRM objects go there (the simulated network
/// and clock exist offline only).
if !offline && args.first != "pcap" && args.first != "demo" {
    let path = socketPath ?? ProcessInfo.processInfo.environment["XFRMD_SOCKET"] ?? "/run/xfrmd.sock"
    let transport: DaemonTransport
    do throws(SocketError) {
        transport = try DaemonTransport(path: path)
    } catch {
        fail("xfrm: \(error.description)")
    }
    func runOne(_ words: [String]) throws(CommandError) -> String {
        guard let object = words.first, ["state", "sa", "policy"].contains(where: { $0.hasPrefix(object) }) else {
            throw CommandError("Error: \"\(words.first ?? "")\" runs against the offline stack only (xfrm --offline).",
                               exitStatus: 1)
        }
        // Device names are the host's: the daemon's outer interface carries its TUN device's name and index.
        return try runXfrmCommand(words, options: options, transport: transport, interfaces: KernelInterfaceNames())
    }
    do throws(CommandError) {
        if let batch {
            guard args.isEmpty else { fail("Error: -batch takes no command arguments.") }
            guard let data = FileManager.default.contents(atPath: batch) else {
                fail("Cannot open file \"\(batch)\" for reading: No such file or directory")
            }
            let (commands, missing) = BatchReader.commands(String(decoding: data, as: UTF8.self))
            for c in commands {
                let words: [String]
                do throws(BatchSyntaxError) {
                    words = OfflineSession.command(try BatchReader.words(c.text))
                } catch {
                    fail(error.description)
                }
                if words.isEmpty { continue }
                print(try runOne(words), terminator: "")
            }
            if missing { FileHandle.standardError.write(Data("Missing continuation line\n".utf8)) }
        } else if let object = OfflineSession.command(args).first, "monitor".hasPrefix(object), object.count >= 2 {
            let ok = transport.monitor { m in
                if case .error(let errno, _) = m.body, errno == -105 {
                    // Events were lost (the daemon's ENOBUFS), as ip xfrm monitor reports an overrun.
                    FileHandle.standardError.write(Data("netlink receive error No buffer space available (105)\n".utf8))
                    return true
                }
                FileHandle.standardOutput.write(Data(
                    formatMonitorEvent(m, options: options, interfaces: KernelInterfaceNames()).utf8))
                return true
            }
            if !ok { fail("xfrm: the daemon at \(path) went away") }
        } else if !args.isEmpty {
            print(try runOne(OfflineSession.command(args)), terminator: "")
        } else {
            fail("Usage: xfrm [ -s ] [ -S PATH ] { -batch FILE | OBJECT COMMAND... }; try \"xfrm -help\".")
        }
        exit(0)
    } catch {
        print(error.output, terminator: "")  // what a listing printed before its dump failed
        FileHandle.standardError.write((error.description + "\n").data(using: .utf8)!)
        exit(error.exitStatus)
    }
}

if args.first == "demo" {
    // The command links no benchmark code: the four-mode table is xfrm-bench's (the demo says where).
    let ok = Demo.run(fourModeTable: {
        "The table is a benchmark, not a demo step: run `swift run -c release xfrm-bench modes` (add --svg PATH for\n"
            + "a chart). It measures the same traffic between two simulated hosts in all four modes.\n"
    })
    exit(ok ? 0 : 1)
}

let session = OfflineSession(options: options)
/// Runs a batch file; its warnings (a missing continuation line) go to stderr, as iproute2 prints them.
@MainActor func runBatch(_ path: String) throws(SessionError) -> String {
    let out = try session.runBatch(path: path)
    for w in session.warnings { FileHandle.standardError.write(Data((w + "\n").utf8)) }
    session.warnings.removeAll()
    return out
}
do throws(SessionError) {
    if let batch {
        guard args.isEmpty else { fail("Error: -batch takes no command arguments.") }
        print(try runBatch(batch), terminator: "")
    } else if args.first == "pcap" {
        args.removeFirst()
        var setup: String? = nil
        var then: String? = nil
        var path: PcapPath? = nil
        var device: String? = nil
        var files: [String] = []
        while let a = args.first {
            args.removeFirst()
            switch a {
            case "--batch", "-batch": setup = args.isEmpty ? nil : args.removeFirst()
            case "--then": then = args.isEmpty ? nil : args.removeFirst()
            case "--output-path": path = .output
            case "--input-path": path = .input(device: nil)
            case "--dev": device = args.isEmpty ? nil : args.removeFirst()
            default:
                if a.hasPrefix("-") { fail("pcap: unknown option \"\(a)\"") }
                files.append(a)
            }
        }
        guard let setup else { fail("pcap: --batch SETUP is required") }
        guard var path else { fail("pcap: one of --output-path or --input-path is required") }
        guard files.count == 2 else { fail("pcap: expected IN.pcap OUT.pcap") }
        if case .input = path { path = .input(device: device) } else if device != nil {
            fail("pcap: --dev applies to --input-path only")
        }
        print(try runBatch(setup), terminator: "")
        print(try session.runPcap(path: path, inPath: files[0], outPath: files[1]), terminator: "")
        if let then { print(try runBatch(then), terminator: "") }
    } else if !args.isEmpty {
        print(try session.run(OfflineSession.command(args)), terminator: "")
    } else {
        fail("Usage: xfrm [ -s ] { -batch FILE | OBJECT COMMAND... }; try \"xfrm -help\".")
    }
} catch {
    FileHandle.standardError.write((error.description + "\n").data(using: .utf8)!)
    exit(error.exitStatus)
}
