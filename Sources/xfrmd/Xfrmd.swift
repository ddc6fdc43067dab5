// xfrmd: the swift-xfrm daemon. One XFRM stack — SAD, SPD, lifetimes, events — behind an XFRM-netlink control
// socket that `xfrm -S PATH` (and any XFRM netlink client speaking over a Unix socket) uses, and a data path
// between a TUN device (the inner side, with TSO/GRO offloads) and raw ESP / ESP-in-UDP sockets (the outer side,
// IPv4 and IPv6, marked so that a routing rule keeps them out of the TUN), on the engine's threads (--workers).

import ArgumentParser
import Logging
import Synchronization
import XFRMControl
import XFRMCore
import XFRMCrypto
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

    @Option(help: "The TUN device of the inner side (created if absent).")
    var tun = "xfrm0"

    @Option(name: .customLong("udp-port"), help: "The ESP-in-UDP (NAT-T, RFC 3948) port.")
    var udpPort: UInt16 = 4500

    @Option(name: .customLong("ike-port"), help: ArgumentHelp(
        "Relay IKE from the NAT-T port to a key manager on 127.0.0.1:PORT (and its replies back); default: count and drop.",
        valueName: "PORT"))
    var ikePort: UInt16? = nil

    @Flag(name: .customLong("no-raw-esp"), help: "Do not open the raw ESP (IP protocol 50) socket.")
    var noRawESP = false

    @Flag(name: .customLong("no-tun-offload"),
          help: "Open the TUN without IFF_VNET_HDR and TSO/GRO (one inner packet per read and write).")
    var noTunOffload = false

    @Option(name: .customLong("outer-mtu"), help: ArgumentHelp(
        "The MTU of the outer path: a protected IPv4 packet without DF that is larger leaves as IPv4 fragments, one with DF (or IPv6) is answered with ICMP.",
        valueName: "BYTES"))
    var outerMTU: Int = 1500

    @Option(help: "Worker threads of the data path (default: one per core).")
    var workers: Int? = nil

    @Option(name: .customLong("if-id"), help: ArgumentHelp(
        "Make the TUN an XFRM interface with this if_id (as `ip link add ... type xfrm if_id N`): what is routed into it "
            + "is protected only by policies and SAs with that if_id (route-based VPNs, strongSwan's if_id_in/if_id_out); "
            + "0: an ordinary interface.",
        valueName: "ID"))
    var ifID: UInt32 = 0

    @Option(help: ArgumentHelp(
        "The mark (SO_MARK) on the daemon's outer sockets, for a routing rule that keeps its ESP out of the TUN; 0: none.",
        valueName: "MARK"))
    var mark: String = "0x5846"

    @Option(help: ArgumentHelp(
        "Put a simulated NIC with this offload (crypto, packet or both) between the stack and the outer sockets.",
        valueName: "MODE"))
    var offload: String? = nil

    @Option(name: .customLong("offload-dev"), help: ArgumentHelp(
        "The kernel interface the simulated NIC stands for (it takes its name and index; default: the TUN's), so that "
            + "a key manager finding the interface of its outer address asks for offload on it (xfrm-bridge answers "
            + "its ethtool query: esp-hw-offload).",
        valueName: "IFNAME"))
    var offloadDev: String? = nil

    @Flag(name: .customLong("offload-promote"), help: ArgumentHelp(
        "Serve crypto-offload requests on the NIC in packet mode, and offload every IPsec policy to it (for key "
            + "managers that ask for crypto offload only, such as strongSwan 5.9.8). Needs --offload packet or both."))
    var offloadPromote = false

    @Option(help: ArgumentHelp(
        "The ESP crypto backend: openssl or ipsec-mb (default: ipsec-mb where the CPU runs it, else openssl; or XFRM_CRYPTO).",
        valueName: "BACKEND"))
    var crypto: String? = nil

    @Flag(name: .customLong("share-natt-port"), help: ArgumentHelp(
        "Share the NAT-T port with a key manager started through xfrm-bridge --share-natt-port: IKE (zero non-ESP "
            + "marker) goes to its socket, ESP to the daemon's (SO_REUSEPORT and a steering program)."))
    var shareNATTPort = false

    @Flag(name: .customLong("route-policies"), help: ArgumentHelp(
        "Keep a kernel route into the TUN for the destination of every OUT policy (for a key manager that installs "
            + "policies only, such as strongSwan with install_routes = no)."))
    var routePolicies = false

    @Option(help: "Serve Prometheus metrics at HOST:PORT (GET /metrics).")
    var metrics: String? = nil

    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error or critical.")
    var logLevel = "info"

    var markValue: UInt32? {
        self.mark.hasPrefix("0x") ? UInt32(self.mark.dropFirst(2), radix: 16) : UInt32(self.mark)
    }

    func validate() throws {
        if let w = self.workers, w < 1 || w > 64 { throw ValidationError("--workers must be between 1 and 64") }
        // IPv6 links carry 1,280 bytes at least; a packet larger than the daemon's receive room cannot come back.
        if self.outerMTU < 1280 || self.outerMTU > OuterSocketLimits.largestDatagram {
            throw ValidationError("--outer-mtu must be between 1280 and \(OuterSocketLimits.largestDatagram) bytes")
        }
        if self.shareNATTPort && self.ikePort != nil {
            throw ValidationError("--share-natt-port and --ike-port are two ways to hand IKE over: choose one")
        }
        guard self.markValue != nil else { throw ValidationError("--mark must be a 32-bit number (decimal or 0x hex)") }
        if let o = self.offload, DaemonOffload(rawValue: o) == nil {
            throw ValidationError("--offload must be crypto, packet or both")
        }
        if self.offloadDev != nil && self.offload == nil {
            throw ValidationError("--offload-dev names the interface of the simulated NIC: it needs --offload")
        }
        if self.offloadPromote && ![DaemonOffload.packet, .both].contains(self.offload.flatMap(DaemonOffload.init)) {
            throw ValidationError("--offload-promote serves requests in packet mode: it needs --offload packet or both")
        }
        if let c = self.crypto, CryptoBackends.named(c) == nil {
            throw ValidationError(CryptoBackends.names.contains(c)
                ? "--crypto \(c): this CPU cannot run it (\(IPsecMBBackend.description))"
                : "--crypto must be one of \(CryptoBackends.names.joined(separator: ", "))")
        }
        guard Logger.Level(rawValue: self.logLevel) != nil else {
            throw ValidationError("--log-level must be one of trace, debug, info, notice, warning, error, critical")
        }
    }

    func run() throws {
        LoggingSystem.bootstrap(StreamLogHandler.standardError)
        var logger = Logger(label: "xfrmd")
        logger.logLevel = Logger.Level(rawValue: self.logLevel) ?? .info
        signal(SIGINT) { _ in stopRequested.store(true, ordering: .relaxed) }
        signal(SIGTERM) { _ in stopRequested.store(true, ordering: .relaxed) }
        signal(SIGPIPE, SIG_IGN)
        func refuse(_ error: SocketError) -> ExitCode {
            // One clear line, then a failing exit status.
            var err = FileHandleStream.standardError
            print("xfrmd: \(error.description)", to: &err)
            return ExitCode(1)
        }
        let backend = self.crypto.flatMap(CryptoBackends.named) ?? CryptoBackends.preferred
        let stack = XFRMStack(backend: backend)
        // In this order: nothing is touched while another daemon answers; the control socket comes last, so a
        // client that can connect finds the data path (and its TUN device) ready.
        let datapath: Datapath
        var metricsServer: MetricsServer? = nil
        let control: ControlSocketServer
        var routes: PolicyRoutes? = nil
        do throws(SocketError) {
            try ControlSocketServer.refuseIfLive(self.socket)
            let cores = Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
            datapath = try Datapath(stack: stack, tunName: self.tun, udpPort: self.udpPort, rawESP: !self.noRawESP,
                                    workers: self.workers ?? max(1, cores), mark: self.markValue ?? 0,
                                    offload: self.offload.flatMap(DaemonOffload.init(rawValue:)),
                                    offloadDevice: self.offloadDev, tunOffload: !self.noTunOffload, ikePort: self.ikePort,
                                    shareUDPPort: self.shareNATTPort, outerMTU: self.outerMTU, ifID: self.ifID,
                                    logger: logger)
            if let address = self.metrics {
                metricsServer = try MetricsServer(address: address, stack: stack, datapath: datapath, logger: logger)
            }
            if self.routePolicies {
                routes = try PolicyRoutes(stack: stack, tunName: datapath.tunName, ifID: self.ifID, logger: logger)
            }
            control = try ControlSocketServer(path: self.socket, stack: stack,
                                              packetOffloadPromotion: self.offloadPromote ? datapath.nic?.ifindex : nil,
                                              logger: logger)
        } catch {
            throw refuse(error)
        }
        datapath.start()
        routes?.start()
        metricsServer?.start()
        logger.info("listening", metadata: ["socket": "\(self.socket)", "tun": "\(datapath.tunName)",
                                            "udp-port": "\(self.udpPort)", "raw-esp": "\(!self.noRawESP)",
                                            "workers": "\(datapath.workerCount)", "mark": "\(self.mark)",
                                            "offload": "\(self.offload ?? "none")",
                                            "outer": "\(datapath.outerName)", "crypto": "\(backend.name)",
                                            "tun-offload": "\(datapath.tunOffload)", "if-id": "\(self.ifID)"])
        let served = control.run { stopRequested.load(ordering: .relaxed) || datapath.failed.load(ordering: .relaxed) }
        metricsServer?.stop()
        routes?.stop()
        datapath.stop()
        let c = datapath.counters.snapshot
        logger.info("data path", metadata: [
            "tun-read": "\(c["tun_read"] ?? 0)", "tun-written": "\(c["tun_written"] ?? 0)",
            "tun-no-policy": "\(c["tun_no_policy"] ?? 0)", "wire-sent": "\(c["wire_sent"] ?? 0)",
            "wire-received": "\(c["wire_received"] ?? 0)", "not-esp": "\(c["not_esp"] ?? 0)",
            "ike-dropped": "\(c["ike_dropped"] ?? 0)", "send-errors": "\(c["send_errors"] ?? 0)"])
        // Leave nothing behind: every SA (and so every key) goes, the socket file too; the TUN closes with us.
        stack.flushStates(proto: 0)
        stack.flushPolicies()
        control.shutdown()
        if !served || datapath.failed.load(ordering: .relaxed) {
            logger.error("stopped on an error")
            throw ExitCode(1)
        }
        logger.info("stopped")
    }
}

/// stderr as a TextOutputStream.
struct FileHandleStream: TextOutputStream {
    static var standardError: FileHandleStream { FileHandleStream() }
    mutating func write(_ string: String) { _ = string.withCString { Glibc.write(2, $0, strlen($0)) } }
}
