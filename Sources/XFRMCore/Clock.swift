import Foundation
import Synchronization

/// Wall-clock seconds for lifetimes and listings (≈ ktime_get_real_seconds). Tests and offline stacks use a
/// `ManualClock`, so nothing ever sleeps to make an SA expire.
public protocol XFRMClock: AnyObject, Sendable {
    /// Seconds since the Unix epoch.
    var now: UInt64 { get }
}

/// The system's real-time clock, read per packet: CLOCK_REALTIME_COARSE (≈ ktime_get_real_seconds: the time of the
/// last tick, always answered by the vDSO without a system call; seconds are all the SAs need).
public final class SystemClock: XFRMClock {
    public init() {}
    public var now: UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME_COARSE, &ts)
        return UInt64(ts.tv_sec)
    }
}

/// A clock that moves only when told to (≈ swift-nio's EmbeddedEventLoop time).
public final class ManualClock: XFRMClock {
    private let seconds: Atomic<UInt64>
    /// Starts at `start` seconds since the epoch (2024-01-01 00:00:00 UTC by default, so listings are stable).
    public init(start: UInt64 = 1_704_067_200) { self.seconds = Atomic(start) }
    public var now: UInt64 { self.seconds.load(ordering: .relaxed) }
    /// Moves the clock forward.
    public func advance(by delta: UInt64) { self.seconds.wrappingAdd(delta, ordering: .relaxed) }
}
