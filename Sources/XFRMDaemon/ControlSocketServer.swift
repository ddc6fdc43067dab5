// The daemon's control socket: XFRM netlink over a Unix SOCK_SEQPACKET socket (mode 0600; peers must be root or
// the daemon's own uid), answered by the same XfrmControlServer the offline `xfrm` uses.
//
// One thread, one poll loop (sequential by design: the control plane is not on the data path):
//   accept new clients → read each ready client's datagram → answer every netlink message in it (each checked
//   against xfrm_msg_min, malformed ones answered with an error, nothing half-applied) → send the stack's events
//   to the clients that joined their groups (never blocking: a client whose socket is full loses events and is
//   told with an ENOBUFS error message, as a netlink listener is) → run the lifetime timers once a second.

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Logging
import XFRMControl
import XFRMCore
import XFRMWire

public final class ControlSocketServer {
    private struct Client {
        var fd: Int32
        var uid: UInt32
        var pid: Int32
        /// XFRMNLGRP_* bitmask (bit g − 1 for group g).
        var groups: UInt32 = 0
        /// Events were dropped since the last one delivered: tell the client first.
        var lost = false
        /// Reply datagrams its socket had no room for yet, oldest first, and their bytes. While any wait, the
        /// client's requests are not read (it is answered in order, and a client that never reads stalls only
        /// itself); past `maximumQueued` it is dropped.
        var queue: [[UInt8]] = []
        var queued = 0
    }

    /// The most reply bytes a client may leave unread before it is dropped (a dump of ~30,000 SAs).
    static let maximumQueued = 16 << 20

    public let path: String
    private let stack: XFRMStack
    private let server: XfrmControlServer
    private let logger: Logger
    private let listenFD: Int32
    private var clients: [Int32: Client] = [:]
    private let events: EventBus.Subscription
    private var buffer = [UInt8](repeating: 0, count: ControlProtocol.maximumDatagram)
    private var lastTimerRun: UInt64 = 0

    /// Binds and listens at `path`. A path where another daemon answers is refused; a stale socket file is
    /// replaced. The socket is made mode 0600 before anyone can connect.
    /// `packetOffloadPromotion`: see `XfrmControlServer.packetOffloadPromotion` (`xfrmd --offload-promote`).
    public init(path: String, stack: XFRMStack, packetOffloadPromotion: Int32? = nil, logger: Logger)
        throws(SocketError)
    {
        self.path = path
        self.stack = stack
        self.server = XfrmControlServer(stack: stack, packetOffloadPromotion: packetOffloadPromotion)
        self.logger = logger
        try Self.refuseIfLive(path)
        if access(path, F_OK) == 0 { unlink(path) }
        let fd = try UnixAddress.seqpacket()
        let oldMask = umask(0o177)
        let bound = UnixAddress.with(path, { bind(fd, $0, $1) })
        umask(oldMask)
        guard let bound else {
            close(fd)
            throw SocketError("socket path \"\(path)\" is too long", errno: ENAMETOOLONG)
        }
        guard bound == 0, chmod(path, 0o600) == 0, listen(fd, 64) == 0 else {
            let e = errno
            close(fd)
            throw SocketError("cannot listen on \(path)", errno: e)
        }
        self.listenFD = fd
        self.events = stack.events.subscribe(capacity: 1 << 16, acquire: false)
    }

    /// Throws when a daemon answers at `path` (checked before anything else is set up).
    public static func refuseIfLive(_ path: String) throws(SocketError) {
        guard access(path, F_OK) == 0 else { return }
        let probe = try UnixAddress.seqpacket()
        let live = UnixAddress.with(path, { connect(probe, $0, $1) }) == 0
        close(probe)
        if live { throw SocketError("another xfrmd is already listening on \(path)", errno: EADDRINUSE) }
    }

    /// Serves until `stop` returns true (checked at least every `tick` milliseconds); false when it had to stop
    /// on an error.
    @discardableResult
    public func run(tick: Int32 = 200, until stop: () -> Bool) -> Bool {
        while !stop() {
            var fds = [pollfd(fd: self.listenFD, events: Int16(POLLIN), revents: 0)]
            for (fd, c) in self.clients.sorted(by: { $0.key < $1.key }) {
                // A client with replies waiting is asked for room, not for more requests.
                fds.append(pollfd(fd: fd, events: Int16(c.queue.isEmpty ? POLLIN : POLLOUT), revents: 0))
            }
            let n = poll(&fds, nfds_t(fds.count), tick)
            if n < 0 && errno != EINTR {
                self.logger.error("poll failed: \(String(cString: strerror(errno)))")
                return false
            }
            if n > 0 {
                if fds[0].revents & Int16(POLLIN) != 0 { self.accept() }
                for p in fds.dropFirst() where p.revents != 0 {
                    if self.clients[p.fd]?.queue.isEmpty == false {
                        if p.revents & Int16(POLLOUT) != 0 && self.flushQueue(p.fd) { continue }
                        self.drop(p.fd)  // gone (POLLHUP/POLLERR) or the socket refused
                    } else {
                        self.serve(p.fd)
                    }
                }
            }
            self.deliverEvents()
            let now = self.stack.clock.now
            if now != self.lastTimerRun {
                self.lastTimerRun = now
                self.stack.runTimers()
                self.deliverEvents()
            }
        }
        return true
    }

    /// Closes every client and the listening socket and removes the socket file.
    public func shutdown() {
        for fd in self.clients.keys { close(fd) }
        self.clients.removeAll()
        close(self.listenFD)
        unlink(self.path)
        self.stack.events.unsubscribe(self.events)
    }

    // MARK: - Clients

    /// At most this many clients; further connections are refused (closed) so descriptors never run out.
    static let maximumClients = 256

    private func accept() {
        let fd = Glibc.accept(self.listenFD, nil, nil)
        guard fd >= 0 else { return }
        guard self.clients.count < Self.maximumClients else {
            self.logger.warning("refused a control connection: \(Self.maximumClients) clients already")
            close(fd)
            return
        }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        guard let cred = PeerCredentials.of(fd), cred.uid == 0 || cred.uid == geteuid() else {
            self.logger.warning("refused a control connection from uid \(PeerCredentials.of(fd)?.uid ?? UInt32.max)")
            close(fd)
            return
        }
        var size: Int32 = 1 << 20
        _ = setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        self.clients[fd] = Client(fd: fd, uid: cred.uid, pid: cred.pid)
        self.logger.debug("control client connected", metadata: ["pid": "\(cred.pid)", "uid": "\(cred.uid)"])
    }

    private func drop(_ fd: Int32) {
        close(fd)
        self.clients[fd] = nil
        self.updateAcquireListening()
    }

    private func serve(_ fd: Int32) {
        let n = self.buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
        if n < 0 && (errno == EAGAIN || errno == EINTR) { return }
        guard n > 0 else {
            self.drop(fd)
            return
        }
        let replies = ControlProtocol.answer(datagram: Array(self.buffer[0..<n]), server: self.server) { groups in
            self.clients[fd]?.groups = groups
            self.updateAcquireListening()
        }
        if !self.send(replies, to: fd, queueing: true) { self.drop(fd) }
    }

    /// Sends what waits in the client's queue while its socket takes it; false when the socket refused (the
    /// client is then dropped).
    private func flushQueue(_ fd: Int32) -> Bool {
        while let next = self.clients[fd]?.queue.first {
            let sent = next.withUnsafeBytes {
                Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT))
            }
            if sent < 0 && (errno == EAGAIN || errno == EINTR) { return true }
            guard sent == next.count else { return false }
            self.clients[fd]!.queue.removeFirst()
            self.clients[fd]!.queued -= next.count
        }
        return true
    }

    /// Sends messages packed into datagrams of at most 32 KiB (a dump arrives in several, as from the kernel), never
    /// waiting: the kernel's netlink never blocks on a reader either. `queueing` (replies): what the socket has no
    /// room for waits in the client's queue, sent as the client reads (false when the queue would pass
    /// `maximumQueued`); otherwise (events) a full socket fails the send at once. False: drop the client / count
    /// the loss.
    private func send(_ messages: [XfrmMessage], to fd: Int32, queueing: Bool) -> Bool {
        var datagrams: [[UInt8]] = []
        var datagram: [UInt8] = []
        for m in messages {
            let bytes = m.encode()
            if !datagram.isEmpty && datagram.count + bytes.count > ControlProtocol.replyBatch {
                datagrams.append(datagram)
                datagram = []
            }
            datagram += bytes
            while datagram.count % 4 != 0 { datagram.append(0) }
        }
        if !datagram.isEmpty { datagrams.append(datagram) }
        guard let client = self.clients[fd] else { return false }
        var rest = datagrams[...]
        if client.queue.isEmpty {
            while let next = rest.first {
                let sent = next.withUnsafeBytes {
                    Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT))
                }
                if sent < 0 && errno == EINTR { continue }
                if sent < 0 && errno == EAGAIN { break }
                guard sent == next.count else { return false }
                rest = rest.dropFirst()
            }
        }
        if rest.isEmpty { return true }
        guard queueing else { return false }
        let bytes = rest.reduce(0) { $0 + $1.count }
        guard client.queued + bytes <= Self.maximumQueued else { return false }
        self.clients[fd]!.queue += rest
        self.clients[fd]!.queued += bytes
        return true
    }

    // MARK: - Events

    private func updateAcquireListening() {
        let any = self.clients.values.contains { $0.groups & ControlProtocol.bit(ControlProtocol.groupAcquire) != 0 }
        self.events.listensForAcquire.store(any, ordering: .relaxed)
    }

    private func deliverEvents() {
        let (events, lost) = self.events.drainReportingLoss()
        if lost > 0 {
            // The daemon's own queue overflowed: every listener missed events and must be told (ENOBUFS).
            for fd in self.clients.keys where self.clients[fd]!.groups != 0 { self.clients[fd]!.lost = true }
        }
        guard !events.isEmpty, !self.clients.isEmpty else { return }
        for e in events {
            guard let m = self.server.message(for: e), let group = ControlProtocol.group(of: m) else { continue }
            let bit = ControlProtocol.bit(group)
            for fd in self.clients.keys where self.clients[fd]!.groups & bit != 0 {
                var out: [XfrmMessage] = []
                if self.clients[fd]!.lost {
                    // ≈ the ENOBUFS a netlink listener reads after an overrun: resynchronise with a dump.
                    out.append(XfrmMessage(type: NetlinkControlType.error, flags: 0,
                                           body: .error(errno: -ENOBUFS, message: "")))
                }
                out.append(m)
                if self.send(out, to: fd, queueing: false) {
                    self.clients[fd]!.lost = false
                } else {
                    self.clients[fd]!.lost = true
                }
            }
        }
    }
}
