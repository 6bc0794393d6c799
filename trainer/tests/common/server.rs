//! Real `coreg-trainer serve` processes on loopback for the service's end-to-end
//! tests, and the gRPC clients that talk to them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use coreg_proto::v1 as pb;
use pb::trainer_service_client::TrainerServiceClient;
use tonic::transport::Channel;

#[path = "../../../tests/support/service_process.rs"]
mod service_process;

pub use service_process::Server;

impl Server {
    /// `coreg-trainer serve` with the tiny model in `model`, the store at `store` and
    /// `extra` settings; it polls for jobs every 200 ms.
    pub fn start(model: &Path, store: &str, log: &Path, extra: &[(&str, &str)]) -> Server {
        let mut settings = vec![("COREG_POLL_MILLISECONDS", "200")];
        settings.extend_from_slice(extra);
        Server::spawn(
            env!("CARGO_BIN_EXE_coreg-trainer"),
            model,
            store,
            log,
            &settings,
        )
    }

    pub async fn client(&self) -> TrainerServiceClient<Channel> {
        TrainerServiceClient::connect(self.url()).await.unwrap()
    }
}

/// The fixture's photos as inline PNG bytes.
pub fn photos(dir: &Path) -> Vec<Vec<u8>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    paths.sort();
    paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
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
