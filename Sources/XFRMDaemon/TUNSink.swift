#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CXFRMSys
import Synchronization
import XFRMCore
import XFRMEngine
import XFRMPacket

/// The inner side's writes: what the input path delivered (and ICMP errors for local senders) into the TUN. With
/// offloads, consecutive segments of one TCP flow in a batch (and, with USO, consecutive datagrams of one UDP flow) are
/// written as one coalesced packet (GRO) with a GSO virtio header, so the host's TCP stack takes them in one go; anything else gets an empty virtio header.
/// One sink per worker (its iovec array is its own); write(2)/writev(2) on a TUN is atomic per packet.
final class TUNSink: PacketSink {
    let fd: Int32
    let pool: PacketPool
    let counters: DatapathCounters
    let offload: Bool
    /// The TUN took USO4/USO6: UDP runs may be written coalesced (VIRTIO_NET_HDR_GSO_UDP_L4).
    let uso: Bool
    static let maxRun = 64
    private let iov: UnsafeMutablePointer<iovec>
    private let header: UnsafeMutableRawPointer

    init(fd: Int32, pool: PacketPool, counters: DatapathCounters, offload: Bool, uso: Bool) {
        self.fd = fd
        self.uso = uso
        self.pool = pool
        self.counters = counters
        self.offload = offload
        self.iov = .allocate(capacity: Self.maxRun + 1)
        self.header = .allocate(byteCount: VirtioNetHeader.size, alignment: 8)
    }

    deinit {
        self.iov.deallocate()
        self.header.deallocate()
    }

    func write(_ batch: inout PacketBatch) {
        var written: UInt64 = 0
        var i = 0
        while i < batch.count {
            if self.offload {
                let j = self.tcpRun(batch, from: i)
                if j - i > 1 {
                    written += self.writeTCPRun(batch, i, j)
                    i = j
                    continue
                }
                let k = self.uso ? self.udpRun(batch, from: i) : i + 1
                if k - i > 1 {
                    written += self.writeUDPRun(batch, i, k)
                    i = k
                    continue
                }
            }
            var b = batch[i].buffer
            if self.offload {
                let h = b.prepend(VirtioNetHeader.size)
                h.initializeMemory(as: UInt8.self, repeating: 0, count: VirtioNetHeader.size)
            }
            if Glibc.write(self.fd, b.data, b.count) == b.count {
                written += 1
            } else {
                self.counters.sendErrors.wrappingAdd(1, ordering: .relaxed)
            }
            self.pool.release(b)
            i += 1
        }
        self.counters.tunWritten.wrappingAdd(written, ordering: .relaxed)
        batch.removeAll()
    }

    /// The end of the TCP run starting at `i` (i + 1 when there is none). A run starts with a pure ACK whose
    /// checksums verify; it takes segments that continue it, verify, and ends after one with PSH (≈ tcp_gro_receive's
    /// flush rules).
    private func tcpRun(_ batch: PacketBatch, from i: Int) -> Int {
        var j = i + 1
        let first = batch[i].buffer
        guard let segment = TCPOffload.payloadLength(first.data, count: first.count), segment > 0,
            TCPOffload.flags(first.data, count: first.count) == 0x10,
            TCPOffload.checksumsValid(first.data, count: first.count)
        else { return j }
        var run = segment
        var last = segment
        while j < batch.count && j - i < Self.maxRun,
            TCPOffload.continues(first: first.data, firstCount: first.count, next: batch[j].buffer.data,
                                 nextCount: batch[j].buffer.count, runPayload: run, segmentSize: segment,
                                 lastPayload: last),
            TCPOffload.checksumsValid(batch[j].buffer.data, count: batch[j].buffer.count)
        {
            last = TCPOffload.payloadLength(batch[j].buffer.data, count: batch[j].buffer.count) ?? 0
            run += last
            j += 1
            if TCPOffload.flags(batch[j - 1].buffer.data, count: batch[j - 1].buffer.count) != 0x10 { break }
        }
        return j
    }

    /// The end of the UDP run starting at `i` (i + 1 when there is none): datagrams of one flow whose checksums
    /// verify, all of the first one's size but the last, which may be shorter (≈ udp_gro_receive_segment; what
    /// wireguard-go's udpGRO does, only ever appending to the newest run of a flow so that nothing is reordered).
    private func udpRun(_ batch: PacketBatch, from i: Int) -> Int {
        var j = i + 1
        let first = batch[i].buffer
        guard let size = UDPOffload.payloadLength(first.data, count: first.count), size > 0,
            UDPOffload.checksumsValid(first.data, count: first.count)
        else { return j }
        var run = size
        var last = size
        while j < batch.count && j - i < Self.maxRun,
            UDPOffload.continues(first: first.data, firstCount: first.count, next: batch[j].buffer.data,
                                 nextCount: batch[j].buffer.count, runPayload: run, runCount: j - i,
                                 segmentSize: size, lastPayload: last),
            UDPOffload.checksumsValid(batch[j].buffer.data, count: batch[j].buffer.count)
        {
            last = UDPOffload.payloadLength(batch[j].buffer.data, count: batch[j].buffer.count) ?? 0
            run += last
            j += 1
        }
        return j
    }

    private func writeTCPRun(_ batch: PacketBatch, _ i: Int, _ j: Int) -> UInt64 {
        let first = batch[i].buffer
        let segment = TCPOffload.payloadLength(first.data, count: first.count) ?? 0
        var run = 0
        for k in i..<j { run += TCPOffload.payloadLength(batch[k].buffer.data, count: batch[k].buffer.count) ?? 0 }
        let lastBuf = batch[j - 1].buffer
        let lastFlags = TCPOffload.flags(lastBuf.data, count: lastBuf.count) ?? 0x10
        let h = TCPOffload.finishRun(first: first.data, firstCount: first.count, totalPayload: run,
                                     segmentSize: segment, lastFlags: lastFlags)
        return self.writeRun(batch, i, j, header: h, headers: first.count - segment, coalesced: self.counters.tunCoalesced)
    }

    private func writeUDPRun(_ batch: PacketBatch, _ i: Int, _ j: Int) -> UInt64 {
        let first = batch[i].buffer
        let size = UDPOffload.payloadLength(first.data, count: first.count) ?? 0
        var run = 0
        for k in i..<j { run += UDPOffload.payloadLength(batch[k].buffer.data, count: batch[k].buffer.count) ?? 0 }
        let h = UDPOffload.finishRun(first: first.data, firstCount: first.count, totalPayload: run, segmentSize: size)
        return self.writeRun(batch, i, j, header: h, headers: first.count - size,
                             coalesced: self.counters.tunUDPCoalesced)
    }

    /// One writev(2): the virtio header, the first packet whole (its headers now those of the run), then the
    /// payloads of the others (each packet's last bytes after `headers`, which are equal in a run). Releases them.
    private func writeRun(_ batch: PacketBatch, _ i: Int, _ j: Int, header h: VirtioNetHeader, headers: Int,
                          coalesced: borrowing Atomic<UInt64>) -> UInt64 {
        let first = batch[i].buffer
        h.store(to: self.header)
        self.iov[0] = iovec(iov_base: self.header, iov_len: VirtioNetHeader.size)
        self.iov[1] = iovec(iov_base: first.data, iov_len: first.count)
        var total = VirtioNetHeader.size + first.count
        for k in (i + 1)..<j {
            let b = batch[k].buffer
            self.iov[k - i + 1] = iovec(iov_base: b.data + headers, iov_len: b.count - headers)
            total += b.count - headers
        }
        var written: UInt64 = 0
        if writev(self.fd, self.iov, Int32(j - i + 1)) == total {
            written = UInt64(j - i)
            coalesced.wrappingAdd(1, ordering: .relaxed)
        } else {
            self.counters.sendErrors.wrappingAdd(UInt64(j - i), ordering: .relaxed)
        }
        for k in i..<j { self.pool.release(batch[k].buffer) }
        return written
    }
}
