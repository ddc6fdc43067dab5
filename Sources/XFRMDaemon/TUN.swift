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
/// output path. With offloads (IFF_VNET_HDR, TSO4/6, CSUM, and USO4/6 where the kernel has them) each read may be a
/// TCP or UDP superpacket of up to 64 KB: it is cut into segments here, before ESP, so each ESP packet carries one
/// whole inner packet; checksums the kernel left partial are completed. A superpacket that does not fit the batch is resumed on the next read.
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
    @exclusivity(unchecked) private var pending: (count: Int, header: VirtioNetHeader, offset: Int)? = nil

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

    /// The length an IP packet's header gives it (IPv4 total length, IPv6 40 + payload length), nil when `count`
    /// bytes hold no header.
    static func ipLength(_ p: UnsafeMutableRawPointer, count: Int) -> Int? {
        guard count >= 20 else { return nil }
        switch p.loadByte(at: 0) >> 4 {
        case 4: return Int(p.loadBE16(at: 2))
        case 6: return count >= 40 ? 40 + Int(p.loadBE16(at: 4)) : nil
        default: return nil
        }
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
                let room = buf.tailroom
                let n = Glibc.read(self.fd, buf.append(room), room)
                guard n > 0 else {
                    buf.trimBack(room)
                    self.pool.release(buf)
                    break
                }
                // A packet larger than a buffer (a TUN MTU above it) comes in cut: the read fills the room (or, by
                // tun_put_user's count, says more than it took). It is counted and dropped, never sent on cut.
                guard n < room || (n == room && Self.ipLength(buf.data, count: n) == n) else {
                    buf.trimBack(room)
                    self.pool.release(buf)
                    self.counters.tunBad.wrappingAdd(1, ordering: .relaxed)
                    continue
                }
                buf.trimBack(room - n)
                batch.append(PacketBatch.Packet(buf, stage: .output))
                continue
            }
            let n = Glibc.read(self.fd, self.readBuffer, Self.readSize)
            if n < 0 { break }
            // As above: a superpacket longer than the read buffer came in cut (a kernel that let a larger GSO packet
            // through): dropped and counted, never cut from bytes that are not there.
            guard n < Self.readSize
                || Self.ipLength(self.readBuffer + VirtioNetHeader.size, count: n - VirtioNetHeader.size)
                    == n - VirtioNetHeader.size
            else {
                self.counters.tunBad.wrappingAdd(1, ordering: .relaxed)
                continue
            }
            self.received(n)
        }
        let added = batch.count - before
        self.counters.tunRead.wrappingAdd(UInt64(added), ordering: .relaxed)
        return added
    }

    /// Takes a read of `n` bytes in `readBuffer`: a virtio-net header and the packet (or superpacket) behind it,
    /// left pending for `cut`; a read no longer than the header is counted (`tun_bad`).
    private func received(_ n: Int) {
        guard n > VirtioNetHeader.size else {
            self.counters.tunBad.wrappingAdd(1, ordering: .relaxed)
            return
        }
        self.pending = (n - VirtioNetHeader.size, VirtioNetHeader(from: self.readBuffer), 0)
    }

    /// A read that is already in memory (`bytes`, at most `readSize`: virtio-net header and packet), cut into
    /// `batch` as `read` cuts one from the device; with `hasPending`, call `read` or `cut` again
    /// (DaemonIntake, for the fuzz harness).
    func take(_ bytes: UnsafeRawBufferPointer, into batch: inout PacketBatch) {
        precondition(self.pending == nil && self.offload && bytes.count <= Self.readSize)
        if let base = bytes.baseAddress { self.readBuffer.copyMemory(from: base, byteCount: bytes.count) }
        self.received(bytes.count)
        while self.pending != nil && !batch.isFull && self.cut(into: &batch) {}
    }

    /// Cuts more of the pending read into `batch` (after `take`); false when the pool ran dry.
    func resume(into batch: inout PacketBatch) -> Bool {
        while self.pending != nil && !batch.isFull {
            if !self.cut(into: &batch) { return false }
        }
        return true
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
        let udp = header.gsoType == VirtioNetHeader.gsoUDPL4
        if offset == 0 {
            if udp {
                self.counters.tunUDPSuperpackets.wrappingAdd(1, ordering: .relaxed)
            } else {
                self.counters.tunSuperpackets.wrappingAdd(1, ordering: .relaxed)
            }
        }
        var dry = false
        func emit(_ bytes: UnsafeRawPointer, _ n: Int) {
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
        do throws(TCPOffload.Failure) {
            // TCP (TSO) or UDP (USO) by the virtio header's type; ECN on TCP is carried in the headers as cut.
            let next = udp
                ? try UDPOffload.segment(packet, count: count, header: header, from: offset, limit: room,
                                         scratch: self.scratch, scratchSize: 65_536, emit)
                : try TCPOffload.segment(packet, count: count, header: header, from: offset, limit: room,
                                         scratch: self.scratch, scratchSize: 65_536, emit)
            if dry {
                // Cut again from the first segment that found no buffer (segments are whole multiples of gsoSize).
                let done = batch.count - (batch.capacity - room)
                self.pending = (count, header, offset + done * Int(header.gsoSize))
                self.noBuffer()
                return false
            }
            let payload = (udp ? UDPOffload.payloadLength(packet, count: count, extensions: true)
                : TCPOffload.payloadLength(packet, count: count, extensions: true)) ?? 0
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
