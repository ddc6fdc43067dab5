#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CXFRMSys
import XFRMCore
import XFRMEngine
import XFRMPacket

/// What the wire intake reads from: an outer socket's source, plain or GRO.
protocol OuterReader: PacketSource {
    /// Datagrams received but not yet handed over (a coalesced read larger than the batch): read again at once.
    var hasPending: Bool { get }
    /// The last read filled every slot or left some pending: more may be waiting.
    var mayHaveMore: Bool { get }
    /// Returns every held buffer to the pool.
    func releaseHeld()
}

extension OuterSource: OuterReader {
    var hasPending: Bool { false }
}

/// An ESP-in-UDP socket's reads with UDP_GRO on (udp_gro_receive; the socket opted in with setsockopt UDP_GRO):
/// the kernel may hand over up to 64 KB of consecutive same-size datagrams from one peer as one, with a UDP_GRO
/// control message giving their size (udp_cmsg_recv). recvmmsg(2) fills a few 64 KB receive areas; each is cut back
/// into its datagrams — the last may be shorter — copied into packet buffers and framed as the IP packets they
/// arrived in, so the stack sees exactly what it would have seen without GRO. What does not fit the batch (or finds
/// no buffer) waits for the next read. The receive areas are allocated once.
final class OuterGROSource: OuterReader {
    let fd: Int32
    let framing: Framing
    let udpPort: UInt16
    let ifindex: Int32
    let pool: PacketPool
    let counters: DatapathCounters
    let engine: EngineCounters
    /// Receive areas per recvmmsg: 32 × 64 KB holds 32 coalesced reads or 32 lone datagrams.
    static let areas = 32
    static let areaSize = 65_536
    private let bufs: UnsafeMutablePointer<UnsafeMutableRawPointer?>
    private let caps: UnsafeMutablePointer<Int>
    private let lens: UnsafeMutablePointer<Int>
    private let flags: UnsafeMutablePointer<Int32>
    private let names: UnsafeMutablePointer<sockaddr_in6>
    private let control: UnsafeMutablePointer<UInt8>
    private let memory: UnsafeMutableRawPointer
    /// Areas received (`received`), the one being cut (`next`) and the offset in it.
    @exclusivity(unchecked) private var received = 0
    @exclusivity(unchecked) private var next = 0
    @exclusivity(unchecked) private var offset = 0

    init(fd: Int32, framing: Framing, udpPort: UInt16, ifindex: Int32, pool: PacketPool, counters: DatapathCounters,
         engine: EngineCounters) {
        self.fd = fd
        self.framing = framing
        self.udpPort = udpPort
        self.ifindex = ifindex
        self.pool = pool
        self.counters = counters
        self.engine = engine
        let n = Self.areas
        self.memory = .allocate(byteCount: n * Self.areaSize, alignment: 64)
        self.bufs = .allocate(capacity: n)
        self.caps = .allocate(capacity: n)
        self.lens = .allocate(capacity: n)
        self.flags = .allocate(capacity: n)
        self.names = .allocate(capacity: n)
        self.control = .allocate(capacity: n * OuterSource.controlSize)
        for i in 0..<n {
            self.bufs[i] = self.memory + i * Self.areaSize
            self.caps[i] = Self.areaSize
        }
    }

    deinit {
        self.memory.deallocate()
        self.bufs.deallocate()
        self.caps.deallocate()
        self.lens.deallocate()
        self.flags.deallocate()
        self.names.deallocate()
        self.control.deallocate()
    }

    var hasPending: Bool { self.next < self.received }
    private(set) var mayHaveMore = false

    func releaseHeld() {}

    func read(into batch: inout PacketBatch) -> Int {
        let before = batch.count
        if !self.hasPending {
            let got = Int(xfrm_recv_batch(self.fd, self.bufs, self.caps, self.lens, self.flags, self.names,
                                          self.control, OuterSource.controlSize, UInt32(Self.areas)))
            self.received = max(got, 0)
            self.mayHaveMore = got == Self.areas
            self.next = 0
            self.offset = 0
        }
        while self.next < self.received && !batch.isFull {
            if !self.cut(self.next, into: &batch) { break }  // out of buffers: the rest waits
            self.next += 1
            self.offset = 0
        }
        if self.hasPending { self.mayHaveMore = true }
        let added = batch.count - before
        self.counters.wireReceived.wrappingAdd(UInt64(added), ordering: .relaxed)
        return added
    }

    /// Cuts area `i` from `offset` into datagrams; false when it stopped early (batch full or pool dry), with
    /// `offset` where to go on.
    private func cut(_ i: Int, into batch: inout PacketBatch) -> Bool {
        let control = self.control + i * OuterSource.controlSize
        let length = self.lens[i]
        if self.flags[i] & Int32(MSG_TRUNC) != 0 || length == 0 {  // never decrypt half a packet
            self.counters.truncated.wrappingAdd(1, ordering: .relaxed)
            return true
        }
        var size = length
        if let (c, cmsgLength) = OuterSource.controlMessage(control, level: Int32(IPPROTO_UDP), type: 104),  // UDP_GRO
            cmsgLength >= 20
        {
            size = Int(c.load(fromByteOffset: 16, as: Int32.self))
            guard size > 0 else {
                self.counters.truncated.wrappingAdd(1, ordering: .relaxed)  // a size no datagram has: all of it
                return true
            }
            if self.offset == 0 && length > size {
                self.counters.udpGROReceives.wrappingAdd(1, ordering: .relaxed)
                self.counters.udpGROSegments.wrappingAdd(UInt64((length + size - 1) / size), ordering: .relaxed)
            }
        }
        let area = self.bufs[i]!
        while self.offset < length {
            if batch.isFull { return false }
            guard let buf = self.pool.allocate() else {
                self.engine.poolExhausted.wrappingAdd(1, ordering: .relaxed)
                self.counters.noBuffer.wrappingAdd(1, ordering: .relaxed)
                return false
            }
            let n = min(size, length - self.offset)
            self.offset += n
            Self.take(UnsafeRawBufferPointer(start: area + (self.offset - n), count: n), in: buf,
                      from: self.names[i], control: control, framing: self.framing, udpPort: self.udpPort,
                      ifindex: self.ifindex, pool: self.pool, counters: self.counters, into: &batch)
        }
        return true
    }

    /// One datagram cut from a coalesced read, copied into `buf` and framed as the IP packet it arrived in, onto
    /// `batch`; one larger than a buffer is counted `truncated`, one without its destination `not_esp`.
    static func take(_ datagram: UnsafeRawBufferPointer, in buf: PacketBuffer, from: sockaddr_in6,
                     control: UnsafeMutablePointer<UInt8>, framing: Framing, udpPort: UInt16, ifindex: Int32,
                     pool: PacketPool, counters: DatapathCounters, into batch: inout PacketBatch) {
        var buf = buf
        guard datagram.count <= OuterSource.room, buf.append(bytes: datagram) else {
            counters.truncated.wrappingAdd(1, ordering: .relaxed)  // larger than any buffer here
            pool.release(buf)
            return
        }
        if OuterSource.frame(&buf, length: datagram.count, from: from, control: control, framing: framing,
                             udpPort: udpPort)
        {
            batch.append(PacketBatch.Packet(buf, stage: .input, ifindex: ifindex))
        } else {
            counters.notESP.wrappingAdd(1, ordering: .relaxed)
            pool.release(buf)
        }
    }
}
