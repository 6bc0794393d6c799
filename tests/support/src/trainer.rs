//! `coreg-trainer serve` for the tests: the process, its gRPC client, and the job
//! requests and polling its tests repeat.
//!
//! Exists so that the trainer's own tests (with the binary cargo built for them) and
//! the end-to-end tests (with [`crate::binaries::trainer`]) start and drive the
//! trainer the same way.

use std::path::Path;
use std::time::{Duration, Instant};

use coreg_proto::v1 as pb;
use pb::trainer_service_client::TrainerServiceClient;
use tonic::transport::Channel;

use crate::process::Server;

/// `binary serve` (a `coreg-trainer`) with the tiny model in `model`, the store at
/// `store` and `extra` settings; it polls for jobs every 200 ms.
pub fn serve(
    binary: impl AsRef<Path>,
    model: &Path,
    store: &str,
    log: &Path,
    extra: &[(&str, &str)],
) -> Server {
    let mut settings = vec![("COREG_POLL_MILLISECONDS", "200")];
    settings.extend_from_slice(extra);
    Server::spawn(binary.as_ref(), model, store, log, &settings)
}

pub async fn client(server: &Server) -> TrainerServiceClient<Channel> {
    TrainerServiceClient::connect(server.url()).await.unwrap()
}

/// A short job at 64 px on the tiny model: `stage1` and `stage2` steps of batch 2,
/// checkpoints every `checkpoint_every` steps.
pub fn spec(
    photos: &[Vec<u8>],
    version: &str,
    stage1: u32,
    stage2: u32,
    checkpoint_every: u32,
) -> pb::TrainingJobSpec {
    pb::TrainingJobSpec {
        concept_name: "toy".into(),
        category: "dog".into(),
        concept_version: version.into(),
        images: photos
            .iter()
            .map(|bytes| pb::TrainingImage {
                source: Some(pb::training_image::Source::Data(bytes.clone())),
            })
            .collect(),
        seed: 3,
        resolution: Some(64),
        stage1: Some(pb::Stage1Parameters {
            steps: Some(stage1),
            batch_size: Some(2),
            rescale_record_at: Some(stage1.min(2)),
            rescale_until: Some(stage1.min(4)),
            ..Default::default()
        }),
        stage2: Some(pb::Stage2Parameters {
            steps: Some(stage2),
            batch_size: Some(2),
            learning_rate: Some(1e-4),
            ..Default::default()
        }),
        checkpoint_every: Some(checkpoint_every),
        ..Default::default()
    }
}

pub async fn create(
    client: &mut TrainerServiceClient<Channel>,
    request_id: &str,
    spec: pb::TrainingJobSpec,
) -> pb::TrainingJob {
    client
        .create_training_job(pb::CreateTrainingJobRequest {
            request_id: request_id.into(),
            spec: Some(spec),
        })
        .await
        .unwrap()
        .into_inner()
}

pub async fn get(client: &mut TrainerServiceClient<Channel>, id: &str) -> pb::TrainingJob {
    client
        .get_training_job(pb::GetTrainingJobRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

/// Polls the job until `done` holds for it, failing after `timeout`.
pub async fn wait_for(
    client: &mut TrainerServiceClient<Channel>,
    id: &str,
    timeout: Duration,
    what: &str,
    done: impl Fn(&pb::TrainingJob) -> bool,
) -> pb::TrainingJob {
    let deadline = Instant::now() + timeout;
    loop {
        let job = get(client, id).await;
        if done(&job) {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} did not reach {what} in {timeout:?}; last seen: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn state(job: &pb::TrainingJob) -> pb::JobState {
    pb::JobState::try_from(job.state).unwrap()
}

pub fn is_final(job: &pb::TrainingJob) -> bool {
    matches!(
        state(job),
        pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled
    )
}

/// Waits for the job's final state and asserts it is SUCCEEDED.
pub async fn wait_succeeded(
    client: &mut TrainerServiceClient<Channel>,
    id: &str,
    timeout: Duration,
) -> pb::TrainingJob {
    let job = wait_for(client, id, timeout, "a final state", is_final).await;
    assert_eq!(state(&job), pb::JobState::Succeeded, "{job:?}");
    job
}

/// How many times this server's log says it started (or resumed) job `id`.
pub fn starts_of(server: &Server, id: &str) -> usize {
    server
        .log_text()
        .lines()
        .filter(|line| line.contains("job started") && line.contains(id))
        .count()
}
