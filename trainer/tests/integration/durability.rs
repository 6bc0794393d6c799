//! The trainer's promises about jobs when the worst happens at the worst moment: a
//! write phase longer than the lease, a replica that lost its job mid-write, a process
//! that dies between the manifest and the result, kill -9 and SIGTERM loops, a panic
//! on the model thread, a cancel while the concept is written. The moments are made
//! exact with the trainer's failpoints (`COREG_FAILPOINTS`, debug builds only).

use std::path::Path;
use std::time::Duration;

use coreg_proto::v1 as pb;
use coreg_test_support::fixture::Fixture;
use coreg_test_support::photos::read_all as photos;
use coreg_test_support::process::Server;
use coreg_test_support::trainer::{create, get, spec, starts_of, state, wait_for, wait_succeeded};
use tonic::Code;

use crate::common::server::TrainerServer;
use crate::common::{self, JobFile};

/// Generous: the tests share two cores with each other.
const JOB_TIMEOUT: Duration = Duration::from_secs(600);
/// The lease every replica here runs with: short, so that expiries happen in a test.
const LEASE_SECONDS: &str = "3";

/// A replica named `name` with a 3 s lease and `failpoints` armed.
fn replica(fx: &Fixture, name: &str, failpoints: &str) -> Server {
    Server::start(
        &fx.path("model"),
        &fx.store_url(),
        &fx.path(&format!("{name}.log")),
        &[
            ("COREG_REPLICA_ID", name),
            ("COREG_LEASE_SECONDS", LEASE_SECONDS),
            ("COREG_FAILPOINTS", failpoints),
        ],
    )
}

/// A file of the `file://` store, if it exists.
fn stored_file(fx: &Fixture, key: &str) -> Option<Vec<u8>> {
    std::fs::read(fx.path("store").join(key)).ok()
}

/// The job's `status.json` as the store holds it (fields the API does not show:
/// failures, crashes).
fn stored_status(fx: &Fixture, id: &str) -> serde_json::Value {
    let bytes = stored_file(fx, &format!("jobs/{id}/status.json")).expect("a status");
    serde_json::from_slice(&bytes).unwrap()
}

/// The paths under `prefix` in the fixture's store.
async fn listed(fx: &Fixture, prefix: &str) -> Vec<String> {
    let objects = fx.store().list(prefix).await.unwrap();
    objects.into_iter().map(|object| object.path).collect()
}

/// The checkpoint record and state files the job has in the store.
async fn checkpoints_of(fx: &Fixture, id: &str) -> Vec<String> {
    let mut paths = listed(fx, &format!("jobs/{id}/")).await;
    paths.retain(|path| path.contains("checkpoint"));
    paths
}

fn manifest_exists(fx: &Fixture, version: &str) -> bool {
    stored_file(fx, &format!("concepts/toy/{version}/manifest.json")).is_some()
}

/// Waits until the job runs with `attempts` starts, in stage 2 past `past` steps.
async fn wait_running(server: &Server, id: &str, attempts: u32, past: u32) {
    let mut client = server.client().await;
    wait_for(&mut client, id, JOB_TIMEOUT, "running in stage 2", |job| {
        state(job) == pb::JobState::Running
            && job.attempts == attempts
            && job
                .progress
                .as_ref()
                .is_some_and(|p| p.stage == pb::TrainingStage::Unet as i32 && p.step > past)
    })
    .await;
}

/// Waits until the job shows the writing phase.
async fn wait_writing(server: &Server, id: &str) {
    let mut client = server.client().await;
    wait_for(&mut client, id, JOB_TIMEOUT, "the writing phase", |job| {
        job.progress
            .as_ref()
            .is_some_and(|p| p.stage == pb::TrainingStage::Writing as i32)
    })
    .await;
}

/// Issue: a published concept whose `result.json` was lost (the process died, or the
/// PUT failed) was retrained and ended FAILED with exit 65. Now the run finds its own
/// manifest and ends done, exit 0, without training; and a version another job
/// published is refused before any training.
#[test]
fn a_published_job_whose_result_was_lost_is_done_and_a_taken_version_is_refused_early() {
    let fx = Fixture::with_photos();
    let store = fx.store_url();
    let job = fx.job("published", &store, "");
    let first = common::run(&job, "published");
    assert_eq!(first.status.code(), Some(0), "{first:?}");
    let manifest = stored_file(&fx, "concepts/toy/published/manifest.json").unwrap();
    std::fs::remove_file(fx.path("store/jobs/published/result.json")).unwrap();

    let again = common::run(&job, "published");
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert_eq!(again.status.code(), Some(0), "{again:?}");
    assert!(stdout.contains("already published"), "{stdout}");
    assert_eq!(
        stored_file(&fx, "concepts/toy/published/manifest.json").unwrap(),
        manifest,
        "the manifest is the first run's, untouched"
    );
    assert!(stored_file(&fx, "jobs/published/result.json").is_some());

    // Another job asking for the same version: refused as bad input before it
    // records itself or trains a step.
    let other = common::run(&job, "someone-else");
    coreg_test_support::process::assert_exit(&other, 65, "already exists");
    assert!(common::list(&store, "jobs/someone-else/").is_empty());
}

/// Issue: the lease was renewed only between steps, so a write phase longer than the
/// lease let a second replica take the job mid-upload (two replicas on one job, the
/// job FAILED "already exists"). Now renewal runs on its own: the job stays with its
/// replica through an 8 s stall after a step and an 8 s stall before the manifest, on
/// a 3 s lease, with a second replica waiting for work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_holds_through_work_longer_than_itself() {
    let fx = Fixture::with_photos();
    let photos = photos(&fx.path("photos"));
    let slow = replica(
        &fx,
        "slow",
        "stage2-step-2=sleep(8000);before-manifest=sleep(8000)",
    );
    slow.wait_serving().await;
    let mut client = slow.client().await;
    let job = create(&mut client, "stall", spec(&photos, "stall", 4, 4, 2)).await;
    wait_for(&mut client, &job.id, JOB_TIMEOUT, "running", |job| {
        state(job) == pb::JobState::Running
    })
    .await;
    let idle = replica(&fx, "idle", "");
    idle.wait_serving().await;

    let done = wait_succeeded(&mut client, &job.id, JOB_TIMEOUT).await;
    assert_eq!(done.attempts, 1, "{done:?}");
    assert_eq!(starts_of(&idle, &job.id), 0, "{}", idle.log_text());
    assert!(slow.log_text().contains("failpoint fired"));
}

/// A replica whose job was taken over while it wrote the concept publishes nothing,
/// records no result and deletes no checkpoint: the fence stops every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_lost_its_job_writes_nothing_more() {
    let fx = Fixture::with_photos();
    let photos = photos(&fx.path("photos"));
    let holder = replica(&fx, "holder", "before-manifest=sleep(6000)");
    holder.wait_serving().await;
    let mut client = holder.client().await;
    let job = create(&mut client, "taken", spec(&photos, "taken", 4, 4, 2)).await;
    // In the stall before the manifest.
    let deadline = std::time::Instant::now() + JOB_TIMEOUT;
    while !holder.log_text().contains("failpoint fired") {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            holder.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Another replica takes the job over: a newer claim in the lease log, as an
    // acquisition after a missed renewal would write.
    let claims = listed(&fx, &format!("jobs/{}/claims/", job.id)).await;
    let newest: u64 = claims
        .iter()
        .filter_map(|p| p.rsplit('/').next()?.strip_suffix(".json")?.parse().ok())
        .max()
        .unwrap();
    let epoch = newest + 5;
    let claim = serde_json::json!({
        "replica": "thief",
        "epoch": epoch,
        "expires_at": (chrono::Utc::now() + chrono::TimeDelta::hours(1)).to_rfc3339(),
    });
    let path = fx
        .path("store")
        .join(format!("jobs/{}/claims/{epoch:020}.json", job.id));
    std::fs::write(path, claim.to_string()).unwrap();

    tokio::time::sleep(Duration::from_secs(9)).await;
    assert!(
        holder
            .log_text()
            .contains("another replica took the job over"),
        "{}",
        holder.log_text()
    );
    assert!(!manifest_exists(&fx, "taken"), "the lost replica published");
    assert!(stored_file(&fx, &format!("jobs/{}/result.json", job.id)).is_none());
    assert!(
        !checkpoints_of(&fx, &job.id).await.is_empty(),
        "the lost replica deleted the new holder's checkpoints"
    );
    assert_eq!(
        state(&get(&mut client, &job.id).await),
        pb::JobState::Running
    );
}

/// Issue: a process killed between the manifest and the result left a job that
/// retrained and ended FAILED. Now the next replica finds the job's own manifest and
/// ends it SUCCEEDED, counting the crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_manifest_and_result_ends_succeeded() {
    let fx = Fixture::with_photos();
    let photos = photos(&fx.path("photos"));
    let mut doomed = replica(&fx, "doomed", "after-manifest=abort");
    doomed.wait_serving().await;
    let job = create(
        &mut doomed.client().await,
        "half",
        spec(&photos, "half", 4, 4, 2),
    )
    .await;
    assert_eq!(doomed.wait_exit(JOB_TIMEOUT), None, "aborted, not exited");
    let manifest = stored_file(&fx, "concepts/toy/half/manifest.json").expect("published");

    let heir = replica(&fx, "heir", "");
    heir.wait_serving().await;
    let done = wait_succeeded(&mut heir.client().await, &job.id, JOB_TIMEOUT).await;
    assert_eq!(done.attempts, 2, "{done:?}");
    assert!(heir.log_text().contains("already published"));
    assert_eq!(
        stored_file(&fx, "concepts/toy/half/manifest.json").unwrap(),
        manifest
    );
    assert_eq!(stored_status(&fx, &job.id)["crashes"], 1);
    assert!(checkpoints_of(&fx, &job.id).await.is_empty());
}

/// Starts replica `name` and waits until job `id` runs its `attempt`-th start, in stage
/// 2 past `past` steps; with `id` empty it first submits a long job as `version`.
async fn running_replica(
    fx: &Fixture,
    name: &str,
    (id, version): (&mut String, &str),
    attempt: u32,
    past: u32,
) -> Server {
    let server = replica(fx, name, "");
    server.wait_serving().await;
    if id.is_empty() {
        let photos = photos(&fx.path("photos"));
        let spec = spec(&photos, version, 4, 400, 5);
        *id = create(&mut server.client().await, version, spec).await.id;
    }
    wait_running(&server, id, attempt, past).await;
    server
}

/// Issue: SIGTERM give-backs counted as failed attempts (the 5th rolling update of a
/// long job failed it). Five SIGTERMs later the job still ends SUCCEEDED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_give_backs_never_fail_a_job() {
    let fx = Fixture::with_photos();
    let mut id = String::new();
    for attempt in 1..=5 {
        let name = format!("rolling-{attempt}");
        let mut server = running_replica(&fx, &name, (&mut id, "rolling"), attempt, 0).await;
        assert_eq!(server.terminate(), Some(0), "{}", server.log_text());
        let status = stored_status(&fx, &id);
        assert_eq!(status["state"], "queued", "given back: {status}");
    }
    let last = replica(&fx, "rolling-last", "");
    last.wait_serving().await;
    let done = wait_succeeded(&mut last.client().await, &id, JOB_TIMEOUT).await;
    assert_eq!(done.attempts, 6, "{done:?}");
    let status = stored_status(&fx, &id);
    let counted = (&status["failures"], &status["crashes"]);
    assert_eq!(counted, (&0.into(), &0.into()), "{status}");
}

/// Issue: crashes (kill -9, OOM, panic) were never counted, so a job that kills its
/// replica cycled through the fleet forever. Killed with it three times (the default
/// `max_crashes`), the job ends FAILED saying so, and its checkpoints are dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_replicas_keep_dying_ends_failed() {
    let fx = Fixture::with_photos();
    let mut id = String::new();
    for attempt in 1..=3 {
        let name = format!("victim-{attempt}");
        let mut server = running_replica(&fx, &name, (&mut id, "deadly"), attempt, 5).await;
        server.kill();
    }
    let last = replica(&fx, "victim-last", "");
    last.wait_serving().await;
    let mut client = last.client().await;
    let ended = wait_for(&mut client, &id, JOB_TIMEOUT, "FAILED", |job| {
        state(job) == pb::JobState::Failed
    })
    .await;
    assert!(ended.error.contains("died with it 3 times"), "{ended:?}");
    assert_eq!(ended.attempts, 3, "{ended:?}");
    assert!(
        checkpoints_of(&fx, &id).await.is_empty(),
        "{:?}",
        checkpoints_of(&fx, &id).await
    );
}

/// Issue: a panic on the model thread left a replica that said SERVING and never
/// trained again. Now the replica turns NOT_SERVING and exits non-zero (Kubernetes
/// restarts it), the job is given back with the crash counted, and another replica
/// finishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_on_the_model_thread_takes_the_replica_out() {
    let fx = Fixture::with_photos();
    let photos = photos(&fx.path("photos"));
    let mut broken = replica(&fx, "broken", "stage2-step-3=panic");
    broken.wait_serving().await;
    let job = create(
        &mut broken.client().await,
        "panics",
        spec(&photos, "panics", 4, 8, 2),
    )
    .await;
    let code = broken.wait_exit(JOB_TIMEOUT);
    let log = broken.log_text();
    assert_eq!(code, Some(70), "{log}");
    assert!(log.contains("NOT_SERVING"), "{log}");
    let status = stored_status(&fx, &job.id);
    assert_eq!(status["state"], "queued", "{status}");
    assert_eq!(status["crashes"], 1, "{status}");
    assert!(
        status["error"].as_str().unwrap().contains("panicked"),
        "{status}"
    );

    let healthy = replica(&fx, "healthy", "");
    healthy.wait_serving().await;
    let done = wait_succeeded(&mut healthy.client().await, &job.id, JOB_TIMEOUT).await;
    assert_eq!(done.attempts, 2, "{done:?}");
}

/// Issue: a cancelled QUEUED job kept its checkpoints, and a cancel during the writing
/// phase was ignored. Both now end CANCELLED with nothing left: no checkpoint, no
/// manifest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_drops_a_queued_job_s_checkpoints_and_stops_the_writing_phase() {
    let fx = Fixture::with_photos();
    let photos = photos(&fx.path("photos"));

    // Queued with checkpoints: SIGTERMed mid stage 2, then cancelled while the next
    // replica is up but not yet taking jobs.
    let mut first = replica(&fx, "first", "");
    first.wait_serving().await;
    let queued = create(
        &mut first.client().await,
        "queued",
        spec(&photos, "queued", 4, 400, 5),
    )
    .await;
    wait_running(&first, &queued.id, 1, 5).await;
    assert_eq!(first.terminate(), Some(0));
    assert!(!checkpoints_of(&fx, &queued.id).await.is_empty());
    let second = replica(
        &fx,
        "second",
        "before-taking-jobs=sleep(4000);before-manifest=sleep(4000)",
    );
    second.wait_serving().await;
    let mut client = second.client().await;
    let cancelled = client
        .cancel_training_job(pb::CancelTrainingJobRequest {
            id: queued.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&cancelled), pb::JobState::Cancelled, "{cancelled:?}");
    assert!(checkpoints_of(&fx, &queued.id).await.is_empty());

    // Cancelled while its concept is written: no manifest, no checkpoints.
    let writing = create(&mut client, "writing", spec(&photos, "writing", 4, 4, 2)).await;
    wait_writing(&second, &writing.id).await;
    client
        .cancel_training_job(pb::CancelTrainingJobRequest {
            id: writing.id.clone(),
        })
        .await
        .unwrap();
    let ended = wait_for(
        &mut client,
        &writing.id,
        JOB_TIMEOUT,
        "a final state",
        |job| state(job) != pb::JobState::Running && state(job) != pb::JobState::Queued,
    )
    .await;
    assert_eq!(state(&ended), pb::JobState::Cancelled, "{ended:?}");
    assert!(!manifest_exists(&fx, "writing"));
    assert!(checkpoints_of(&fx, &writing.id).await.is_empty());
}

/// Issue: a create retried after its first call died part-way returned as soon as the
/// spec existed, leaving the job QUEUED forever without its queue marker; and a taken
/// concept version was accepted, to fail after the whole training.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_create_repairs_its_markers_and_a_taken_version_is_already_exists() {
    let fx = Fixture::with_photos();
    let photos = photos(&fx.path("photos"));
    // The worker sleeps first: the job stays queued while its markers are removed.
    let server = replica(&fx, "api", "before-taking-jobs=sleep(5000)");
    server.wait_serving().await;
    let mut client = server.client().await;
    let job = create(&mut client, "repair", spec(&photos, "repaired", 4, 4, 2)).await;
    let markers = || async {
        let mut found = listed(&fx, "queue/").await;
        found.extend(listed(&fx, "index/").await);
        found
    };
    let before = markers().await;
    assert_eq!(before.len(), 2, "{before:?}");
    for marker in &before {
        std::fs::remove_file(fx.path("store").join(marker)).unwrap();
    }
    let again = create(&mut client, "repair", spec(&photos, "repaired", 4, 4, 2)).await;
    assert_eq!(again.id, job.id);
    assert_eq!(
        markers().await,
        before,
        "the retried create wrote the markers back"
    );
    wait_succeeded(&mut client, &job.id, JOB_TIMEOUT).await;

    let taken = client
        .create_training_job(pb::CreateTrainingJobRequest {
            request_id: String::new(),
            spec: Some(spec(&photos, "repaired", 4, 4, 2)),
        })
        .await
        .expect_err("a job for a version that exists");
    assert_eq!(taken.code(), Code::AlreadyExists, "{taken:?}");
    assert!(taken.message().contains("repaired"), "{taken:?}");
    assert!(Path::new(&fx.path("store/concepts/toy/repaired/manifest.json")).exists());
}
