import XFRMCore
import XFRMPacket
import XFRMSimHost
import XFRMSimulatedNIC

/// `link`, `addr` and `route` in `ip`'s grammar, against the stack's network model.
enum NetworkCommands {
    static func run(_ args: [String], host: SimHost, peers: [String: SimHost], stats: Bool) throws(SessionError)
        -> String
    {
        let network = host.stack.network
        do throws(NetworkError) {
            switch args[0] {
            case "link": return try self.link(Array(args.dropFirst()), host, peers: peers, stats: stats)
            case "route": return try self.route(Array(args.dropFirst()), network)
            default: return try self.addr(Array(args.dropFirst()), network)
            }
        } catch {
            throw SessionError(error.message)
        }
    }

    private static func mtu(_ s: String?) throws(NetworkError) -> Int {
        guard let s, let v = Int(s), v > 0 else { throw NetworkError(22, "Error: argument \"\(s ?? "")\" is wrong: Invalid \"mtu\" value") }
        return v
    }

    static func link(_ a: [String], _ host: SimHost, peers: [String: SimHost], stats: Bool) throws(NetworkError)
        -> String
    {
        let n = host.stack.network
        guard let verb = a.first else { return self.showLinks(host, name: nil, stats: stats) }
        switch verb {
        case "add":
            guard a.count >= 2 else { throw NetworkError(22, "Not enough information: \"dev\" argument is required.") }
            var name = a[1]
            var i = 2
            if name == "name" || name == "dev" {
                guard a.count >= 3 else { throw NetworkError(22, "Not enough information: \"dev\" argument is required.") }
                name = a[2]
                i = 3
            }
            var kind: String? = nil
            var mtu = 1500
            var capacity = 33
            var modes: Set<OffloadType> = [.crypto, .packet]
            var peer: SimulatedNIC? = nil
            var forward = false
            var algorithms = NICAlgorithms.all
            func value(_ what: String) throws(NetworkError) -> String {
                guard i + 1 < a.count else { throw NetworkError(22, "Error: argument of \"\(what)\" is missing.") }
                return a[i + 1]
            }
            while i < a.count {
                var step = 2
                switch a[i] {
                case "type": kind = try value("type")
                case "mtu": mtu = try self.mtu(i + 1 < a.count ? a[i + 1] : nil)
                case "sa-capacity" where kind == "simnic":
                    guard let c = Int(try value("sa-capacity")), c > 0, c <= 65536 else {
                        throw NetworkError(22, "Error: argument \"\(a[i + 1])\" is wrong: Invalid \"sa-capacity\" value")
                    }
                    capacity = c
                case "offload" where kind == "simnic":
                    switch try value("offload") {
                    case "crypto": modes = [.crypto]
                    case "packet": modes = [.packet]
                    case "both": modes = [.crypto, .packet]
                    default:
                        throw NetworkError(22, "Error: argument \"\(a[i + 1])\" is wrong: offload is crypto, packet or both")
                    }
                case "peer" where kind == "simnic":
                    // "peer NAME" on this host, or "peer HOST:NAME" on another simulated host of the session.
                    let spec = try value("peer")
                    let parts = spec.split(separator: ":", maxSplits: 1).map(String.init)
                    let other = parts.count == 2 ? peers[parts[0]] : host
                    guard let other, let last = parts.last, let nic = other.nic(named: last) else {
                        throw NetworkError(19, "Cannot find device \"\(spec)\"")
                    }
                    peer = nic
                case "algos" where kind == "simnic":
                    guard let parsed = NICAlgorithms(parsing: try value("algos")) else {
                        throw NetworkError(22, "Error: argument \"\(a[i + 1])\" is wrong: algos is a comma-separated "
                                           + "list of rfc4106-ICV, rfc7539esp-128, rfc4543-128 and cbc")
                    }
                    algorithms = parsed
                case "fwd-offload" where kind == "simnic":
                    forward = true
                    step = 1
                default:
                    throw NetworkError(22, "Error: either \"dev\" is duplicate, or \"\(a[i])\" is a garbage.")
                }
                i += step
            }
            guard let kind else { throw NetworkError(22, "Not enough information: \"type\" argument is required.") }
            switch kind {
            case "dummy":
                try n.addInterface(name: name, kind: kind, mtu: mtu)
            case "simnic":
                do throws(HostError) {
                    try host.addSimulatedNIC(name: name, mtu: mtu, saCapacity: capacity, modes: modes, peer: peer,
                                             supportsForwardPolicies: forward, algorithms: algorithms)
                } catch {
                    throw NetworkError(22, error.description)
                }
            default:
                throw NetworkError(95, "Error: Unknown device type \"\(kind)\".")
            }
            return ""
        case "set":
            guard a.count >= 3 else { throw NetworkError(22, "Not enough information: \"dev\" argument is required.") }
            var name = a[1]
            var i = 2
            if name == "dev" {
                name = a[2]
                i = 3
            }
            guard n.interface(named: name) != nil else { throw NetworkError(19, "Cannot find device \"\(name)\"") }
            var up: Bool? = nil
            var mtu: Int? = nil
            while i < a.count {
                switch a[i] {
                case "up": up = true; i += 1
                case "down": up = false; i += 1
                case "mtu": mtu = try self.mtu(i + 1 < a.count ? a[i + 1] : nil); i += 2
                default: throw NetworkError(22, "Error: either \"dev\" is duplicate, or \"\(a[i])\" is a garbage.")
                }
            }
            let (before, after) = try n.modify(name: name) { (i: inout Interface) throws(NetworkError) in
                if let mtu {
                    guard mtu >= 68 && mtu <= 65535 else { throw NetworkError(22, "Error: mtu greater than device maximum.") }
                    i.mtu = mtu
                }
                if let up { i.isUp = up }
            }
            if before.isUp && !after.isUp { host.stack.deviceDown(ifindex: after.index) }
            return ""
        case "fault":
            return try self.fault(a, host)
        case "del", "delete":
            guard a.count >= 2 else { throw NetworkError(22, "Not enough information: \"dev\" argument is required.") }
            let name = a[1] == "dev" && a.count >= 3 ? a[2] : a[1]
            if host.nic(named: name) != nil {
                do throws(HostError) { try host.removeNIC(name: name) } catch { throw NetworkError(19, error.description) }
            } else {
                try n.deleteInterface(name: name)
            }
            return ""
        case "show", "list", "ls":
            var name: String? = nil
            let rest = Array(a.dropFirst().filter { $0 != "-s" })
            if let first = rest.first { name = first == "dev" && rest.count >= 2 ? rest[1] : first }
            if let name, n.interface(named: name) == nil {
                throw NetworkError(19, "Device \"\(name)\" does not exist.")
            }
            return self.showLinks(host, name: name, stats: stats || a.contains("-s"))
        default:
            throw NetworkError(22, "Command \"\(verb)\" is unknown, try \"ip link help\".")
        }
    }

    static func showLinks(_ host: SimHost, name: String?, stats: Bool) -> String {
        let n = host.stack.network
        var out = ""
        for i in n.interfaces where name == nil || i.name == name {
            var flags: [String]
            if i.kind == "loopback" { flags = ["LOOPBACK"] } else { flags = ["BROADCAST", "NOARP"] }
            if i.isUp { flags += ["UP", "LOWER_UP"] }
            let state = i.isUp ? "UNKNOWN" : "DOWN"
            out += "\(i.index): \(i.name): <\(flags.joined(separator: ","))> mtu \(i.mtu) qdisc noqueue state \(state) mode DEFAULT group default qlen 1000\n"
            if i.kind == "loopback" {
                out += "    link/loopback 00:00:00:00:00:00 brd 00:00:00:00:00:00\n"
            } else {
                let mac = String(format: "02:00:00:00:%02x:%02x", (i.index >> 8) & 0xff, i.index & 0xff)
                out += "    link/ether \(mac) brd ff:ff:ff:ff:ff:ff\n"
            }
            if let nic = host.nic(ifindex: i.index) {
                out += "    simnic offload \(nic.supportedTypes.map(\.name).sorted().joined(separator: ","))"
                    + (nic.algorithms == .all ? "" : " algos \(nic.algorithms)") + "\n"
                if stats {
                    for line in nic.debugDescription.split(separator: "\n") { out += "    \(line)\n" }
                }
            }
        }
        return out
    }

    static func addr(_ a: [String], _ n: NetworkModel) throws(NetworkError) -> String {
        guard let verb = a.first, verb != "show" && verb != "list" else {
            var out = ""
            for i in n.interfaces {
                out += "\(i.index): \(i.name): mtu \(i.mtu) state \(i.isUp ? "UP" : "DOWN")\n"
                for p in i.addresses {
                    out += "    \(p.address.version == 4 ? "inet" : "inet6") \(p)\n"
                }
            }
            return out
        }
        guard verb == "add", a.count == 4, a[2] == "dev" else {
            throw NetworkError(22, "Error: usage: addr add ADDR/PLEN dev NAME")
        }
        guard let p = IPPrefix(a[1]) else { throw NetworkError(22, "Error: any valid prefix is expected rather than \"\(a[1])\".") }
        try n.addAddress(p, device: a[3])
        return ""
    }

    static func route(_ a: [String], _ n: NetworkModel) throws(NetworkError) -> String {
        guard let verb = a.first, verb != "show" && verb != "list" else {
            var out = ""
            for r in n.routes.sorted(by: { ($0.prefix.address.version, $1.prefix.length) < ($1.prefix.address.version, $0.prefix.length) }) {
                let dev = n.interface(index: r.ifindex)?.name ?? "?"
                let prefix = r.prefix.length == (r.prefix.address.version == 4 ? 32 : 128) ? "\(r.prefix.address)"
                    : (r.prefix.length == 0 ? "default" : "\(r.prefix)")
                if let via = r.via {
                    out += "\(prefix) via \(via) dev \(dev)\n"
                } else if let src = n.sourceAddress(ifindex: r.ifindex, version: r.prefix.address.version),
                    n.interface(index: r.ifindex)?.addresses.contains(where: { NetworkModel.network(of: $0) == r.prefix }) == true {
                    out += "\(prefix) dev \(dev) proto kernel scope link src \(src)\n"
                } else {
                    out += "\(prefix) dev \(dev) scope link\n"
                }
            }
            return out
        }
        guard verb == "add", a.count >= 4 else {
            throw NetworkError(22, "Error: usage: route add PREFIX dev NAME [via ADDR]")
        }
        let prefixText = a[1] == "default" ? "0.0.0.0/0" : a[1]
        guard let p = IPPrefix(prefixText) else { throw NetworkError(22, "Error: any valid prefix is expected rather than \"\(a[1])\".") }
        var dev: String? = nil
        var via: IPAddress? = nil
        var i = 2
        while i + 1 < a.count {
            switch a[i] {
            case "dev": dev = a[i + 1]
            case "via":
                guard let v = IPAddress(a[i + 1]) else { throw NetworkError(22, "Error: inet address is expected rather than \"\(a[i + 1])\".") }
                via = v
            default: throw NetworkError(22, "Error: either \"to\" is duplicate, or \"\(a[i])\" is a garbage.")
            }
            i += 2
        }
        guard i == a.count else { throw NetworkError(22, "Error: argument of \"\(a[i])\" is missing.") }
        guard let dev else { throw NetworkError(19, "Error: \"dev\" argument is required.") }
        try n.addRoute(p, device: dev, via: via)
        return ""
    }
}
