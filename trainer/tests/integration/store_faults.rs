//! What real stores do to a job, made to happen on the tiny model: the S3 API (moto)
//! behind toxiproxy, with uploads throttled until a checkpoint and the concept take
//! many leases to store, and with every request failing for 30 s in the middle of
//! stage 2. Each time the job stays with its replica and ends SUCCEEDED, published
//! once, with nothing counted against it.

use std::time::{Duration, Instant};

use coreg::artifact::read_manifest;
use coreg::store::Store;
use coreg_proto::v1 as pb;
use coreg_test_support::faults::{FaultProxy, Way};
use coreg_test_support::fixture::Fixture;
use coreg_test_support::moto::MotoServer;
use coreg_test_support::photos::read_all as photos;
use coreg_test_support::process::Server;
use coreg_test_support::trainer::{create, spec, starts_of, state, wait_for, wait_succeeded};
use serde_json::json;

use crate::common::server::TrainerServer;

const JOB_TIMEOUT: Duration = Duration::from_secs(600);

/// A store behind the fault proxy: moto, its bucket, and the proxy in front of it.
struct FaultyStore {
    moto: MotoServer,
    proxy: FaultProxy,
}

impl FaultyStore {
    fn start() -> FaultyStore {
        let moto = MotoServer::start();
        moto.create_bucket("faulty");
        let proxy = FaultProxy::start(moto.address());
        FaultyStore { moto, proxy }
    }

    /// Replica `name` reaching the store through the proxy, with a `lease` s lease.
    fn replica(&self, fx: &Fixture, name: &str, lease: &str) -> Server {
        let mut env = self.proxy.store_env(&self.moto.options());
        env.extend([
            ("COREG_REPLICA_ID".to_owned(), name.to_owned()),
            ("COREG_LEASE_SECONDS".to_owned(), lease.to_owned()),
        ]);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Server::start(
            &fx.path("model"),
            "s3://faulty",
            &fx.path(&format!("{name}.log")),
            &env,
        )
    }

    /// The store itself, past the proxy.
    fn direct(&self) -> Store {
        Store::open("s3://faulty", self.moto.options()).unwrap()
    }

    /// The job's `status.json` (fields the API does not show: failures, crashes).
    async fn status(&self, id: &str) -> serde_json::Value {
        let bytes = self
            .direct()
            .get(&format!("jobs/{id}/status.json"))
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }
}

/// How many times the replica's log says it published `version`.
fn publications(server: &Server, version: &str) -> usize {
    let needle = format!("wrote concepts/toy/{version}/manifest.json");
    server.log_text().matches(&needle).count()
}

/// Issue: with uploads throttled to 64 KB/s and a 3 s lease, a job passed from one
/// replica to the other without end, each resuming from the same checkpoint. Now, with
/// every upload throttled so that the stage-2 checkpoint and the concept each take
/// several leases to store, the job stays with its replica, a second replica waiting
/// for work never starts it, and it ends SUCCEEDED at its first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_that_outlast_the_lease_many_times_keep_the_job() {
    const LEASE: f64 = 3.0;
    const RATE_KB: u64 = 512;
    let fx = Fixture::with_photos();
    let photos = photos(&fx.path("photos"));
    let store = FaultyStore::start();
    let uploader = store.replica(&fx, "uploader", "3");
    uploader.wait_serving().await;
    let mut client = uploader.client().await;
    // Two stage-2 steps with a checkpoint after the first: U-Net and both moments.
    let job = create(&mut client, "slow", spec(&photos, "slow", 2, 2, 1)).await;
    wait_for(&mut client, &job.id, JOB_TIMEOUT, "running", |job| {
        state(job) == pb::JobState::Running
    })
    .await;
    store.proxy.add(
        "throttle",
        "bandwidth",
        Way::Up,
        1.0,
        json!({ "rate": RATE_KB }),
    );
    let idle = store.replica(&fx, "idle", "3");
    idle.wait_serving().await;

    let started = Instant::now();
    let done = wait_succeeded(&mut client, &job.id, JOB_TIMEOUT).await;
    let took = started.elapsed();
    store.proxy.remove("throttle");
    assert_eq!(done.attempts, 1, "{done:?}\n{}", uploader.log_text());
    assert_eq!(starts_of(&idle, &job.id), 0, "{}", idle.log_text());
    assert_eq!(publications(&uploader, "slow"), 1);
    let status = store.status(&job.id).await;
    assert_eq!(
        (&status["failures"], &status["crashes"]),
        (&0.into(), &0.into())
    );

    // The premise: the concept's largest blob alone took several leases to upload.
    let manifest = read_manifest(&store.direct(), "toy", "slow").await.unwrap();
    let largest = manifest.blobs.values().map(|blob| blob.size).max().unwrap();
    let upload = largest as f64 / (RATE_KB * 1024) as f64;
    assert!(upload > 3.0 * LEASE, "{largest} bytes take {upload:.1} s");
    assert!(took.as_secs_f64() > upload, "{took:?}");
}

/// A store brownout: every request fails (connections refused) for 30 s, three times
/// the lease, in the middle of stage 2. The replica's writes wait for the store, its
/// lease is renewed once the store is back (no one else could claim it meanwhile), and
/// the job goes on where it was: SUCCEEDED at its first attempt, no failure or crash
/// counted, published once, the waiting second replica never starting it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_30_s_store_brownout_mid_stage_2_costs_the_job_nothing() {
    const BROWNOUT: Duration = Duration::from_secs(30);
    let fx = Fixture::with_photos();
    let photos = photos(&fx.path("photos"));
    let store = FaultyStore::start();
    let holder = store.replica(&fx, "holder", "10");
    holder.wait_serving().await;
    let mut client = holder.client().await;
    let job = create(
        &mut client,
        "brownout",
        spec(&photos, "brownout", 4, 60, 10),
    )
    .await;
    wait_for(&mut client, &job.id, JOB_TIMEOUT, "stage 2", |job| {
        job.progress
            .as_ref()
            .is_some_and(|p| p.stage == pb::TrainingStage::Unet as i32 && p.step > 3)
    })
    .await;
    let other = store.replica(&fx, "other", "10");
    other.wait_serving().await;

    store.proxy.partition(true);
    tokio::time::sleep(BROWNOUT).await;
    store.proxy.partition(false);

    let done = wait_succeeded(&mut client, &job.id, JOB_TIMEOUT).await;
    let log = holder.log_text();
    assert_eq!(done.attempts, 1, "{done:?}\n{log}");
    assert_eq!(starts_of(&other, &job.id), 0, "{}", other.log_text());
    assert_eq!(publications(&holder, "brownout"), 1);
    let status = store.status(&job.id).await;
    assert_eq!(
        (&status["failures"], &status["crashes"]),
        (&0.into(), &0.into())
    );
    // The premise: the holder did meet the outage.
    assert!(log.contains("renewing the lease failed"), "{log}");
}
