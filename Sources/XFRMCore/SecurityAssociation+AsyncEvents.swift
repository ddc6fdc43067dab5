import XFRMESP

/// What XFRM_MSG_NEWAE and GETAE read and write on an SA (≈ xfrm_update_ae_params and build_aevent): its current
/// lifetime, its replay state and the async-event thresholds.
extension SecurityAssociation {
    /// The replay state a key manager hands over: the inbound window's top and bitmap, the outbound counter.
    public struct RestoredReplay: Sendable {
        public var inboundTop: UInt64
        public var bitmap: ReplayBitmap?
        public var outboundSequence: UInt64
        public init(inboundTop: UInt64, bitmap: ReplayBitmap?, outboundSequence: UInt64) {
            self.inboundTop = inboundTop
            self.bitmap = bitmap
            self.outboundSequence = outboundSequence
        }
    }

    /// Why `restore` refused (nothing was changed).
    public enum RestoreRefusal: Error, Equatable {
        /// The outbound counter would go back: numbers, and with them AEAD nonces, would be used twice.
        case outboundSequenceBack
    }

    /// Sets curlft (bytes, packets, add and first-use time), as NEWAE's or NEWSA's XFRMA_LTIME_VAL; the limits are
    /// checked against it by the next packet or timer, as the kernel does.
    public func setCurrentLifetime(_ c: LifetimeCurrent) {
        self.mutable.withLock { m in m.current = c }
    }

    /// Replaces the replay state under the SA's lock, the outbound counter only forward (a deliberate difference
    /// from the kernel, which copies whatever it is given: a counter moved back reuses nonces). All or nothing.
    public func restore(_ r: RestoredReplay) throws(RestoreRefusal) {
        guard let transform = self.transform else { return }
        let refused: Bool = self.mutable.withLock { _ in
            guard r.outboundSequence >= transform.outboundSequence else { return true }
            transform.setOutboundSequence(r.outboundSequence)
            transform.setInboundReplay(top: r.inboundTop, bitmap: r.bitmap)
            return false
        }
        if refused { throw .outboundSequenceBack }
    }

    /// XFRMA_REPLAY_THRESH and XFRMA_ETIMER_THRESH as given (nil: unchanged).
    public func setEventThresholds(replayMaxDiff: UInt32?, replayMaxAge: UInt32?) {
        self.mutable.withLock { m in
            if let d = replayMaxDiff { m.replayMaxDiff = d }
            if let a = replayMaxAge { m.replayMaxAge = a }
        }
    }

    /// The thresholds as GETAE lists them: the packet count, and the age in tenths of a second
    /// (x->replay_maxage * 10 / HZ).
    public var eventThresholds: (replayMaxDiff: UInt32, replayMaxAgeTenths: UInt32) {
        self.mutable.withLock { m in
            (m.replayMaxDiff, UInt32(UInt64(m.replayMaxAge) * 10 / UInt64(Self.jiffiesPerSecond)))
        }
    }
}
