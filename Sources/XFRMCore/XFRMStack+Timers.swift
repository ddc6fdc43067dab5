// Lifetime timers (≈ xfrm_timer_handler, xfrm_policy_timer): soft and hard expiry of SAs and policies, larval
// SA expiry, cache sweeps.

import Foundation
import Synchronization
import XFRMCrypto
import XFRMESP
import XFRMPacket

extension XFRMStack {
    // MARK: - Timers (≈ xfrm_timer_handler, xfrm_policy_timer)

    /// Runs every lifetime timer at the clock's current time: soft/hard add and use time for SAs, larval expiry,
    /// and policy lifetimes. Call it when the clock moves (the daemon: every second).
    public func runTimers() {
        self.outputCache.dropStale(generation: self.currentGeneration)
        self.inputCache.dropStale(generation: self.currentGeneration)
        let states = self.states.list()
        self.syncDeviceStats(states)
        let now = self.clock.now
        for sa in states.reversed() {
            switch sa.timerCheck(now: now) {
            case .none: continue
            case .soft:
                self.events.publish(.expire(sa, hard: false))
                self.configurationChanged()  // as on the data path: cached bundles resolve again (a dying SA yields)
            case .hard: self.expireHard(sa)
            }
        }
        let timed = self.policies.timedList()
        // Soft POLEXPIREs are remembered per policy, not per index: a replacement that reused the index (update,
        // or delete and add) has a fresh lifetime and gets its own first one (≈ xfrm_policy_insert restarting the
        // timer); entries of policies gone are dropped.
        self.policySoftSent.withLock { sent in
            guard !sent.isEmpty else { return }
            let live = Dictionary(timed.map { ($0.index, $0.generation) }, uniquingKeysWith: { a, _ in a })
            sent = sent.filter { live[$0.key] == $0.value.generation }
        }
        for p in timed.reversed() {
            let l = p.lifetime
            let use = self.policies.lastUse(index: p.index, direction: p.direction) ?? 0
            let useBase = use == 0 ? p.addTime : use
            let hard = (l.hardAddExpiresSeconds != 0 && deadline(p.addTime, l.hardAddExpiresSeconds) <= now)
                || (l.hardUseExpiresSeconds != 0 && deadline(useBase, l.hardUseExpiresSeconds) <= now)
            if hard {
                // Only this very policy: a replacement that reused its index (update, delete + add) is not its
                // lifetime's to end.
                if (try? self.policies.delete(index: p.index, direction: p.direction, generation: p.generation)) != nil {
                    self.configurationChanged()
        defer { self.configurationChanged() }
                    self.releasePolicyFromDevice(p)
                    self.events.publish(.policyExpire(p, hard: true))
                }
                continue
            }
            let soft = (l.softAddExpiresSeconds != 0 && deadline(p.addTime, l.softAddExpiresSeconds) <= now)
                || (l.softUseExpiresSeconds != 0 && deadline(useBase, l.softUseExpiresSeconds) <= now)
            if soft {
                let due = self.policySoftSent.withLock { sent -> Bool in
                    if let last = sent[p.index], last.generation == p.generation,
                        deadline(last.at, Self.policySoftRepeatSeconds) > now
                    {
                        return false
                    }
                    sent[p.index] = (p.generation, now)
                    return true
                }
                if due { self.events.publish(.policyExpire(p, hard: false)) }
            }
        }
    }

    /// Whether timer runs can change anything while the clock moves and no packet flows: an SA or a policy with a
    /// time limit (larval entries have one), an offloaded SA (its device's counters), or an SA that hit a hard limit
    /// and waits for the next run. False: one run after any stretch of time does what a run every second would.
    public var timersArmed: Bool {
        if self.policies.hasTimedPolicies { return true }
        return self.states.list().contains { sa in
            sa.offload != nil || sa.lifetime.hasTimeLimit || sa.state != .valid
        }
    }

    /// Deletes an SA that hit a hard limit and reports EXPIRE hard=1 — a larval acquire entry too, with SPI 0
    /// (≈ xfrm_timer_handler's `expired:` path), so the key manager knows its negotiation timed out.
    func expireHard(_ sa: SecurityAssociation) {
        self.configurationChanged()
        defer { self.configurationChanged() }
        guard self.states.remove(sa) else { return }
        self.releaseFromDevice(sa)
        self.events.publish(.expire(sa, hard: true))
    }

    /// XFRM_MSG_EXPIRE from a key manager (≈ xfrm_add_sa_expire after its checks): the EXPIRE is announced; a hard
    /// one also deletes the SA, with no DELSA (as a hard limit does). A soft one leaves the SA as it is: the kernel's
    /// km_state_expired does not make it dying.
    public func expireByRequest(_ sa: SecurityAssociation, hard: Bool) {
        if hard {
            self.expireHard(sa)
        } else {
            self.events.publish(.expire(sa, hard: false))
        }
    }

    /// XFRM_MSG_POLEXPIRE from a key manager (≈ xfrm_add_pol_expire): a hard one deletes the policy first (no
    /// DELPOLICY: xfrm_policy_delete does not announce), then the POLEXPIRE is announced.
    public func expirePolicyByRequest(_ p: Policy, hard: Bool) {
        if hard {
            self.configurationChanged()
            defer { self.configurationChanged() }
            guard (try? self.policies.delete(index: p.index, direction: p.direction, generation: p.generation)) != nil
            else { return }
            self.releasePolicyFromDevice(p)
        }
        self.events.publish(.policyExpire(p, hard: hard))
    }
}

