//! When a replica may take over a job another replica holds: only after watching the
//! holder's claim stay unrenewed for a whole lease on this replica's own clock, with
//! no gap in the watching longer than half a lease.
//!
//! The claim's expiry alone is not enough. A store outage longer than the lease cuts
//! the holder off from renewing, but the holder is alive: it waits its writes out and
//! renews the moment the store is back (a renewal past the expiry is sound, see
//! `lease_keeper`). Every other replica lost sight of the store for as long, so its
//! watch starts over when the store returns, and the holder has a lease's time to
//! renew before anyone takes the job: the outage costs the job a pause, not an attempt
//! and a counted crash. The watch also keeps a replica whose clock runs ahead from
//! taking a live lease. The price is a later takeover of a dead replica's job: at most
//! one more lease after this replica first looks at it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::job_store::Claim;

/// This replica's view of other replicas' claims, job by job.
pub struct TakeoverWatch {
    ttl: Duration,
    seen: HashMap<String, Sighting>,
}

/// One claim under watch.
struct Sighting {
    epoch: u64,
    /// Since when this epoch has been watched without a gap.
    since: Instant,
    last: Instant,
}

impl TakeoverWatch {
    pub fn new(ttl: Duration) -> TakeoverWatch {
        TakeoverWatch {
            ttl,
            seen: HashMap::new(),
        }
    }

    /// Whether `replica`, seeing `claim` as job `job`'s current claim at `now`, may try
    /// to take the job (the store still decides, by the claim's expiry and a
    /// create-only write). Free jobs, released claims and this replica's own claims
    /// are not watched.
    pub fn may_take(
        &mut self,
        job: &str,
        claim: Option<&Claim>,
        replica: &str,
        now: Instant,
    ) -> bool {
        let Some(claim) = claim.filter(|c| !c.released && c.replica != replica) else {
            self.seen.remove(job);
            return true;
        };
        let max_gap = self.ttl / 2;
        let sighting = self.seen.entry(job.to_owned()).or_insert(Sighting {
            epoch: claim.epoch,
            since: now,
            last: now,
        });
        if sighting.epoch != claim.epoch || now.duration_since(sighting.last) > max_gap {
            sighting.epoch = claim.epoch;
            sighting.since = now;
        }
        sighting.last = now;
        now.duration_since(sighting.since) >= self.ttl
    }

    /// Forgets jobs no longer queued.
    pub fn retain(&mut self, queued: &[String]) {
        self.seen.retain(|job, _| queued.contains(job));
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;

    const TTL: Duration = Duration::from_secs(30);

    fn claim(replica: &str, epoch: u64, released: bool) -> Claim {
        Claim {
            replica: replica.into(),
            epoch,
            expires_at: Utc::now(),
            released,
        }
    }

    fn secs(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    #[test]
    fn a_claim_watched_unrenewed_for_a_lease_may_be_taken() {
        let (mut watch, t0) = (TakeoverWatch::new(TTL), Instant::now());
        let held = claim("a", 4, false);
        for s in (0..30).step_by(5) {
            assert!(!watch.may_take("job", Some(&held), "b", secs(t0, s)), "{s}");
        }
        assert!(watch.may_take("job", Some(&held), "b", secs(t0, 30)));
    }

    #[test]
    fn a_renewal_starts_the_watch_over() {
        let (mut watch, t0) = (TakeoverWatch::new(TTL), Instant::now());
        assert!(!watch.may_take("job", Some(&claim("a", 4, false)), "b", t0));
        let renewed = claim("a", 5, false);
        assert!(!watch.may_take("job", Some(&renewed), "b", secs(t0, 25)));
        assert!(!watch.may_take("job", Some(&renewed), "b", secs(t0, 40)));
        assert!(watch.may_take("job", Some(&renewed), "b", secs(t0, 55)));
    }

    #[test]
    fn after_losing_sight_of_the_store_the_watch_starts_over() {
        let (mut watch, t0) = (TakeoverWatch::new(TTL), Instant::now());
        let held = claim("a", 4, false);
        assert!(!watch.may_take("job", Some(&held), "b", t0));
        // An outage: nothing seen for 40 s, longer than half a lease.
        assert!(!watch.may_take("job", Some(&held), "b", secs(t0, 40)));
        assert!(!watch.may_take("job", Some(&held), "b", secs(t0, 55)));
        assert!(watch.may_take("job", Some(&held), "b", secs(t0, 70)));
    }

    #[test]
    fn free_released_and_own_claims_are_not_watched() {
        let (mut watch, t0) = (TakeoverWatch::new(TTL), Instant::now());
        assert!(watch.may_take("job", None, "b", t0));
        assert!(watch.may_take("job", Some(&claim("a", 4, true)), "b", t0));
        assert!(watch.may_take("job", Some(&claim("b", 4, false)), "b", t0));
    }
}
