/// The anti-replay window of an inbound SA (RFC 4303 §3.4.3 and Appendix A; ≈ xfrm_replay.c's bmp/esn modes).
///
/// A ring of bits indexed by sequence number modulo its length records which of the last `size` numbers were
/// received: 128 bits stored inline for windows up to 128 (the usual 32 or 64; ≈ the kernel sizing the bitmap to the
/// window, xfrm_replay_esn bmp_len), 4096 bits in a separate copy-on-write buffer for larger windows, so that an SA
/// does not carry 512 bytes of bitmap for a 32-packet window.
/// `check` runs before decryption and changes nothing; `advance` runs only after the ICV verified. Windows from 0
/// (no replay protection) to 4096 packets. With ESN, `check` infers the high 32 bits from the window
/// (RFC 4303 Appendix A2.2). Not thread-safe: it lives under its SA's lock.
public struct ReplayWindow: Sendable {
    /// Implementation limit: the largest window (XFRMA_REPLAY_ESN_MAX).
    public static let maximumSize = 4096

    /// Window size in packets; 0 disables replay checks.
    public let size: Int
    /// Extended (64-bit) sequence numbers.
    public let esn: Bool
    /// The highest authenticated sequence number (64-bit with ESN).
    public private(set) var top: UInt64
    /// The ring for windows up to `smallRingBits`: two words as two fields, each read and written on its own (an
    /// `InlineArray` subscript copied both words through the stack, and a 16-byte load right after an 8-byte store
    /// to the same place cannot be forwarded: a stall on every packet).
    private var ring0: UInt64 = 0
    private var ring1: UInt64 = 0
    /// The ring for larger windows (`maximumSize` bits), nil otherwise; copied before a write when shared.
    private var big: BigRing?
    /// Ring length in 64-bit words minus one (1 or 63): the word of sequence s is (s >> 6) & wordMask.
    private let wordMask: Int

    static let smallRingBits = 128

    /// Shared only between copies of a window, and written only when not shared (copy-on-write).
    /// Its words are behind a pointer, so one word is read or written without copying the 512 bytes.
    private final class BigRing: @unchecked Sendable {
        /// `maximumSize` / 64, as a literal (a `static let` is a lazy global behind a check).
        static var words: Int { 64 }
        let bits: UnsafeMutablePointer<UInt64>
        init() {
            self.bits = .allocate(capacity: Self.words)
            self.bits.initialize(repeating: 0, count: Self.words)
        }
        init(_ other: BigRing) {
            self.bits = .allocate(capacity: Self.words)
            self.bits.initialize(from: other.bits, count: Self.words)
        }
        deinit { self.bits.deallocate() }
    }

    @inline(__always)
    private func word(_ w: Int) -> UInt64 {
        assert(w >= 0 && w <= self.wordMask)
        return self.big == nil ? (w == 0 ? self.ring0 : self.ring1) : self.big.unsafelyUnwrapped.bits[w]
    }

    @inline(__always)
    private mutating func setWord(_ w: Int, _ value: UInt64) {
        assert(w >= 0 && w <= self.wordMask)
        if self.big == nil {
            if w == 0 { self.ring0 = value } else { self.ring1 = value }
        } else {
            if !isKnownUniquelyReferenced(&self.big!) { self.big = BigRing(self.big!) }
            self.big.unsafelyUnwrapped.bits[w] = value
        }
    }

    /// The outcome of `check`.
    public enum Check: Equatable, Sendable {
        /// Acceptable so far; carries the full (ESN-inferred) sequence number to authenticate with.
        case accept(UInt64)
        case reject(DropReason)
    }

    /// A window of `size` packets whose highest received number is `top` (iproute2's replay-seq/replay-seq-hi).
    public init(size: Int, esn: Bool, top: UInt64 = 0) {
        precondition(size >= 0 && size <= ReplayWindow.maximumSize, "replay window outside 0...4096")
        self.size = size
        self.esn = esn
        self.top = esn ? top : top & 0xffff_ffff
        self.big = size > Self.smallRingBits ? BigRing() : nil
        self.wordMask = size > Self.smallRingBits ? ReplayWindow.maximumSize / 64 - 1 : Self.smallRingBits / 64 - 1
    }

    /// Empties the window and sets its highest received number to `top`, in place (a key manager restoring
    /// replay state; no allocation when the large ring is not shared).
    public mutating func reset(top: UInt64) {
        self.top = self.esn ? top : top & 0xffff_ffff
        (self.ring0, self.ring1) = (0, 0)
        if self.big != nil {
            if isKnownUniquelyReferenced(&self.big!) {
                self.big.unsafelyUnwrapped.bits.update(repeating: 0, count: BigRing.words)
            } else {
                self.big = BigRing()
            }
        }
    }

    /// The full sequence number a received low half stands for (RFC 4303 A2.2), or nil when it would fall before
    /// sequence number 0 (necessarily too old).
    @inline(__always)
    public func inferSequence(_ low: UInt32) -> UInt64? {
        guard self.esn else { return UInt64(low) }
        let w = UInt32(max(self.size, 1))
        let tl = UInt32(truncatingIfNeeded: self.top)
        let th = UInt32(truncatingIfNeeded: self.top >> 32)
        let bottom = tl &- w &+ 1
        var hi = th
        if tl >= w - 1 {
            // Case A: the window lies within one 2^32 subspace.
            if low < bottom {
                guard th != .max else { return nil }
                hi = th + 1
            }
        } else if low >= bottom {
            // Case B: the window spans two subspaces and this number is in the lower one.
            guard th != 0 else { return nil }
            hi = th - 1
        }
        return UInt64(hi) << 32 | UInt64(low)
    }

    /// Checks a received sequence number (low 32 bits from the wire) without changing the window.
    @inline(__always)
    public func check(_ low: UInt32) -> Check {
        guard let seq = self.inferSequence(low) else { return .reject(.replayTooOld) }
        guard self.size > 0 else { return .accept(seq) }
        if seq == 0 { return .reject(.sequenceZero) }
        if seq > self.top { return .accept(seq) }
        let diff = self.top - seq
        if diff >= UInt64(self.size) { return .reject(.replayTooOld) }
        if self.isMarked(seq) { return .reject(.replayDuplicate) }
        return .accept(seq)
    }

    /// Records an authenticated sequence number, sliding the window when it is the new highest (≈ advance).
    @inline(__always)
    public mutating func advance(_ seq: UInt64) {
        // The usual case, the next number in order: its one position would be cleared and then marked.
        if seq &- self.top == 1 && seq != 0 {
            self.top = seq
            if self.size > 0 { self.mark(seq) }
            return
        }
        if seq > self.top {
            let diff = seq - self.top
            if diff >= UInt64((self.wordMask + 1) * 64) {
                for i in 0...self.wordMask { self.setWord(i, 0) }
            } else {
                // Clear the positions of top+1 ... seq; they last held numbers that left the window. Counted by
                // `remaining`, not by comparing with `seq`, so seq = 2^64 − 1 terminates.
                var s = self.top &+ 1
                var remaining = diff
                while remaining > 0 {
                    let bit = Int(s & 63)
                    let word = Int(s >> 6) & self.wordMask
                    if bit == 0 && remaining >= 64 {
                        self.setWord(word, 0)
                        s &+= 64
                        remaining -= 64
                    } else {
                        self.setWord(word, self.word(word) & ~(1 << UInt64(bit)))
                        s &+= 1
                        remaining -= 1
                    }
                }
            }
            self.top = seq
        }
        guard self.size > 0 else { return }
        self.mark(seq)
    }

    @inline(__always)
    private mutating func mark(_ seq: UInt64) {
        let word = Int(seq >> 6) & self.wordMask
        self.setWord(word, self.word(word) | 1 << (seq & 63))
    }

    @inline(__always)
    private func isMarked(_ seq: UInt64) -> Bool {
        self.word(Int(seq >> 6) & self.wordMask) & (1 << (seq & 63)) != 0
    }

    /// A window restored from the kernel's XFRMA_REPLAY_VAL (`legacy`: bit i is sequence top − i) or
    /// XFRMA_REPLAY_ESN_VAL bitmap (`ring`: the top at bit (low32(top) − 1) mod size, older numbers below it,
    /// wrapping, 32 per word, as xfrm_replay_advance_esn keeps it). Bits for numbers at or below 0 are ignored.
    public init(size: Int, esn: Bool, top: UInt64, bitmap: ReplayBitmap) {
        self.init(size: size, esn: esn, top: top)
        for i in 0..<self.size where UInt64(i) < self.top {
            let seq = self.top - UInt64(i)
            let set: Bool
            switch bitmap {
            case .legacy(let word):
                set = i < 32 && word & (1 << UInt32(i)) != 0
            case .ring(let words):
                let pos = self.ringPosition(distance: i)
                set = pos / 32 < words.count && words[pos / 32] & (1 << UInt32(pos % 32)) != 0
            }
            if set { self.mark(seq) }
        }
    }

    /// The window in the kernel's XFRMA_REPLAY_ESN_VAL layout: ceil(size / 32) words, the ring `init(bitmap:)`
    /// reads (what `ip -s xfrm state` prints for ESN or windows above 32).
    public var ringBitmap: [UInt32] {
        var words = [UInt32](repeating: 0, count: (self.size + 31) / 32)
        for i in 0..<self.size where UInt64(i) < self.top {
            guard self.isMarked(self.top - UInt64(i)) else { continue }
            let pos = self.ringPosition(distance: i)
            words[pos / 32] |= 1 << UInt32(pos % 32)
        }
        return words
    }

    /// The ring bit of the number `distance` below the top, found from the top as xfrm_replay_check_esn and
    /// xfrm_replay_advance_esn find it: the top sits at (low32(top) − 1) mod size and older numbers below it,
    /// wrapping — which differs from (low32(s) − 1) mod size across 2^32 when size is not a power of two.
    @inline(__always)
    private func ringPosition(distance: Int) -> Int {
        let top = Int((UInt32(truncatingIfNeeded: self.top) &- 1) % UInt32(self.size))
        return top >= distance ? top - distance : self.size - (distance - top)
    }

    /// The window in the kernel's XFRMA_REPLAY_VAL layout: bit i is sequence top − i (windows up to 32).
    public var legacyBitmap: UInt32 {
        var word: UInt32 = 0
        for i in 0..<min(self.size, 32) where UInt64(i) < self.top && self.isMarked(self.top - UInt64(i)) {
            word |= 1 << UInt32(i)
        }
        return word
    }

    /// The received/not-received bits of the window, newest (top) first, `size` entries (listings, tests).
    public var receivedBits: [Bool] {
        (0..<self.size).map { i in
            guard UInt64(i) <= self.top else { return false }
            return self.isMarked(self.top - UInt64(i))
        }
    }
}

/// A replay bitmap as the kernel's user API carries it (see `ReplayWindow.init(size:esn:top:bitmap:)`).
///
/// The array case comes first on purpose: Swift keeps a multi-payload enum's case tag in the spare bits of its
/// payload, and the first payload case's tag is 0, so `.ring`'s array pointer is stored unchanged. Second, it would
/// carry the tag in its high bits, and LeakSanitizer, which looks for exact addresses, would report the array an SA
/// keeps in its configuration as leaked (the control fuzz harness did; README "Fuzzing").
public enum ReplayBitmap: Sendable, Equatable {
    /// xfrm_replay_state_esn.bmp: a ring, sequence s at bit (s − 1) mod window.
    case ring([UInt32])
    /// xfrm_replay_state.bitmap: bit i is sequence top − i.
    case legacy(UInt32)
}
