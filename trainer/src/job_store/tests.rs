//! Scenarios across the job store's parts, each run on `memory:///` and on `file://`
//! (and the main ones on a real S3 API, moto_server).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, TimeDelta, Utc};
use coreg::store::Store;
use coreg_test_support::moto::MotoServer;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use super::claim::Claim;
use super::index::JobPage;
use super::*;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Spec {
    concept: String,
    steps: u32,
}

fn spec(concept: &str) -> Spec {
    Spec {
        concept: concept.into(),
        steps: 400,
    }
}

const TTL: Duration = Duration::from_secs(30);

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2025-01-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn at(seconds: i64) -> DateTime<Utc> {
    t0() + TimeDelta::seconds(seconds)
}

fn running() -> JobStatus {
    JobStatus {
        state: JobState::Running,
        progress: Some(TrainingProgress {
            stage: TrainingStage::Embedding,
            step: 3,
            total_steps: 400,
            losses: BTreeMap::from([("total".to_owned(), 0.25)]),
            step_seconds: Some(0.5),
        }),
        attempts: 1,
        ..JobStatus::default()
    }
}

/// Runs `scenario` on a fresh `memory:///` store, then on a fresh `file://` one.
async fn on_each_backend<F, Fut>(scenario: F)
where
    F: Fn(JobStore) -> Fut,
    Fut: Future<Output = ()>,
{
    let no_options = Vec::<(String, String)>::new();
    scenario(JobStore::new(
        Store::open("memory:///", no_options.clone()).unwrap(),
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().display());
    scenario(JobStore::new(Store::open(&url, no_options).unwrap())).await;
}

async fn create(jobs: &JobStore, id: &str, now: DateTime<Utc>) {
    let created = jobs.create(id, None, spec(id), now).await.unwrap();
    assert!(matches!(created, Creation::Created(_)), "{id}");
}

fn is_invalid_input<T: std::fmt::Debug>(result: coreg::Result<T>) -> bool {
    matches!(result, Err(coreg::Error::InvalidInput(_)))
}

fn is_not_found<T: std::fmt::Debug>(result: coreg::Result<T>) -> bool {
    matches!(result, Err(coreg::Error::NotFound { .. }))
}

fn is_lease_lost(result: Result<()>) -> bool {
    matches!(result, Err(Error::LeaseLost { .. }))
}

async fn same_request_id_makes_one_job(jobs: JobStore) {
    let id = job_id_for_request("req-42").unwrap();
    let first = jobs
        .create(&id, Some("req-42"), spec("dog"), t0())
        .await
        .unwrap();
    assert!(matches!(first, Creation::Created(_)));
    let second = jobs
        .create(&id, Some("req-42"), spec("cat"), at(5))
        .await
        .unwrap();
    let Creation::Existing(stored) = second else {
        panic!("the retried request created a second job");
    };
    let want = StoredSpec {
        id: id.clone(),
        request_id: Some("req-42".to_owned()),
        create_time: t0(),
        spec: spec("dog"),
    };
    assert_eq!(stored, want);
    assert_eq!(jobs.get_spec::<Spec>(&id).await.unwrap(), want);
    assert_eq!(jobs.list_jobs(10, "").await.unwrap().job_ids, [id.as_str()]);
    assert_eq!(jobs.queued_jobs().await.unwrap(), [id.as_str()]);
    assert_eq!(jobs.get_status(&id).await.unwrap(), JobStatus::default());
}

#[tokio::test]
async fn same_request_id_twice_makes_one_job() {
    on_each_backend(same_request_id_makes_one_job).await;
}

#[tokio::test]
async fn create_completes_the_markers_of_a_crashed_submission() {
    on_each_backend(|jobs| async move {
        // A writer that died right after the spec: no index or queue marker.
        let stored = StoredSpec {
            id: "crashed".to_owned(),
            request_id: None,
            create_time: t0(),
            spec: spec("dog"),
        };
        jobs.store()
            .put_create_only(
                "jobs/crashed/spec.json",
                Bytes::from(serde_json::to_vec(&stored).unwrap()),
            )
            .await
            .unwrap();
        assert!(jobs.list_jobs(10, "").await.unwrap().job_ids.is_empty());
        let again = jobs
            .create("crashed", None, spec("cat"), at(9))
            .await
            .unwrap();
        assert_eq!(again, Creation::Existing(stored));
        assert_eq!(jobs.list_jobs(10, "").await.unwrap().job_ids, ["crashed"]);
        assert_eq!(jobs.queued_jobs().await.unwrap(), ["crashed"]);

        // A final job is listed again but not queued again.
        let lease = jobs
            .acquire("crashed", "a", TTL, at(10))
            .await
            .unwrap()
            .unwrap();
        let done = JobStatus {
            state: JobState::Failed,
            error: Some("non-finite loss".into()),
            ..JobStatus::default()
        };
        jobs.finish(lease, done, at(11)).await.unwrap();
        for object in jobs.store().list("index/").await.unwrap() {
            jobs.store().delete(&object.path).await.unwrap();
        }
        let again = jobs
            .create("crashed", None, spec("cat"), at(12))
            .await
            .unwrap();
        assert!(matches!(again, Creation::Existing(_)));
        assert_eq!(jobs.list_jobs(10, "").await.unwrap().job_ids, ["crashed"]);
        assert!(jobs.queued_jobs().await.unwrap().is_empty());
    })
    .await;
}

async fn pages_through_25_jobs(jobs: JobStore) {
    for i in 0..25 {
        create(&jobs, &format!("job-{i:02}"), at(i)).await;
    }
    let newest_first: Vec<String> = (0..25).rev().map(|i| format!("job-{i:02}")).collect();
    let mut listed = Vec::new();
    let mut sizes = Vec::new();
    let mut token = String::new();
    loop {
        let page: JobPage = jobs.list_jobs(10, &token).await.unwrap();
        sizes.push(page.job_ids.len());
        listed.extend(page.job_ids);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(sizes, [10, 10, 5]);
    assert_eq!(listed, newest_first);
    // A page that ends exactly at the last job is the last page.
    let all = jobs.list_jobs(25, "").await.unwrap();
    assert_eq!(
        (all.job_ids, all.next_page_token),
        (newest_first, String::new())
    );
}

#[tokio::test]
async fn lists_25_jobs_newest_first_in_pages_of_10() {
    on_each_backend(pages_through_25_jobs).await;
}

#[tokio::test]
async fn bad_page_tokens_and_sizes_are_invalid_input() {
    on_each_backend(|jobs| async move {
        create(&jobs, "job", t0()).await;
        for token in ["not-a-token", "00", &hex::encode("index/123-job")] {
            assert!(is_invalid_input(jobs.list_jobs(10, token).await), "{token}");
        }
        assert!(is_invalid_input(jobs.list_jobs(0, "").await));
    })
    .await;
}

async fn lease_passes_on_after_expiry(jobs: JobStore) {
    create(&jobs, "job", t0()).await;
    let mut a = jobs.acquire("job", "a", TTL, t0()).await.unwrap().unwrap();
    assert_eq!(a.expires_at(), at(30));
    assert_eq!(jobs.claim_epochs("job").await.unwrap(), [0]);
    assert!(jobs
        .acquire("job", "b", TTL, at(29))
        .await
        .unwrap()
        .is_none());
    jobs.put_status(&a, running(), at(10)).await.unwrap();

    let mut b = jobs
        .acquire("job", "b", TTL, at(30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(jobs.claim_epochs("job").await.unwrap(), [0, 1]);
    assert!(is_lease_lost(jobs.renew(&mut a, at(31)).await));
    assert!(is_lease_lost(
        jobs.put_status(&a, JobStatus::default(), at(31)).await
    ));
    let status = jobs.get_status("job").await.unwrap();
    assert_eq!(
        (status.update_time, status.progress),
        (Some(at(10)), running().progress)
    );

    jobs.renew(&mut b, at(40)).await.unwrap();
    assert_eq!(b.expires_at(), at(70));
    assert!(jobs
        .acquire("job", "a", TTL, at(60))
        .await
        .unwrap()
        .is_none());
    let current = jobs.current_claim("job").await.unwrap().unwrap();
    assert_eq!(
        current,
        Claim {
            replica: "b".into(),
            epoch: 2,
            expires_at: at(70),
            released: false,
        }
    );
}

#[tokio::test]
async fn an_expired_lease_passes_to_another_replica() {
    on_each_backend(lease_passes_on_after_expiry).await;
}

#[tokio::test]
async fn a_stalled_holder_cannot_renew_into_a_deleted_epoch() {
    on_each_backend(|jobs| async move {
        create(&jobs, "job", t0()).await;
        let mut a = jobs.acquire("job", "a", TTL, t0()).await.unwrap().unwrap();
        let mut b = jobs
            .acquire("job", "b", TTL, at(31))
            .await
            .unwrap()
            .unwrap();
        jobs.renew(&mut b, at(40)).await.unwrap();
        jobs.renew(&mut b, at(50)).await.unwrap();
        // Only the newest two claims are kept: epoch 1, the one `a` would write next, is
        // free again.
        assert_eq!(jobs.claim_epochs("job").await.unwrap(), [2, 3]);
        assert!(is_lease_lost(jobs.renew(&mut a, at(55)).await));
        assert_eq!(
            jobs.current_claim("job").await.unwrap().unwrap().replica,
            "b"
        );
        // `b` keeps the job, and its next renewal deletes what `a` left.
        jobs.renew(&mut b, at(60)).await.unwrap();
        assert_eq!(jobs.claim_epochs("job").await.unwrap(), [3, 4]);
        jobs.put_status(&b, running(), at(61)).await.unwrap();
    })
    .await;
}

/// Eight replicas race for `job` at `now`; returns the winners' names.
async fn race(jobs: &JobStore, job: &str, now: DateTime<Utc>) -> Vec<String> {
    let mut racers = JoinSet::new();
    for i in 0..8 {
        let (jobs, job) = (jobs.clone(), job.to_owned());
        racers.spawn(async move {
            let replica = format!("replica-{i}");
            let lease = jobs.acquire(&job, &replica, TTL, now).await.unwrap();
            lease.map(|_| replica)
        });
    }
    racers.join_all().await.into_iter().flatten().collect()
}

async fn racing_replicas(jobs: JobStore) {
    for job in ["job-a", "job-b", "job-c"] {
        create(&jobs, job, t0()).await;
        let winners = race(&jobs, job, at(1)).await;
        assert_eq!(winners.len(), 1, "{job}: {winners:?}");
        assert_eq!(jobs.claim_epochs(job).await.unwrap(), [0]);
        // Again once the winner's lease expired.
        let winners = race(&jobs, job, at(100)).await;
        assert_eq!(winners.len(), 1, "{job}: {winners:?}");
        assert_eq!(
            jobs.current_claim(job).await.unwrap().unwrap().replica,
            winners[0]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_acquires_of_a_free_job_have_one_winner() {
    on_each_backend(racing_replicas).await;
}

#[tokio::test]
async fn release_lets_another_replica_take_the_job_at_once() {
    on_each_backend(|jobs| async move {
        create(&jobs, "job", t0()).await;
        let a = jobs.acquire("job", "a", TTL, t0()).await.unwrap().unwrap();
        jobs.release(a, at(1)).await.unwrap();
        let b = jobs.acquire("job", "b", TTL, at(1)).await.unwrap().unwrap();
        let current = jobs.current_claim("job").await.unwrap().unwrap();
        assert_eq!((current.epoch, current.expires_at), (2, b.expires_at()));
        assert!(jobs
            .acquire("job", "a", TTL, at(2))
            .await
            .unwrap()
            .is_none());
    })
    .await;
}

#[tokio::test]
async fn only_a_holder_that_died_with_the_job_counts_as_a_crash() {
    on_each_backend(|jobs| async move {
        create(&jobs, "job", t0()).await;
        let first = jobs.acquire("job", "a", TTL, t0()).await.unwrap().unwrap();
        assert!(
            !first.previous_holder_died(),
            "a new job has no previous holder"
        );
        // Given back on purpose (shutdown): not a crash.
        jobs.release(first, at(1)).await.unwrap();
        let second = jobs.acquire("job", "b", TTL, at(2)).await.unwrap().unwrap();
        assert!(!second.previous_holder_died());
        // `b` dies holding the job: whoever takes it after expiry inherits a crash.
        drop(second);
        let third = jobs
            .acquire("job", "c", TTL, at(40))
            .await
            .unwrap()
            .unwrap();
        assert!(third.previous_holder_died());
        // `c` restarts under its own name and takes its unexpired claim back: the
        // process that held it died too.
        let fourth = jobs
            .acquire("job", "c", TTL, at(41))
            .await
            .unwrap()
            .unwrap();
        assert!(fourth.previous_holder_died());
    })
    .await;
}

#[tokio::test]
async fn a_replica_takes_back_its_own_claim() {
    on_each_backend(|jobs| async move {
        create(&jobs, "job", t0()).await;
        let first = jobs.acquire("job", "a", TTL, t0()).await.unwrap().unwrap();
        let again = jobs.acquire("job", "a", TTL, at(5)).await.unwrap().unwrap();
        assert_eq!(again.expires_at(), at(35));
        assert_eq!(jobs.claim_epochs("job").await.unwrap(), [0, 1]);
        assert!(is_lease_lost(
            jobs.finish(
                first,
                JobStatus {
                    state: JobState::Succeeded,
                    ..JobStatus::default()
                },
                at(6)
            )
            .await
        ));
    })
    .await;
}

async fn finished_jobs_stay_finished(jobs: JobStore) {
    create(&jobs, "job", t0()).await;
    create(&jobs, "other", t0()).await;
    let lease = jobs.acquire("job", "a", TTL, t0()).await.unwrap().unwrap();
    assert!(is_invalid_input_job(
        jobs.finish(lease, running(), at(1)).await
    ));
    let lease = jobs.acquire("job", "a", TTL, at(2)).await.unwrap().unwrap();
    let done = JobStatus {
        state: JobState::Succeeded,
        concept_version: Some("job".into()),
        attempts: 1,
        ..JobStatus::default()
    };
    jobs.finish(lease, done.clone(), at(5)).await.unwrap();
    assert_eq!(jobs.queued_jobs().await.unwrap(), ["other"]);
    let status = jobs.get_status("job").await.unwrap();
    assert_eq!(
        status,
        JobStatus {
            update_time: Some(at(5)),
            ..done
        }
    );
    // Released, yet never run again.
    assert!(jobs
        .acquire("job", "b", TTL, at(5))
        .await
        .unwrap()
        .is_none());
    assert!(jobs
        .acquire("job", "a", TTL, at(1000))
        .await
        .unwrap()
        .is_none());
    // A queue marker left by a crash is cleared by the next worker that tries it.
    jobs.store()
        .put_create_only("queue/job", Bytes::new())
        .await
        .unwrap();
    assert!(jobs
        .acquire("job", "b", TTL, at(1001))
        .await
        .unwrap()
        .is_none());
    assert_eq!(jobs.queued_jobs().await.unwrap(), ["other"]);
}

fn is_invalid_input_job(result: Result<()>) -> bool {
    matches!(result, Err(Error::Coreg(coreg::Error::InvalidInput(_))))
}

#[tokio::test]
async fn a_finished_job_leaves_the_queue_and_is_never_run_again() {
    on_each_backend(finished_jobs_stay_finished).await;
}

#[tokio::test]
async fn a_holder_that_lost_its_lease_cannot_finish() {
    on_each_backend(|jobs| async move {
        create(&jobs, "job", t0()).await;
        let a = jobs.acquire("job", "a", TTL, t0()).await.unwrap().unwrap();
        let _b = jobs
            .acquire("job", "b", TTL, at(30))
            .await
            .unwrap()
            .unwrap();
        let done = JobStatus {
            state: JobState::Cancelled,
            ..JobStatus::default()
        };
        assert!(is_lease_lost(jobs.finish(a, done, at(31)).await));
        assert_eq!(jobs.get_status("job").await.unwrap(), JobStatus::default());
        assert_eq!(jobs.queued_jobs().await.unwrap(), ["job"]);
    })
    .await;
}

#[tokio::test]
async fn cancel_requests_round_trip() {
    on_each_backend(|jobs| async move {
        create(&jobs, "job", t0()).await;
        assert!(!jobs.cancel_requested("job").await.unwrap());
        jobs.request_cancel("job").await.unwrap();
        assert!(jobs.cancel_requested("job").await.unwrap());
        jobs.request_cancel("job").await.unwrap();
        assert!(jobs.cancel_requested("job").await.unwrap());
        assert!(is_not_found(jobs.request_cancel("unknown").await));
    })
    .await;
}

#[tokio::test]
async fn unknown_jobs_are_not_found_and_unwritten_status_is_queued() {
    on_each_backend(|jobs| async move {
        assert!(is_not_found(jobs.get_spec::<Spec>("nope").await));
        assert!(is_not_found(jobs.get_status("nope").await));
        assert!(is_not_found(jobs.acquire("nope", "a", TTL, t0()).await));
        let id = new_job_id(t0());
        create(&jobs, &id, t0()).await;
        let status = jobs.get_status(&id).await.unwrap();
        assert_eq!((status.state, status.update_time), (JobState::Queued, None));
    })
    .await;
}

#[tokio::test]
async fn hostile_ids_are_refused_and_nothing_is_stored() {
    on_each_backend(|jobs| async move {
        let long = "a".repeat(300);
        for id in ["../x", "", "a/b", "Job", "x..y", "/abs", long.as_str()] {
            assert!(
                is_invalid_input(jobs.create(id, None, spec("dog"), t0()).await),
                "{id:?}"
            );
            assert!(is_invalid_input(jobs.get_spec::<Spec>(id).await), "{id:?}");
            assert!(is_invalid_input(jobs.get_status(id).await), "{id:?}");
            assert!(is_invalid_input(jobs.request_cancel(id).await), "{id:?}");
            assert!(is_invalid_input(jobs.cancel_requested(id).await), "{id:?}");
            assert!(
                is_invalid_input(jobs.acquire(id, "a", TTL, t0()).await),
                "{id:?}"
            );
            assert!(is_invalid_input(jobs.current_claim(id).await), "{id:?}");
        }
        for request_id in ["", "a b", "../x", &"r".repeat(65)] {
            let created = jobs
                .create("job", Some(request_id), spec("dog"), t0())
                .await;
            assert!(is_invalid_input(created), "{request_id:?}");
        }
        assert!(jobs.store().list("").await.unwrap().is_empty());
    })
    .await;
}

#[tokio::test]
async fn bad_lease_arguments_and_non_finite_losses_are_refused() {
    on_each_backend(|jobs| async move {
        create(&jobs, "job", t0()).await;
        assert!(is_invalid_input(jobs.acquire("job", "", TTL, t0()).await));
        assert!(is_invalid_input(
            jobs.acquire("job", "a\n", TTL, t0()).await
        ));
        assert!(is_invalid_input(
            jobs.acquire("job", "a", Duration::ZERO, t0()).await
        ));
        let lease = jobs.acquire("job", "a", TTL, t0()).await.unwrap().unwrap();
        let mut status = running();
        if let Some(progress) = &mut status.progress {
            progress.losses.insert("attention".into(), f64::NAN);
        }
        assert!(is_invalid_input_job(
            jobs.put_status(&lease, status, at(1)).await
        ));
        assert_eq!(jobs.get_status("job").await.unwrap(), JobStatus::default());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn works_on_a_real_s3_api() {
    let moto = MotoServer::start();
    moto.create_bucket("jobs");
    let open = |prefix: &str| {
        JobStore::new(Store::open(&format!("s3://jobs/{prefix}"), moto.options()).unwrap())
    };
    same_request_id_makes_one_job(open("request")).await;
    pages_through_25_jobs(open("pages")).await;
    lease_passes_on_after_expiry(open("lease")).await;
    racing_replicas(open("race")).await;
    finished_jobs_stay_finished(open("finish")).await;
    // Each scenario stayed under its own prefix.
    let everything = Store::open("s3://jobs", moto.options()).unwrap();
    let prefixes: BTreeSet<String> = everything
        .list("")
        .await
        .unwrap()
        .into_iter()
        .filter_map(|object| object.path.split('/').next().map(str::to_owned))
        .collect();
    assert_eq!(
        prefixes,
        BTreeSet::from(["finish", "lease", "pages", "race", "request"].map(String::from))
    );
}
