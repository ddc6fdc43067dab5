import XFRMESP
import XFRMPacket

// Runs: consecutive packets of a batch that take exactly the same path share one acquisition of their SA's lock
// (≈ what the kernel's GSO segments of one skb get from xfrm_output). A run holds only packets whose per-packet
// path would have done nothing but ESP, accounting and the route's checks; it stops at the first packet that needs
// anything else, which then goes the per-packet way — so counters, events and verdicts come out exactly as if
// every packet had gone alone.

extension XFRMStack {
    /// The most bytes of packets one run protects under the SA's lock (≈ 5 µs of AES-GCM at 1,420 B: the
    /// control plane and the timers wait no longer than that for the SA).
    static let runByteLimit = 16_384

    /// Protects output packets `start…` that the memo's software bundle serves (same flow, same generation and
    /// CPU tag, inside the tunnel's size limit), in one acquisition of the SA's lock, and stores their verdicts.
    /// Returns the index of the first packet it did not decide (`start` when none).
    ///
    /// Per packet this is `outputCachedBundle` without the device branch: the direction check (once, the SA's
    /// config is immutable), the size check before the lock, state, lifetime, ESP and accounting under it, the
    /// route's MTU check after. A packet the transform refused (sequence overflow) ends the run with its drop
    /// counted as `apply` counts it.
    func outputRun(_ batch: inout PacketBatch, from start: Int, memo: borrowing OutputMemo, cpu: UInt32,
                   now: UInt64) -> Int {
        guard start < batch.count, memo.isSet else { return start }
        let generation = self.currentGeneration
        let tag: UInt = self.states.hasPerCPUStates ? UInt(cpu) &+ 1 &<< 4 : 0
        return memo.withBundle { b -> Int in
            guard b.device == nil, b.sa.config.direction != .inbound, let transformRef = b.sa.transformRef else {
                return start
            }
            return batch.packets.withUnsafeMutableBufferPointer { packets -> Int in
                // Which of the next packets the bundle serves, before the lock.
                var end = start
                var bytes = 0
                while end < packets.count && bytes < Self.runByteLimit {
                    guard case .pending = packets[end].verdict, packets[end].stage != .input else { break }
                    let buffer = packets[end].buffer
                    guard let flow = Flow.parse(buffer.data, count: buffer.count, mark: 0),
                        memo.matches(flow, tag: tag, generation: generation)
                    else { break }
                    if let limit = b.limit, buffer.count > limit { break }  // ICMP or a drop: the per-packet path
                    bytes += buffer.count
                    end += 1
                }
                guard end > start else { return start }
                let (protected, refused) = transformRef._withUnsafeGuaranteedRef { transform in
                    b.sa.useForOutputRun(now: now, count: end - start) { k in
                        var layout = ESPLayout()
                        // The header was verified by Flow.parse above.
                        let reason = transform.encapsulate(&packets[start + k].buffer, layout: &layout,
                                                           innerHeaderChecked: true)
                        return (reason, layout.payloadLength)
                    }
                }
                for j in start..<(start + protected) {
                    let r = self.transmit(&packets[j].buffer, ifindex: b.ifindex, mtu: b.mtu, transformed: true)
                    packets[j].verdict = .output(r, transformed: true)
                }
                guard let refused else { return start + protected }
                self.statistics.count(refused)
                packets[start + protected].verdict = .output(.dropped(XfrmStatCounter(refused)), transformed: false)
                return start + protected + 1
            }
        }
    }
}
