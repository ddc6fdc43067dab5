// `xfrmd --metrics HOST:PORT`: the daemon's counters in the Prometheus text format, through swift-prometheus.
// Collected at each scrape: the 32 /proc/net/xfrm_stat counters, per-SA packets, bytes and drops, the data path's
// counters and the packet pool's free slots. Served on its own thread, one short HTTP/1.1 exchange per connection
// (GET /metrics), so a slow scraper never touches the data path or the control socket.

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Logging
import Prometheus
import Synchronization
import XFRMCore
import XFRMESP
import XFRMSimulatedNIC

public final class MetricsServer: @unchecked Sendable {
    private let registry = PrometheusCollectorRegistry()
    private let stack: XFRMStack
    private let datapath: Datapath?
    private let logger: Logger
    private let listenFD: Int32
    private let stopping = Atomic<Bool>(false)
    private var thread: pthread_t? = nil
    /// Mirrors of monotonic values: the value last exported, so each scrape adds the difference.
    private var statCounters: [(XfrmStatCounter, Counter, UInt64)] = []
    private var pathCounters: [(String, Counter, UInt64)] = []
    /// Per-SA gauges, by (destination, SPI, protocol); unregistered when the SA goes.
    private var saGauges: [String: [Gauge]] = [:]
    private let poolFree: Gauge
    private var workerDepth: [Gauge] = []
    /// The simulated NIC's device counters (`--offload`), as ethtool -S would show them.
    private var deviceCounters: [(NICCounter, Counter, UInt64)] = []
    private let sadCount: Gauge
    private let spdCount: Gauge

    /// Listens on `address` ("HOST:PORT", IPv4 or [IPv6]:PORT).
    public init(address: String, stack: XFRMStack, datapath: Datapath?, logger: Logger) throws(SocketError) {
        self.stack = stack
        self.datapath = datapath
        self.logger = logger
        guard let (host, port) = Self.split(address) else {
            throw SocketError("--metrics takes HOST:PORT, got \"\(address)\"", errno: EINVAL)
        }
        let v6 = host.contains(":")
        let fd = socket(v6 ? AF_INET6 : AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var one: Int32 = 1
        _ = setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var ok: Int32 = -1
        if v6 {
            var a = sockaddr_in6()
            a.sin6_family = sa_family_t(AF_INET6)
            a.sin6_port = port.bigEndian
            if inet_pton(AF_INET6, host, &a.sin6_addr) == 1 {
                ok = withUnsafePointer(to: &a) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in6>.size)) }
                }
            }
        } else {
            var a = sockaddr_in()
            a.sin_family = sa_family_t(AF_INET)
            a.sin_port = port.bigEndian
            if inet_pton(AF_INET, host, &a.sin_addr) == 1 {
                ok = withUnsafePointer(to: &a) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
                }
            }
        }
        guard fd >= 0, ok == 0, listen(fd, 16) == 0 else {
            let e = errno
            if fd >= 0 { close(fd) }
            throw SocketError("cannot serve metrics on \(address)", errno: e)
        }
        self.listenFD = fd
        for c in XfrmStatCounter.allCases {
            let counter = self.registry.makeCounter(
                name: "xfrm_stat_total", labels: [("counter", c.name)],
                help: "The kernel's /proc/net/xfrm_stat counters, as the daemon's stack counts them")
            self.statCounters.append((c, counter, 0))
        }
        for name in ["tun_read", "tun_written", "tun_no_policy", "tun_unreachable", "wire_sent", "wire_received", "ike_dropped",
                     "send_errors", "no_buffer", "not_esp", "truncated", "ring_full", "tun_bad",
                     "tun_superpackets", "tun_coalesced", "ike_relayed", "ike_replies", "ike_relay_errors",
                     "tun_udp_superpackets", "tun_udp_coalesced", "udp_gso_sends", "udp_gso_segments",
                     "udp_gso_fallbacks", "udp_gro_receives", "udp_gro_segments", "delivered", "not_decapsulated",
                     "unframed", "natt_keepalives", "tfc_dummies", "fragmented", "fragments_created",
                     "fragment_failed"] {
            let counter = self.registry.makeCounter(
                name: "xfrmd_datapath_packets_total", labels: [("event", name)],
                help: "Packets the data path read, wrote or dropped, by what happened to them")
            self.pathCounters.append((name, counter, 0))
        }
        self.poolFree = self.registry.makeGauge(name: "xfrmd_packet_pool_free", help: "Free packet buffers")
        if let nic = datapath?.nic {
            for c in NICCounter.allCases {
                let counter = self.registry.makeCounter(
                    name: "xfrmd_device_total", labels: [("device", nic.name), ("counter", c.name)],
                    help: "The simulated NIC's counters (packets, bytes, offloaded ESP, drops by reason)")
                self.deviceCounters.append((c, counter, 0))
            }
        }
        for w in 0..<(datapath?.workerCount ?? 0) {
            self.workerDepth.append(self.registry.makeGauge(
                name: "xfrmd_worker_queue_depth", labels: [("worker", "\(w)")],
                help: "Packets waiting in each worker's ring"))
        }
        self.sadCount = self.registry.makeGauge(name: "xfrm_sad_states", help: "SAs in the SAD")
        self.spdCount = self.registry.makeGauge(name: "xfrm_spd_policies", help: "Policies in the SPD")
    }

    deinit { close(self.listenFD) }

    public func start() {
        let context = Unmanaged.passRetained(self).toOpaque()
        var id = pthread_t()
        let rc = pthread_create(&id, nil, { arg in
            let server = Unmanaged<MetricsServer>.fromOpaque(arg!).takeRetainedValue()
            server.serve()
            return nil
        }, context)
        if rc == 0 { self.thread = id } else { Unmanaged<MetricsServer>.fromOpaque(context).release() }
    }

    public func stop() {
        self.stopping.store(true, ordering: .relaxed)
        if let id = self.thread { pthread_join(id, nil) }
        self.thread = nil
    }

    private func serve() {
        while !self.stopping.load(ordering: .relaxed) {
            var p = pollfd(fd: self.listenFD, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, 200) > 0 else { continue }
            let client = accept(self.listenFD, nil, nil)
            guard client >= 0 else { continue }
            var timeout = timeval(tv_sec: 2, tv_usec: 0)
            _ = setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            _ = setsockopt(client, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            self.answer(client)
            close(client)
        }
    }

    private func answer(_ fd: Int32) {
        var request: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1024)
        while request.count < 8192 && !request.suffixMatches("\r\n\r\n") {
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            guard n > 0 else { break }
            request += chunk[0..<n]
        }
        let line = String(decoding: request.prefix { $0 != 13 && $0 != 10 }, as: UTF8.self)
        let parts = line.split(separator: " ")
        let response: [UInt8]
        if parts.count >= 2 && parts[0] == "GET" && (parts[1] == "/metrics" || parts[1] == "/") {
            self.collect()
            let body = self.registry.emitToBuffer()
            response = Array("HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: \(body.count)\r\nConnection: close\r\n\r\n".utf8) + body
        } else {
            let body = Array("only GET /metrics is served\n".utf8)
            response = Array("HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: \(body.count)\r\nConnection: close\r\n\r\n".utf8) + body
        }
        var sent = 0
        while sent < response.count {
            let n = response.withUnsafeBytes { send(fd, $0.baseAddress! + sent, $0.count - sent, Int32(MSG_NOSIGNAL)) }
            guard n > 0 else { return }
            sent += n
        }
    }

    /// Brings every metric up to date (scrape time).
    private func collect() {
        self.stack.syncDeviceStats()
        for i in self.statCounters.indices {
            let (c, counter, last) = self.statCounters[i]
            let now = self.stack.statistics[c]
            if now > last { counter.increment(by: Int64(now - last)) }
            self.statCounters[i].2 = now
        }
        if let d = self.datapath {
            var values = d.counters.snapshot
            // Consumed by the stack and counted by reason only (not errors, so not in xfrm_stat).
            values["natt_keepalives"] = self.stack.statistics.drops[.nattKeepalive]
            values["tfc_dummies"] = self.stack.statistics.drops[.tfcDummy]
            for i in self.pathCounters.indices {
                let (name, counter, last) = self.pathCounters[i]
                let now = values[name] ?? 0
                if now > last { counter.increment(by: Int64(now - last)) }
                self.pathCounters[i].2 = now
            }
            self.poolFree.set(Double(d.poolFree))
            if let nic = d.nic {
                for i in self.deviceCounters.indices {
                    let (c, counter, last) = self.deviceCounters[i]
                    let now = nic.counter(c)
                    if now > last { counter.increment(by: Int64(now - last)) }
                    self.deviceCounters[i].2 = now
                }
            }
            for (w, depth) in d.workerDepths.enumerated() where w < self.workerDepth.count {
                self.workerDepth[w].set(Double(depth))
            }
        }
        let states = self.stack.states.list()
        self.sadCount.set(Double(states.count))
        self.spdCount.set(Double(self.stack.policies.totalCount))
        var seen = Set<String>()
        for sa in states where sa.state != .acquiring {
            let key = "\(sa.id.destination)/\(sa.id.spi)/\(sa.id.proto)"
            seen.insert(key)
            let gauges: [Gauge]
            if let g = self.saGauges[key] {
                gauges = g
            } else {
                let labels = [("dst", "\(sa.id.destination)"), ("spi", "0x" + String(sa.id.spi, radix: 16)),
                              ("src", "\(sa.config.source)")]
                gauges = [
                    self.registry.makeGauge(name: "xfrm_sa_packets", labels: labels, help: "Packets through the SA"),
                    self.registry.makeGauge(name: "xfrm_sa_bytes", labels: labels, help: "Bytes through the SA"),
                    self.registry.makeGauge(name: "xfrm_sa_replay_drops", labels: labels,
                                            help: "Replayed packets dropped on the SA"),
                    self.registry.makeGauge(name: "xfrm_sa_replay_window_drops", labels: labels,
                                            help: "Packets left of the replay window dropped on the SA"),
                    self.registry.makeGauge(name: "xfrm_sa_integrity_failures", labels: labels,
                                            help: "Packets whose ICV did not verify on the SA"),
                ]
                self.saGauges[key] = gauges
            }
            let cur = sa.current
            let st = sa.stats
            gauges[0].set(Double(cur.packets))
            gauges[1].set(Double(cur.bytes))
            gauges[2].set(Double(st.replay))
            gauges[3].set(Double(st.replayWindow))
            gauges[4].set(Double(st.failed))
        }
        for (key, gauges) in self.saGauges where !seen.contains(key) {
            for g in gauges { self.registry.unregisterGauge(g) }
            self.saGauges[key] = nil
        }
    }

    private static func split(_ address: String) -> (String, UInt16)? {
        guard let colon = address.lastIndex(of: ":"), let port = UInt16(address[address.index(after: colon)...])
        else { return nil }
        var host = String(address[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        return (host, port)
    }
}

extension Array where Element == UInt8 {
    fileprivate func suffixMatches(_ s: String) -> Bool {
        let tail = Array(s.utf8)
        return self.count >= tail.count && Array(self.suffix(tail.count)) == tail
    }
}
