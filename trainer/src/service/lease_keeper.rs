//! Keeping a job's lease while the model thread works on it: renewal runs on its own
//! task, every third of the time to live, whatever the model thread is doing — a step,
//! a minute-long checkpoint upload, the stage 1→2 set-up, hashing the base model,
//! publishing the concept. Steps were the only renewal points before, and a write
//! longer than the lease let a second replica take the job mid-upload.
//!
//! The model thread asks [`KeptLease::holds`] before every write it makes for the job
//! (the fence): a write starts only while the lease is unexpired with a margin, so a
//! replica that lost the job (taken over, or unrenewable through a store outage)
//! never publishes and never deletes. Object stores have no fencing tokens, so a write
//! already under way when the lease lapses still completes; the margin (a quarter of
//! the time to live) and renewals at a third of it keep that window closed unless the
//! store itself is unreachable for most of a lease, when the write fails as well.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use tokio::runtime::Handle;
use tokio::sync::{oneshot, Mutex};

use crate::job_store::{self, JobStatus, JobStore, Lease};

/// How often a failed renewal is retried while the lease still runs.
const RETRY: Duration = Duration::from_millis(500);

/// What the renewal task and the model thread share.
struct Shared {
    lease: Mutex<Lease>,
    /// The lease's expiry as of its last renewal, in Unix milliseconds.
    expires_at_ms: AtomicI64,
    /// Another replica holds the job now: nothing more may be written for it.
    lost: AtomicBool,
}

/// A lease renewed in the background until [`KeptLease::stop`] hands it back.
/// Dropping it (a panic unwinding the model thread) stops the renewals and leaves the
/// lease to expire: the next holder counts that as a crash.
pub struct KeptLease {
    shared: Arc<Shared>,
    stop: oneshot::Sender<()>,
    task: RenewalTask,
    runtime: Handle,
    ttl: TimeDelta,
}

/// The renewal task, aborted when dropped.
struct RenewalTask(Option<tokio::task::JoinHandle<()>>);

impl Drop for RenewalTask {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

impl KeptLease {
    /// Starts renewing `lease` on `runtime`.
    pub fn keep(jobs: JobStore, lease: Lease, runtime: Handle) -> KeptLease {
        let ttl = lease.ttl();
        let shared = Arc::new(Shared {
            expires_at_ms: AtomicI64::new(lease.expires_at().timestamp_millis()),
            lease: Mutex::new(lease),
            lost: AtomicBool::new(false),
        });
        let (stop, stopped) = oneshot::channel();
        let task = runtime.spawn(renew_until_stopped(jobs, shared.clone(), stopped));
        KeptLease {
            shared,
            stop,
            task: RenewalTask(Some(task)),
            runtime,
            ttl,
        }
    }

    /// Whether another replica took the job over.
    pub fn lost(&self) -> bool {
        self.shared.lost.load(Ordering::SeqCst)
    }

    /// The fence: whether a write for the job may start now. False once the job was
    /// taken over, and while the lease is within a quarter of its time to live of
    /// expiring (renewals are failing).
    pub fn holds(&self) -> bool {
        let expires_at = self.shared.expires_at_ms.load(Ordering::SeqCst);
        let margin = self.ttl.num_milliseconds() / 4;
        !self.lost() && Utc::now().timestamp_millis() < expires_at - margin
    }

    /// The lease's expiry as of its last renewal.
    pub fn expires_at(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.shared.expires_at_ms.load(Ordering::SeqCst))
            .unwrap_or_default()
    }

    /// Writes the job's status under the lease (called from the model thread).
    pub fn put_status(&self, jobs: &JobStore, status: JobStatus) -> job_store::Result<()> {
        self.runtime.block_on(async {
            let lease = self.shared.lease.lock().await;
            jobs.put_status(&lease, status, Utc::now()).await
        })
    }

    /// Stops renewing and hands the lease back to finish or release it; `None` if
    /// another replica took the job.
    pub fn stop(self) -> Option<Lease> {
        let KeptLease {
            shared,
            stop,
            mut task,
            runtime,
            ..
        } = self;
        let _ = stop.send(());
        if let Some(task) = task.0.take() {
            let _ = runtime.block_on(task);
        }
        if shared.lost.load(Ordering::SeqCst) {
            return None;
        }
        Arc::try_unwrap(shared)
            .ok()
            .map(|shared| shared.lease.into_inner())
    }
}

async fn renew_until_stopped(
    jobs: JobStore,
    shared: Arc<Shared>,
    mut stopped: oneshot::Receiver<()>,
) {
    let every = {
        let lease = shared.lease.lock().await;
        (lease.ttl() / 3).to_std().unwrap_or(Duration::from_secs(1))
    };
    let mut wait = every;
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            () = tokio::time::sleep(wait) => {}
        }
        let mut lease = shared.lease.lock().await;
        match jobs.renew(&mut lease, Utc::now()).await {
            Ok(()) => {
                shared
                    .expires_at_ms
                    .store(lease.expires_at().timestamp_millis(), Ordering::SeqCst);
                wait = every;
            }
            Err(job_store::Error::LeaseLost { .. }) => {
                tracing::warn!(job = lease.job_id(), "another replica took the job over");
                shared.lost.store(true, Ordering::SeqCst);
                return;
            }
            // The store is failing: keep trying. Even past the expiry a renewal that
            // gets through is sound, since it succeeds only if no one claimed the
            // next epoch; meanwhile the fence stops every write.
            Err(e) => {
                tracing::warn!(job = lease.job_id(), "renewing the lease failed: {e}");
                wait = RETRY.min(every);
            }
        }
    }
}
