//! Chaos: three replicas on the S3 API behind a fault-injecting proxy, eight jobs, and
//! replicas killed (-9) and SIGTERMed at random every few seconds and restarted, while
//! the store is slow, resets connections and drops away for a while. Every job must
//! end SUCCEEDED, each concept published exactly once, with the blobs of an
//! uninterrupted run of the same job, and no checkpoint of a finished job left.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use coreg::artifact::read_manifest;
use coreg::store::Store;
use coreg_proto::v1 as pb;
use coreg_test_support::faults::{FaultProxy, Way};
use coreg_test_support::fixture::Fixture;
use coreg_test_support::moto::MotoServer;
use coreg_test_support::photos::read_all as photos;
use coreg_test_support::process::Server;
use coreg_test_support::trainer::{create, get, is_final, spec, state, wait_for};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::common::server::TrainerServer;

const REPLICAS: usize = 3;
const JOBS: usize = 8;
/// How long replicas are killed and the store misbehaves, at least.
const CHAOS: Duration = Duration::from_secs(60);
/// Kills and SIGTERMs, at least: a slow machine (a SIGTERM waits for its checkpoint)
/// fits fewer in `CHAOS`, so the chaos runs on until it has done this many.
const INTERRUPTIONS: usize = 12;
const JOB_TIMEOUT: Duration = Duration::from_secs(600);

/// The replicas, each slot restarted under its own name after every kill.
struct Fleet<'a> {
    fx: &'a Fixture,
    env: Vec<(String, String)>,
    slots: Vec<Option<Server>>,
    logs: Vec<PathBuf>,
}

impl Fleet<'_> {
    fn start(&mut self, slot: usize) {
        let name = format!("replica-{slot}");
        let log = self.fx.path(&format!("{name}-{}.log", self.logs.len()));
        let mut env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        // Crashes are what this test causes on purpose, a dozen of them: a job is not
        // to fail for being killed with (max_crashes is durability.rs's subject). A
        // lease longer than the partition, as in production (30 s against outages of
        // seconds): a partition longer than the lease counts a crash by design.
        env.extend([
            ("COREG_REPLICA_ID", name.as_str()),
            ("COREG_LEASE_SECONDS", "5"),
            ("COREG_MAX_CRASHES", "100"),
        ]);
        self.slots[slot] = Some(Server::start(
            &self.fx.path("model"),
            "s3://chaos",
            &log,
            &env,
        ));
        self.logs.push(log);
    }

    fn any(&self) -> &Server {
        self.slots
            .iter()
            .flatten()
            .next()
            .expect("a running replica")
    }

    /// How many times the replicas' logs say they published `version`.
    fn publications(&self, version: &str) -> usize {
        let needle = format!("wrote concepts/toy/{version}/manifest.json");
        self.logs
            .iter()
            .map(|log| {
                std::fs::read_to_string(log)
                    .unwrap_or_default()
                    .matches(&needle)
                    .count()
            })
            .sum()
    }
}

/// What the chaos did.
#[derive(Default, Debug)]
struct Report {
    kills: usize,
    sigterms: usize,
    faults: usize,
}

/// Kills or SIGTERMs a random replica every 1–2.5 s and restarts it, for `CHAOS` and
/// `INTERRUPTIONS` at least, while the store gets latency, reset connections, a
/// partition and a throttled stretch.
async fn unleash(fleet: &mut Fleet<'_>, proxy: &FaultProxy) -> Report {
    let mut rng = StdRng::seed_from_u64(12);
    let mut report = Report::default();
    proxy.add(
        "latency",
        "latency",
        Way::Down,
        1.0,
        json!({"latency": 20, "jitter": 20}),
    );
    proxy.add(
        "resets",
        "reset_peer",
        Way::Down,
        0.03,
        json!({"timeout": 0}),
    );
    report.faults += 2;
    let started = Instant::now();
    let (mut partitioned, mut throttled) = (false, false);
    while started.elapsed() < CHAOS
        || !partitioned
        || !throttled
        || report.kills + report.sigterms < INTERRUPTIONS
    {
        let at = started.elapsed();
        if !partitioned && at > CHAOS / 3 {
            proxy.partition(true);
            tokio::time::sleep(Duration::from_secs(3)).await;
            proxy.partition(false);
            partitioned = true;
            report.faults += 1;
        }
        if !throttled && at > 2 * CHAOS / 3 {
            proxy.add(
                "throttle",
                "bandwidth",
                Way::Down,
                1.0,
                json!({"rate": 256}),
            );
            throttled = true;
            report.faults += 1;
        }
        let slot = rng.random_range(0..REPLICAS);
        if let Some(mut server) = fleet.slots[slot].take() {
            if rng.random_bool(0.6) {
                server.kill();
                report.kills += 1;
            } else {
                tokio::task::spawn_blocking(move || server.terminate())
                    .await
                    .unwrap();
                report.sigterms += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..800))).await;
        fleet.start(slot);
        tokio::time::sleep(Duration::from_millis(rng.random_range(1000..2500))).await;
    }
    proxy.remove("throttle");
    proxy.remove("resets");
    proxy.remove("latency");
    report
}

/// Eight copies of one job (only the version differs) on a fresh fleet.
async fn submit(fleet: &Fleet<'_>, photos: &[Vec<u8>]) -> Vec<String> {
    fleet.any().wait_serving().await;
    let mut client = fleet.any().client().await;
    let mut ids = Vec::new();
    for i in 0..JOBS {
        let version = format!("c{i}");
        ids.push(
            create(&mut client, &version, spec(photos, &version, 4, 24, 4))
                .await
                .id,
        );
    }
    ids
}

/// Every concept names its job, has the reference run's blobs, and left no checkpoint.
async fn assert_published_as_uninterrupted(store: &Store, fleet: &Fleet<'_>, ids: &[String]) {
    let mut client = fleet.any().client().await;
    let expected = read_manifest(store, "toy", "reference")
        .await
        .unwrap()
        .blobs;
    for (i, id) in ids.iter().enumerate() {
        let job = get(&mut client, id).await;
        let version = job.concept.unwrap().version;
        let manifest = read_manifest(store, "toy", &version).await.unwrap();
        assert_eq!(manifest.job.as_deref(), Some(id.as_str()));
        assert_eq!(
            manifest.blobs, expected,
            "c{i} differs from the uninterrupted run"
        );
        let leftovers: Vec<String> = store
            .list(&format!("jobs/{id}/"))
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.path)
            .filter(|p| p.contains("checkpoint"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_every_job_succeeds_and_is_published_once() {
    let fx = Fixture::with_photos();
    let photos = photos(&fx.path("photos"));
    let moto = MotoServer::start();
    moto.create_bucket("chaos");
    let proxy = FaultProxy::start(moto.address());
    let env = proxy.store_env(&moto.options());
    let mut fleet = Fleet {
        fx: &fx,
        env,
        slots: (0..REPLICAS).map(|_| None).collect(),
        logs: Vec::new(),
    };
    for slot in 0..REPLICAS {
        fleet.start(slot);
    }
    let ids = submit(&fleet, &photos).await;

    let report = unleash(&mut fleet, &proxy).await;
    for server in fleet.slots.iter().flatten() {
        server.wait_serving().await;
    }
    let mut client = fleet.any().client().await;
    // The same job once more, on a calm fleet: what every concept must equal.
    let reference = create(
        &mut client,
        "reference",
        spec(&photos, "reference", 4, 24, 4),
    )
    .await;
    let mut lost = Vec::new();
    for id in ids.iter().chain([&reference.id]) {
        let job = wait_for(&mut client, id, JOB_TIMEOUT, "a final state", is_final).await;
        if state(&job) != pb::JobState::Succeeded {
            lost.push(format!("{id}: {:?} {}", state(&job), job.error));
        }
    }
    let duplicates: usize = (0..JOBS)
        .map(|i| fleet.publications(&format!("c{i}")).saturating_sub(1))
        .sum();
    eprintln!(
        "chaos: {JOBS} jobs, {} kills, {} SIGTERMs, {} store faults; jobs lost {}, \
         duplicate publications {duplicates}",
        report.kills,
        report.sigterms,
        report.faults,
        lost.len()
    );
    assert!(lost.is_empty(), "{lost:?}");
    assert_eq!(duplicates, 0);
    let store = Store::open("s3://chaos", moto.options()).unwrap();
    assert_published_as_uninterrupted(&store, &fleet, &ids).await;
}
