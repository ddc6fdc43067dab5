#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CXFRMSys
import XFRMCore
import XFRMEngine
import XFRMPacket

/// The inner side's reads: whole IP packets from the TUN device (non-blocking, one per read(2)), as packets for the
/// output path. With offloads (IFF_VNET_HDR, TSO4/6, CSUM) each read may be a TCP superpacket of up to 64 KB: it is
/// cut into segments here, before ESP, so each ESP packet carries one whole inner packet; checksums the kernel left
/// partial are completed. A superpacket that does not fit the batch is resumed on the next read.
final class TUNSource: PacketSource {
    let fd: Int32
    let pool: PacketPool
    let counters: DatapathCounters
    let engine: EngineCounters
    let offload: Bool
    static let readSize = VirtioNetHeader.size + 65_535
    private let readBuffer: UnsafeMutableRawPointer
    private let scratch: UnsafeMutableRawPointer
    /// A superpacket read but not yet fully cut: its length (without the virtio header), header and next offset.
    private var pending: (count: Int, header: VirtioNetHeader, offset: Int)? = nil

    init(fd: Int32, pool: PacketPool, counters: DatapathCounters, engine: EngineCounters, offload: Bool) {
        self.fd = fd
        self.pool = pool
        self.counters = counters
        self.engine = engine
        self.offload = offload
        self.readBuffer = .allocate(byteCount: Self.readSize, alignment: 64)
        self.scratch = .allocate(byteCount: 65_536, alignment: 64)
    }

    deinit {
        self.readBuffer.deallocate()
        self.scratch.deallocate()
    }

    /// Part of a superpacket is still to be cut: the intake must call `read` again without waiting for the TUN.
    var hasPending: Bool { self.pending != nil }

    func read(into batch: inout PacketBatch) -> Int {
        let before = batch.count
        while !batch.isFull {
            if self.pending != nil {
                if !self.cut(into: &batch) { break }  // out of buffers
                continue
            }
            guard self.offload else {
                guard var buf = self.pool.allocate() else {
                    self.noBuffer()
                    break
                }
                let room = 2048
                let n = Glibc.read(self.fd, buf.append(room), room)
                guard n > 0 else {
                    self.pool.release(buf)
                    break
                }
                buf.trimBack(room - n)
                batch.append(PacketBatch.Packet(buf, stage: .output))
                continue
            }
            let n = Glibc.read(self.fd, self.readBuffer, Self.readSize)
            guard n > VirtioNetHeader.size else {
                if n >= 0 && n <= VirtioNetHeader.size { self.counters.tunBad.wrappingAdd(1, ordering: .relaxed) }
                if n < 0 { break }
                continue
            }
            self.pending = (n - VirtioNetHeader.size, VirtioNetHeader(from: self.readBuffer), 0)
        }
        let added = batch.count - before
        self.counters.tunRead.wrappingAdd(UInt64(added), ordering: .relaxed)
        return added
    }

    /// Turns (part of) the pending read into packets; false when the pool ran dry (the rest stays pending).
    private func cut(into batch: inout PacketBatch) -> Bool {
        guard let (count, header, offset) = self.pending else { return true }
        let packet = self.readBuffer + VirtioNetHeader.size
        if header.gsoType == VirtioNetHeader.gsoNone {
            // A buffer first: with none, the packet stays pending (its checksum not yet completed).
            guard var buf = self.pool.allocate() else {
                self.noBuffer()
                return false
            }
            self.pending = nil
            if header.flags & VirtioNetHeader.needsChecksum != 0 {
                do throws(TCPOffload.Failure) {
                    try TCPOffload.completeChecksum(packet, count: count, start: Int(header.checksumStart),
                                                    offset: Int(header.checksumOffset))
                } catch {
                    self.pool.release(buf)
                    self.counters.tunBad.wrappingAdd(1, ordering: .relaxed)
                    return true
                }
            }
            guard buf.append(bytes: UnsafeRawBufferPointer(start: packet, count: count)) else {
                self.pool.release(buf)
                self.counters.tunBad.wrappingAdd(1, ordering: .relaxed)
                return true
            }
            batch.append(PacketBatch.Packet(buf, stage: .output))
            return true
        }
        let room = batch.capacity - batch.count
        if offset == 0 { self.counters.tunSuperpackets.wrappingAdd(1, ordering: .relaxed) }
        var dry = false
        do throws(TCPOffload.Failure) {
            let next = try TCPOffload.segment(packet, count: count, header: header, from: offset, limit: room,
                                              scratch: self.scratch, scratchSize: 65_536) { bytes, n in
                guard !dry, var buf = self.pool.allocate() else {
                    dry = true
                    return
                }
                guard buf.append(bytes: UnsafeRawBufferPointer(start: bytes, count: n)) else {
                    self.pool.release(buf)  // a segment larger than a buffer (an MSS beyond any MTU here)
                    self.counters.tunBad.wrappingAdd(1, ordering: .relaxed)
                    return
                }
                batch.append(PacketBatch.Packet(buf, stage: .output))
            }
            if dry {
                // Cut again from the first segment that found no buffer (segments are whole multiples of gsoSize).
                let done = batch.count - (batch.capacity - room)
                self.pending = (count, header, offset + done * Int(header.gsoSize))
                self.noBuffer()
                return false
            }
            let payload = TCPOffload.payloadLength(packet, count: count) ?? 0
            self.pending = next >= payload ? nil : (count, header, next)
        } catch {
            self.pending = nil
            self.counters.tunBad.wrappingAdd(1, ordering: .relaxed)
        }
        return true
    }

    private func noBuffer() {
        self.engine.poolExhausted.wrappingAdd(1, ordering: .relaxed)
        self.counters.noBuffer.wrappingAdd(1, ordering: .relaxed)
    }
}

/// The inner side's writes: what the input path delivered (and ICMP errors for local senders) into the TUN. With
/// offloads, consecutive segments of one TCP flow in a batch are written as one coalesced packet (GRO) with a
/// GSO virtio header, so the host's TCP stack takes them in one go; anything else gets an empty virtio header.
/// One sink per worker (its iovec array is its own); write(2)/writev(2) on a TUN is atomic per packet.
final class TUNSink: PacketSink {
    let fd: Int32
    let pool: PacketPool
    let counters: DatapathCounters
    let offload: Bool
    static let maxRun = 64
    private let iov: UnsafeMutablePointer<iovec>
    private let header: UnsafeMutableRawPointer

    init(fd: Int32, pool: PacketPool, counters: DatapathCounters, offload: Bool) {
        self.fd = fd
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
            var j = i + 1
            // A run starts with a pure ACK whose checksums verify; it takes segments that continue it, verify, and
            // ends after one with PSH (≈ tcp_gro_receive's flush rules).
            if self.offload, let segment = TCPOffload.payloadLength(batch[i].buffer.data, count: batch[i].buffer.count),
                segment > 0, TCPOffload.flags(batch[i].buffer.data, count: batch[i].buffer.count) == 0x10,
                TCPOffload.checksumsValid(batch[i].buffer.data, count: batch[i].buffer.count)
            {
                var run = segment
                var last = segment
                while j < batch.count && j - i < Self.maxRun,
                    TCPOffload.continues(first: batch[i].buffer.data, firstCount: batch[i].buffer.count,
                                         next: batch[j].buffer.data, nextCount: batch[j].buffer.count,
                                         runPayload: run, segmentSize: segment, lastPayload: last),
                    TCPOffload.checksumsValid(batch[j].buffer.data, count: batch[j].buffer.count)
                {
                    last = TCPOffload.payloadLength(batch[j].buffer.data, count: batch[j].buffer.count) ?? 0
                    run += last
                    j += 1
                    if TCPOffload.flags(batch[j - 1].buffer.data, count: batch[j - 1].buffer.count) != 0x10 { break }
                }
                if j - i > 1 {
                    let lastBuf = batch[j - 1].buffer
                    let lastFlags = TCPOffload.flags(lastBuf.data, count: lastBuf.count) ?? 0x10
                    let first = batch[i].buffer
                    let h = TCPOffload.finishRun(first: first.data, firstCount: first.count, totalPayload: run,
                                                 segmentSize: segment, lastFlags: lastFlags)
                    h.store(to: self.header)
                    self.iov[0] = iovec(iov_base: self.header, iov_len: VirtioNetHeader.size)
                    self.iov[1] = iovec(iov_base: first.data, iov_len: first.count)
                    for k in (i + 1)..<j {
                        let b = batch[k].buffer
                        let p = TCPOffload.payloadLength(b.data, count: b.count) ?? 0
                        self.iov[k - i + 1] = iovec(iov_base: b.data + (b.count - p), iov_len: p)
                    }
                    let total = VirtioNetHeader.size + first.count + run - segment
                    if writev(self.fd, self.iov, Int32(j - i + 1)) == total {
                        written += UInt64(j - i)
                        self.counters.tunCoalesced.wrappingAdd(1, ordering: .relaxed)
                    } else {
                        self.counters.sendErrors.wrappingAdd(UInt64(j - i), ordering: .relaxed)
                    }
                    for k in i..<j { self.pool.release(batch[k].buffer) }
                    i = j
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
}
