//! Real `coreg-trainer serve` processes on loopback for the service's end-to-end
//! tests, and the gRPC clients that talk to them.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use coreg_proto::v1 as pb;
use pb::trainer_service_client::TrainerServiceClient;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// How long a server may take to bind its port and load the tiny model.
const START_TIMEOUT: Duration = Duration::from_secs(180);

/// One `coreg-trainer serve` child process. Killed (SIGKILL) when dropped.
pub struct Server {
    child: Option<Child>,
    pub address: String,
    /// Where `/metrics` is served.
    pub metrics: String,
    log: PathBuf,
}

impl Server {
    /// Starts a server on an ephemeral loopback port with the tiny model in `model`,
    /// the store at `store` and `extra` `COREG_…` settings on top, and waits until it
    /// reports SERVING. Its log goes to `log`.
    pub fn start(model: &Path, store: &str, log: &Path, extra: &[(&str, &str)]) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_coreg-trainer"));
        command
            .arg("serve")
            .env("COREG_LISTEN", "127.0.0.1:0")
            .env("COREG_MODEL__PATH", model)
            .env("COREG_MODEL__DEVICE", "cpu")
            .env("COREG_STORE__URL", store)
            .env("COREG_POLL_MILLISECONDS", "200")
            // Metrics on their own ephemeral port: tests run servers side by side.
            .env("COREG_METRICS_LISTEN", "127.0.0.1:0")
            // Several servers share the test machine's cores.
            .env("OMP_NUM_THREADS", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap());
        for (key, value) in extra {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("starting coreg-trainer serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut metrics = String::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(address) = line.strip_prefix("metrics on ") {
                    metrics = address.to_string();
                }
                if let Some(address) = line.strip_prefix("listening on ") {
                    let _ = tx.send((address.to_string(), metrics.clone()));
                }
            }
        });
        let mut server = Server {
            child: Some(child),
            address: String::new(),
            metrics: String::new(),
            log: log.to_path_buf(),
        };
        (server.address, server.metrics) = match rx.recv_timeout(START_TIMEOUT) {
            Ok(addresses) => addresses,
            Err(_) => panic!("the server never listened; its log:\n{}", server.log_text()),
        };
        server
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until health says SERVING (the model is loaded and warmed up).
    pub async fn wait_serving(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.health("").await {
                if status == ServingStatus::Serving {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the server never became SERVING; its log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The health of `service` (`""`: the whole server), or None when unreachable.
    pub async fn health(&self, service: &str) -> Option<ServingStatus> {
        let channel = Channel::from_shared(self.url())
            .ok()?
            .connect()
            .await
            .ok()?;
        let mut client = HealthClient::new(channel);
        let response = client
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .ok()?;
        ServingStatus::try_from(response.into_inner().status).ok()
    }

    /// The Prometheus exposition text from `GET /metrics`.
    pub fn scrape_metrics(&self) -> String {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&self.metrics).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(
            response.starts_with("HTTP/1.") && response.contains(" 200 "),
            "{response}"
        );
        response
    }

    pub async fn client(&self) -> TrainerServiceClient<Channel> {
        TrainerServiceClient::connect(self.url()).await.unwrap()
    }

    /// SIGKILL: no clean shutdown, no release of the job it holds.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the process to exit; returns its exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        child.wait().unwrap().code()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
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
