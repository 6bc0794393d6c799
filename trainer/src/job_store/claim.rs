//! Leases: which replica runs a job, kept as a log of create-only claims
//! `jobs/<id>/claims/<epoch>.json` whose highest epoch is the current one.
//!
//! A replica takes a job by writing the claim one epoch above the current one, which
//! only one writer can do; it may when the job has no claim, the current claim has
//! expired, or the claim is its own. Renewing writes the next epoch for the same
//! replica: if that epoch is already there, another replica took the job over after the
//! lease expired. Releasing writes a claim that expires at once.
//!
//! Only the newest two claims are kept. Because old epochs are deleted, a write to a
//! free epoch number does not by itself prove it is the newest: a holder that stalled
//! past its expiry could recreate a deleted epoch while another replica is several
//! epochs ahead. Every acquisition and renewal therefore lists the log after its write
//! and holds the lease only if its epoch is the highest. That check is sound because
//! the highest epoch is never deleted: a deleted epoch always has a newer one listed.
//!
//! Clocks: an expiry written by one replica is compared with another replica's `now`,
//! so replica clocks must agree within a margin much smaller than the time to live. A
//! holder renews well before `expires_at` minus that margin and stops working on the
//! job as soon as a renewal fails.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use coreg::store::CreateOutcome;
use serde::{Deserialize, Serialize};

use super::ids::validate_job_id;
use super::{corrupt, job_key, queue_key, read_json, to_json, Error, JobStore, Result};

const CLAIMS_DIR: &str = "claims/";
const EPOCH_DIGITS: usize = 20;
const MAX_REPLICA_LEN: usize = 128;

/// One entry of a job's lease log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The replica that holds (or released) the job.
    pub replica: String,
    pub epoch: u64,
    /// From this instant on, any replica may take the job.
    pub expires_at: DateTime<Utc>,
    /// The holder gave the job up on purpose. A claim that ends otherwise (it expired,
    /// or its replica restarted and took it back) means the holder died with the job:
    /// the next holder counts that as a crash.
    #[serde(default)]
    pub released: bool,
}

/// Proof that this replica holds a job: only [`JobStore::acquire`] makes one, and
/// every method that writes the job's status asks for it. Not `Clone`: one holder.
#[derive(Debug)]
pub struct Lease {
    job_id: String,
    replica: String,
    epoch: u64,
    expires_at: DateTime<Utc>,
    ttl: TimeDelta,
    previous_holder_died: bool,
}

impl Lease {
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// Renew before this, less the clock margin.
    pub fn expires_at(&self) -> DateTime<Utc> {
        self.expires_at
    }

    /// How long the lease lasts from a renewal.
    pub fn ttl(&self) -> TimeDelta {
        self.ttl
    }

    /// Whether the job was taken from a holder that died with it: its claim was never
    /// released (it expired, or the same replica name restarted and took it back).
    pub fn previous_holder_died(&self) -> bool {
        self.previous_holder_died
    }

    /// An expired lease may already be another replica's: it proves nothing.
    pub(super) fn check_valid_at(&self, now: DateTime<Utc>) -> Result<()> {
        if now < self.expires_at {
            Ok(())
        } else {
            Err(self.lost())
        }
    }

    fn lost(&self) -> Error {
        Error::LeaseLost {
            job: self.job_id.clone(),
            epoch: self.epoch,
        }
    }

    fn next_epoch(&self) -> coreg::Result<u64> {
        next_epoch(&self.job_id, self.epoch)
    }
}

fn next_epoch(job_id: &str, epoch: u64) -> coreg::Result<u64> {
    epoch
        .checked_add(1)
        .ok_or_else(|| corrupt(&claim_key(job_id, epoch), "the lease log has no epoch left"))
}

fn claim_key(job_id: &str, epoch: u64) -> String {
    job_key(job_id, &format!("{CLAIMS_DIR}{epoch:0EPOCH_DIGITS$}.json"))
}

fn check_replica(replica: &str) -> coreg::Result<()> {
    if replica.is_empty()
        || replica.len() > MAX_REPLICA_LEN
        || replica.chars().any(char::is_control)
    {
        return Err(coreg::Error::InvalidInput(format!(
            "replica name {replica:?} is not allowed: use 1–{MAX_REPLICA_LEN} bytes without \
             control characters"
        )));
    }
    Ok(())
}

impl JobStore {
    /// Takes the job for `replica` until `now + ttl`, or returns `None` when another
    /// replica holds an unexpired claim, wins the race for the next epoch, or the job is
    /// final (a finished job is never run again; its queue marker is removed if a crash
    /// left it). A replica may take back its own unexpired claim (a restart under the
    /// same name), so replica names must be unique among live replicas.
    pub async fn acquire(
        &self,
        job_id: &str,
        replica: &str,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> coreg::Result<Option<Lease>> {
        validate_job_id(job_id)?;
        check_replica(replica)?;
        let ttl = TimeDelta::from_std(ttl)
            .ok()
            .filter(|ttl| *ttl > TimeDelta::zero())
            .ok_or_else(|| {
                coreg::Error::InvalidInput(format!("lease time to live {ttl:?} is out of range"))
            })?;
        if self.get_status(job_id).await?.state.is_final() {
            self.store.delete(&queue_key(job_id)).await?;
            return Ok(None);
        }
        let (epoch, previous_holder_died) = match self.current_claim(job_id).await {
            Ok(None) => (0, false),
            Ok(Some(current)) if now < current.expires_at && current.replica != replica => {
                return Ok(None)
            }
            Ok(Some(current)) => (next_epoch(job_id, current.epoch)?, !current.released),
            // The newest claim listed vanished: two newer ones were written meanwhile, so
            // another replica is active on the job.
            Err(coreg::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let claim = Claim {
            replica: replica.to_owned(),
            epoch,
            expires_at: now + ttl,
            released: false,
        };
        if self.write_claim(job_id, &claim).await? == CreateOutcome::AlreadyExists
            || self.claim_epochs(job_id).await?.last() != Some(&epoch)
        {
            return Ok(None);
        }
        let lease = Lease {
            job_id: job_id.to_owned(),
            replica: claim.replica,
            epoch,
            expires_at: claim.expires_at,
            ttl,
            previous_holder_died,
        };
        // Checked again now that no one else can write the status: the previous holder
        // may have finished the job between the first check and our claim.
        if self.get_status(job_id).await?.state.is_final() {
            self.store.delete(&queue_key(job_id)).await?;
            self.release(lease, now).await?;
            return Ok(None);
        }
        Ok(Some(lease))
    }

    /// Extends the lease to `now` plus its time to live. [`Error::LeaseLost`] if
    /// another replica took the job: stop working on it at once.
    pub async fn renew(&self, lease: &mut Lease, now: DateTime<Utc>) -> Result<()> {
        let claim = Claim {
            replica: lease.replica.clone(),
            epoch: lease.next_epoch()?,
            expires_at: now + lease.ttl,
            released: false,
        };
        if self.write_claim(&lease.job_id, &claim).await? == CreateOutcome::AlreadyExists {
            return Err(lease.lost());
        }
        let epochs = self.claim_epochs(&lease.job_id).await?;
        if epochs.last() != Some(&claim.epoch) {
            return Err(lease.lost());
        }
        let previous = lease.epoch;
        lease.epoch = claim.epoch;
        lease.expires_at = claim.expires_at;
        self.delete_claims_before(&lease.job_id, &epochs, previous)
            .await;
        Ok(())
    }

    /// Gives the job up: the next claim expires at `now`, so any replica may take it at
    /// once. If another replica already took it over, there is nothing to give up.
    pub async fn release(&self, lease: Lease, now: DateTime<Utc>) -> coreg::Result<()> {
        let claim = Claim {
            replica: lease.replica.clone(),
            epoch: lease.next_epoch()?,
            expires_at: now,
            released: true,
        };
        if self.write_claim(&lease.job_id, &claim).await? == CreateOutcome::Created {
            let epochs = self.claim_epochs(&lease.job_id).await?;
            self.delete_claims_before(&lease.job_id, &epochs, lease.epoch)
                .await;
        }
        Ok(())
    }

    /// The job's newest claim, if any.
    pub async fn current_claim(&self, job_id: &str) -> coreg::Result<Option<Claim>> {
        validate_job_id(job_id)?;
        let Some(&epoch) = self.claim_epochs(job_id).await?.last() else {
            return Ok(None);
        };
        let path = claim_key(job_id, epoch);
        let claim: Claim = read_json(&self.store, &path).await?;
        if claim.epoch != epoch {
            return Err(corrupt(&path, format!("holds epoch {}", claim.epoch)));
        }
        Ok(Some(claim))
    }

    async fn write_claim(&self, job_id: &str, claim: &Claim) -> coreg::Result<CreateOutcome> {
        let path = claim_key(job_id, claim.epoch);
        self.store
            .put_create_only(&path, to_json(&path, claim)?)
            .await
    }

    /// The epochs in the job's lease log, ascending.
    pub(super) async fn claim_epochs(&self, job_id: &str) -> coreg::Result<Vec<u64>> {
        let dir = job_key(job_id, CLAIMS_DIR);
        let objects = self.store.list(&dir).await?;
        let mut epochs = objects
            .iter()
            .map(|object| {
                object
                    .path
                    .strip_prefix(dir.as_str())
                    .and_then(|name| name.strip_suffix(".json"))
                    .filter(|digits| digits.len() == EPOCH_DIGITS)
                    .and_then(|digits| digits.parse::<u64>().ok())
                    .ok_or_else(|| corrupt(&object.path, "not a claim of the lease log"))
            })
            .collect::<coreg::Result<Vec<u64>>>()?;
        epochs.sort_unstable();
        Ok(epochs)
    }

    /// Housekeeping: a failure only leaves extra claims for the next renewal to delete.
    async fn delete_claims_before(&self, job_id: &str, epochs: &[u64], keep_from: u64) {
        for &epoch in epochs.iter().filter(|&&epoch| epoch < keep_from) {
            if let Err(e) = self.store.delete(&claim_key(job_id, epoch)).await {
                tracing::warn!(job = job_id, epoch, "deleting an old claim: {e}");
            }
        }
    }
}
