//! `coreg-trainer serve` end to end: real server processes on loopback with the tiny
//! model, driven over gRPC. Jobs live in the shared store, so a job survives its
//! server being killed and moves between replicas; these tests kill servers to show it.

use std::path::Path;
use std::time::Duration;

use coreg::artifact::{read_concept, LoadedConcept};
use coreg::store::Store;
use coreg_proto::v1 as pb;
use coreg_proto::v1::trainer_service_client::TrainerServiceClient;
use coreg_test_support::fixture::Fixture;
use coreg_test_support::moto::MotoServer;
use coreg_test_support::photos::read_all as photos;
use coreg_test_support::process::Server;
use coreg_test_support::reference::python;
use coreg_test_support::trainer::{
    create, get, is_final, spec, starts_of, state, wait_for, wait_succeeded,
};
use futures::StreamExt;
use tonic::transport::Channel;

use crate::common::server::TrainerServer;

/// Generous: the tests share two cores with each other.
const JOB_TIMEOUT: Duration = Duration::from_secs(600);

async fn concept(store: &str, options: &[(String, String)], version: &str) -> LoadedConcept {
    let store = Store::open(store, options.to_vec()).unwrap();
    read_concept(&store, "toy", version)
        .await
        .unwrap_or_else(|e| panic!("concept toy/{version} does not verify: {e}"))
}

/// The paths under `prefix` in the `file://` store.
async fn stored(store: &str, prefix: &str) -> Vec<String> {
    let store = Store::open(store, Vec::<(String, String)>::new()).unwrap();
    let objects = store.list(prefix).await.unwrap();
    objects.into_iter().map(|o| o.path).collect()
}

/// Every event of the job's watch stream, to its end.
async fn watch_to_the_end(
    client: &mut TrainerServiceClient<Channel>,
    id: &str,
) -> Vec<pb::training_job_event::Event> {
    let mut events = client
        .watch_training_job(pb::WatchTrainingJobRequest { id: id.to_owned() })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(event) = tokio::time::timeout(JOB_TIMEOUT, events.next())
        .await
        .expect("the watch stream stalled")
    {
        seen.push(event.unwrap().event.unwrap());
    }
    seen
}

/// The stream starts with the job, and its progress moves forward: stage by stage,
/// step by step.
fn assert_progress_moves_forward(seen: &[pb::training_job_event::Event]) {
    assert!(
        matches!(seen.first(), Some(pb::training_job_event::Event::Job(_))),
        "the stream must start with the job"
    );
    let progress: Vec<(i32, u32, u32)> = seen
        .iter()
        .filter_map(|e| match e {
            pb::training_job_event::Event::Progress(p) => Some((p.stage, p.step, p.total_steps)),
            _ => None,
        })
        .collect();
    assert!(
        progress
            .windows(2)
            .all(|w| (w[0].0, w[0].1) <= (w[1].0, w[1].1)),
        "{progress:?}"
    );
    assert!(progress
        .iter()
        .all(|&(_, step, total)| step <= total && total > 0));
}

/// Submits a job, watches it to the end and checks the concept it wrote.
async fn submit_watch_and_verify(
    server: &Server,
    fx: &Fixture,
    store: &str,
    options: &[(String, String)],
) {
    server.wait_serving().await;
    let mut client = server.client().await;
    let job = create(
        &mut client,
        "first",
        spec(&photos(&fx.path("photos")), "", 6, 4, 3),
    )
    .await;
    assert_eq!(state(&job), pb::JobState::Queued);

    // The same request again is the same job, not a second one.
    let again = create(
        &mut client,
        "first",
        spec(&photos(&fx.path("photos")), "", 6, 4, 3),
    )
    .await;
    assert_eq!(again.id, job.id);

    let seen = watch_to_the_end(&mut client, &job.id).await;
    let Some(pb::training_job_event::Event::Job(last)) = seen.last() else {
        panic!("the stream must end with the job: {seen:?}");
    };
    assert_eq!(state(last), pb::JobState::Succeeded, "{last:?}");
    assert_progress_moves_forward(&seen);

    let version = last.concept.as_ref().unwrap().version.clone();
    assert_eq!(
        version, job.id,
        "a job's concept version defaults to its id"
    );
    let concept = concept(store, options, &version).await;
    assert_eq!(concept.manifest.token, "<toy>");
    assert_eq!(concept.manifest.losses.stage1["total"].len(), 6);
    assert_eq!(concept.manifest.losses.stage2["diffusion"].len(), 4);

    let listed = client
        .list_training_jobs(pb::ListTrainingJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.jobs.len(), 1, "one request id, one job");
    assert_eq!(get(&mut client, &job.id).await.attempts, 1);

    let metrics = server.scrape_metrics();
    for line in [
        "coreg_trainer_ready 1",
        "coreg_trainer_jobs_created_total 1",
        "coreg_trainer_jobs_ended_total{state=\"succeeded\"} 1",
        "coreg_trainer_jobs_ended_total{state=\"failed\"} 0",
        "coreg_trainer_running_jobs 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in:\n{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submitted_job_is_trained_and_its_concept_verifies() {
    let fx = Fixture::with_photos();
    let store = fx.store_url();
    let server = Server::start(&fx.path("model"), &store, &fx.path("serve.log"), &[]);
    submit_watch_and_verify(&server, &fx, &store, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_over_a_real_s3_api() {
    let fx = Fixture::with_photos();
    let moto = MotoServer::start();
    moto.create_bucket("jobs");
    let options = moto.options();
    let env: Vec<(String, String)> = options
        .iter()
        .map(|(k, v)| {
            (
                format!("COREG_STORE__OPTIONS__{}", k.to_uppercase()),
                v.clone(),
            )
        })
        .collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let server = Server::start(&fx.path("model"), "s3://jobs", &fx.path("serve.log"), &env);
    submit_watch_and_verify(&server, &fx, "s3://jobs", &options).await;
}

/// Every job id ListTrainingJobs returns, page by page of `page_size`.
async fn list_in_pages(
    client: &mut TrainerServiceClient<Channel>,
    page_size: u32,
) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_training_jobs(pb::ListTrainingJobsRequest {
                page_size,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages.push(page.jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>());
        if page.next_page_token.is_empty() {
            return pages;
        }
        token = page.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_page_through_25_jobs_and_cancel_leaves_nothing_half_written() {
    let fx = Fixture::with_photos();
    let store = fx.store_url();
    let server = Server::start(&fx.path("model"), &store, &fx.path("serve.log"), &[]);
    server.wait_serving().await;
    let mut client = server.client().await;
    let photos = photos(&fx.path("photos"));

    // One job long enough to cancel while it runs; 24 more wait behind it.
    let long = create(&mut client, "long", spec(&photos, "long", 100_000, 1, 50)).await;
    let mut created = vec![long.id.clone()];
    for i in 0..24 {
        let job = create(
            &mut client,
            &format!("queued-{i}"),
            spec(&photos, "", 2, 1, 50),
        )
        .await;
        created.push(job.id);
    }
    let running = wait_for(
        &mut client,
        &long.id,
        JOB_TIMEOUT,
        "a running step",
        |job| job.progress.as_ref().is_some_and(|p| p.step >= 2),
    )
    .await;
    assert_eq!(state(&running), pb::JobState::Running);

    let pages = list_in_pages(&mut client, 10).await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [10, 10, 5]);
    let mut listed: Vec<String> = pages.concat();
    // Newest first.
    assert_eq!(listed.first(), created.last());
    assert_eq!(listed.last(), created.first());
    listed.sort();
    created.sort();
    assert_eq!(listed, created, "every job exactly once");

    let queued = client
        .list_training_jobs(pb::ListTrainingJobsRequest {
            page_size: 100,
            state: pb::JobState::Queued as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(queued.jobs.len(), 24);

    // Cancel the running job and every queued one.
    client
        .cancel_training_job(pb::CancelTrainingJobRequest {
            id: long.id.clone(),
        })
        .await
        .unwrap();
    for job in &queued.jobs {
        let cancelled = client
            .cancel_training_job(pb::CancelTrainingJobRequest { id: job.id.clone() })
            .await
            .unwrap()
            .into_inner();
        // A queued job may have just been taken; it still ends cancelled or done.
        assert_ne!(state(&cancelled), pb::JobState::Failed, "{cancelled:?}");
    }
    let ended = wait_for(
        &mut client,
        &long.id,
        JOB_TIMEOUT,
        "a final state",
        is_final,
    )
    .await;
    assert_eq!(state(&ended), pb::JobState::Cancelled, "{ended:?}");
    let step = ended.progress.as_ref().unwrap().step;
    assert!(step < 100_000);

    // Nothing of the cancelled job's concept is visible, and its checkpoints are gone.
    assert!(stored(&store, "concepts/toy/long/").await.is_empty());
    let leftovers: Vec<String> = stored(&store, &format!("jobs/{}/", long.id))
        .await
        .into_iter()
        .filter(|p| p.contains("checkpoint"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Waits until the job is in stage 2 past its first checkpoint.
async fn wait_mid_stage2(server: &Server, id: &str, past: u32) {
    let mut client = server.client().await;
    wait_for(&mut client, id, JOB_TIMEOUT, "mid stage 2", |job| {
        job.progress.as_ref().is_some_and(|p| {
            p.stage == pb::TrainingStage::Unet as i32 && p.step > past && p.step + 5 < p.total_steps
        })
    })
    .await;
}

fn replica(fx: &Fixture, store: &str, name: &str) -> Server {
    Server::start(
        &fx.path("model"),
        store,
        &fx.path(&format!("{name}.log")),
        &[("COREG_REPLICA_ID", name), ("COREG_LEASE_SECONDS", "3")],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_s_job_resumes_from_its_checkpoint_and_ends_identical() {
    let fx = Fixture::with_photos();
    let store = fx.store_url();
    let photos = photos(&fx.path("photos"));

    let mut first = replica(&fx, &store, "first");
    first.wait_serving().await;
    let job = create(
        &mut first.client().await,
        "killed",
        spec(&photos, "killed", 4, 60, 5),
    )
    .await;
    wait_mid_stage2(&first, &job.id, 5).await;
    first.kill();

    let second = replica(&fx, &store, "second");
    second.wait_serving().await;
    let mut client = second.client().await;
    let resumed = wait_succeeded(&mut client, &job.id, JOB_TIMEOUT).await;
    assert_eq!(resumed.attempts, 2, "{resumed:?}");
    assert!(
        second.log_text().contains("resuming from checkpoint"),
        "{}",
        second.log_text()
    );

    let uninterrupted = create(&mut client, "whole", spec(&photos, "whole", 4, 60, 5)).await;
    wait_succeeded(&mut client, &uninterrupted.id, JOB_TIMEOUT).await;
    let a = concept(&store, &[], "killed").await;
    let b = concept(&store, &[], "whole").await;
    assert_eq!(
        a.manifest.blobs, b.manifest.blobs,
        "the resumed job must write the same embedding, U-Net delta and latents"
    );
    assert_eq!(a.manifest.losses, b.manifest.losses);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_queue_and_take_over_a_dead_one_s_job() {
    let fx = Fixture::with_photos();
    let store = fx.store_url();
    let photos = photos(&fx.path("photos"));
    let a = replica(&fx, &store, "a");
    let b = replica(&fx, &store, "b");
    a.wait_serving().await;
    b.wait_serving().await;
    let mut client = a.client().await;

    let mut ids = Vec::new();
    for i in 0..6 {
        let job = create(
            &mut client,
            &format!("shared-{i}"),
            spec(&photos, "", 4, 4, 2),
        )
        .await;
        ids.push(job.id);
    }
    for id in &ids {
        let job = wait_succeeded(&mut client, id, JOB_TIMEOUT).await;
        assert_eq!(job.attempts, 1, "each job ran once: {job:?}");
        assert_eq!(
            starts_of(&a, id) + starts_of(&b, id),
            1,
            "job {id} was started by exactly one replica"
        );
    }

    // A long job; kill whichever replica runs it, and the other finishes it.
    let long = create(&mut client, "orphan", spec(&photos, "orphan", 4, 60, 5)).await;
    wait_mid_stage2(&a, &long.id, 5).await;
    let (mut holder, survivor) = if starts_of(&a, &long.id) == 1 {
        (a, b)
    } else {
        (b, a)
    };
    holder.kill();
    let mut client = survivor.client().await;
    let finished = wait_succeeded(&mut client, &long.id, JOB_TIMEOUT).await;
    assert_eq!(finished.attempts, 2, "{finished:?}");
    assert_eq!(starts_of(&survivor, &long.id), 1);
    concept(&store, &[], "orphan").await;
}

/// The Python client generated from `proto/` runs its whole flow against the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_runs_its_flow() {
    let fx = Fixture::with_photos();
    let store = fx.store_url();
    let server = Server::start(&fx.path("model"), &store, &fx.path("serve.log"), &[]);
    server.wait_serving().await;
    let stubs = std::env::var("COREG_PYTHON_STUBS")
        .expect("COREG_PYTHON_STUBS names the generated Python stubs; run through `make test`");
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/clients/python/trainer_flow.py");
    let mut command = std::process::Command::new(python());
    command
        .arg(&script)
        .args(["--address", &server.address, "--stubs", &stubs, "--out"])
        .arg(fx.path("flow.json"))
        .arg("--images");
    for i in 0..3 {
        command.arg(fx.path(&format!("photos/{i}.png")));
    }
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "trainer_flow.py failed:\n{}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        server.log_text()
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fx.path("flow.json")).unwrap()).unwrap();
    assert_eq!(summary["job"]["state"], "JOB_STATE_SUCCEEDED");
    assert_eq!(summary["cancelled_job"]["state"], "JOB_STATE_CANCELLED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_checkpoints_the_running_job_and_releases_it_at_once() {
    let fx = Fixture::with_photos();
    let store = fx.store_url();
    let photos = photos(&fx.path("photos"));
    // A long lease: the next replica may only start at once if the job was released.
    let long_lease = [
        ("COREG_LEASE_SECONDS", "600"),
        ("COREG_SHUTDOWN_GRACE_SECONDS", "60"),
    ];
    let mut first = Server::start(
        &fx.path("model"),
        &store,
        &fx.path("first.log"),
        &long_lease,
    );
    first.wait_serving().await;
    let mut client = first.client().await;
    let job = create(
        &mut client,
        "long",
        spec(&photos, "long", 100_000, 1, 1_000),
    )
    .await;
    wait_for(&mut client, &job.id, JOB_TIMEOUT, "a few steps", |job| {
        job.progress.as_ref().is_some_and(|p| p.step >= 3)
    })
    .await;
    let started = std::time::Instant::now();
    let code = tokio::task::spawn_blocking(move || first.terminate().map(|code| (code, first)))
        .await
        .unwrap();
    let (code, first) = code.unwrap();
    assert_eq!(code, 0, "{}", first.log_text());
    assert!(started.elapsed() < Duration::from_secs(60));
    let log = first.log_text();
    assert!(log.contains("shutting down: NOT_SERVING"), "{log}");
    assert!(log.contains("job given back"), "{log}");

    let second = Server::start(
        &fx.path("model"),
        &store,
        &fx.path("second.log"),
        &long_lease,
    );
    second.wait_serving().await;
    let mut client = second.client().await;
    let resumed = wait_for(&mut client, &job.id, JOB_TIMEOUT, "a resumed step", |job| {
        job.attempts == 2 && job.progress.as_ref().is_some_and(|p| p.step >= 4)
    })
    .await;
    assert_eq!(state(&resumed), pb::JobState::Running);
    assert!(second.log_text().contains("resuming from checkpoint"));
    client
        .cancel_training_job(pb::CancelTrainingJobRequest { id: job.id.clone() })
        .await
        .unwrap();
    let ended = wait_for(&mut client, &job.id, JOB_TIMEOUT, "a final state", is_final).await;
    assert_eq!(state(&ended), pb::JobState::Cancelled);
}

/// With `tls` configured the server speaks only TLS: a client trusting its
/// certificate trains a job, a plaintext client gets nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_clients_that_trust_the_certificate() {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};

    let fx = Fixture::with_photos();
    let store = fx.store_url();
    // A test CA and a server certificate it signed (rustls refuses a self-signed CA
    // certificate as the server's own).
    let script = r#"set -e
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=coreg-test-ca -keyout ca.key -out ca.pem
openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout key.pem -out server.csr
printf 'subjectAltName=DNS:localhost\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n' > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile server.ext -out cert.pem
"#;
    let made = std::process::Command::new("sh")
        .args(["-c", script])
        .current_dir(fx.path(""))
        .output()
        .expect("openssl makes the test certificates");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let (cert, key, ca) = (fx.path("cert.pem"), fx.path("key.pem"), fx.path("ca.pem"));
    let server = Server::start(
        &fx.path("model"),
        &store,
        &fx.path("serve.log"),
        &[
            ("COREG_TLS__CERT", cert.to_str().unwrap()),
            ("COREG_TLS__KEY", key.to_str().unwrap()),
        ],
    );
    // The test process links both rustls providers too (see install_crypto_provider).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&ca).unwrap()))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{}", server.address))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = pb::trainer_service_client::TrainerServiceClient::new(channel);
    let job = create(
        &mut client,
        "tls",
        spec(&photos(&fx.path("photos")), "tls", 2, 1, 50),
    )
    .await;
    wait_succeeded(&mut client, &job.id, JOB_TIMEOUT).await;

    assert_eq!(
        server.health("").await,
        None,
        "plaintext must not be answered"
    );
}
