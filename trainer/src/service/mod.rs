//! `coreg-trainer serve`: the training service. The gRPC layer (handlers in [`api`])
//! only reads and writes job records in the shared object store; one model thread per
//! process ([`worker`]) trains the jobs it claims. Health stays NOT_SERVING until the
//! base model is loaded and warmed up, and turns NOT_SERVING first on SIGTERM, before
//! the running job checkpoints and is given back.

mod api;
pub mod config;
mod lease_keeper;
mod metrics;
mod request;
mod takeover_watch;
mod worker;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use coreg::model::ModelFolder;
use coreg::store::Store;
use coreg_proto::v1::trainer_service_server::TrainerServiceServer;
use coreg_serving::auth::BearerAuth;
use coreg_serving::server::{self, Health};
use tokio::sync::Semaphore;
use tonic_health::ServingStatus;

use crate::job_store::JobStore;

use self::config::ServiceConfig;
use self::worker::{Worker, WorkerShared};

/// The service name health reports under besides the overall `""`.
const SERVICE_NAME: &str = "coreg.v1.TrainerService";

/// Runs the service until SIGTERM/SIGINT; errors are configuration or start-up
/// failures, described for the operator.
pub fn serve(config: ServiceConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(serve_async(config))
}

fn replica_name(config: &ServiceConfig) -> String {
    config.replica_id.clone().unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "trainer".into());
        format!("{host}-{}", std::process::id())
    })
}

async fn serve_async(config: ServiceConfig) -> anyhow::Result<()> {
    tracing::info!(config = %config.redacted(), "starting coreg-trainer serve");
    let store = Store::open(&config.store.url, config.store.options.clone())
        .map_err(|e| anyhow::anyhow!("store: {e}"))?;
    let folder =
        ModelFolder::open(&config.model.path).map_err(|e| anyhow::anyhow!("model.path: {e}"))?;
    let tokenizer = Arc::new(
        folder
            .tokenizer()
            .map_err(|e| anyhow::anyhow!("model: {e}"))?,
    );
    let token = config.bearer_token()?;
    let jobs = JobStore::new(store);
    let replica = replica_name(&config);

    let (health, health_service) = Health::new(SERVICE_NAME).await;

    let shared = Arc::new(WorkerShared {
        shutdown: Default::default(),
        wake: Default::default(),
        metrics: Default::default(),
        died: Default::default(),
        died_notify: Default::default(),
    });
    if let Some(address) = config.metrics_listen {
        let bound = coreg_serving::metrics::spawn_exporter(address, shared.metrics.clone())
            .await
            .map_err(|e| anyhow::anyhow!("metrics_listen {address}: {e}"))?;
        server::announce_metrics(bound);
    }

    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let worker = Worker {
        config: config.clone(),
        replica: replica.clone(),
        jobs: jobs.clone(),
        runtime: tokio::runtime::Handle::current(),
        shared: shared.clone(),
    };
    let worker_thread = std::thread::Builder::new()
        .name("model".into())
        .spawn(move || worker.run(ready_tx))?;

    let api = api::TrainerApi {
        jobs,
        tokenizer,
        shared: shared.clone(),
        permits: Arc::new(Semaphore::new(config.limits.max_concurrent_requests)),
        max_queued_jobs: config.limits.max_queued_jobs,
        upload_prefix: config.upload_prefix.clone(),
    };
    let trainer = TrainerServiceServer::new(api)
        .max_decoding_message_size(config.limits.max_request_bytes)
        .max_encoding_message_size(config.limits.max_request_bytes);
    let trainer =
        tonic::service::interceptor::InterceptedService::new(trainer, BearerAuth::new(token));
    let reflection = server::reflection(&[coreg_proto::FILE_DESCRIPTOR_SET])?;

    // TLS first: a bad certificate stops the start before the address is announced.
    let mut builder = server::builder(config.tls.as_ref())?;
    let listener = server::bind_announced(config.listen).await?;
    tracing::info!(%replica, "replica");

    let router = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(trainer);

    let readiness = mark_ready(ready_rx, health.clone(), shared.clone());
    let died = model_thread_died(health.clone(), shared.clone());
    let shutdown = drain_on_signal(health, shared, worker_thread, config.shutdown_grace());
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server = router.serve_with_incoming_shutdown(incoming, shutdown);
    tokio::pin!(server);
    tokio::pin!(died);
    tokio::select! {
        result = &mut server => return result.map_err(Into::into),
        ready = readiness => ready?,
        error = &mut died => return Err(error),
    }
    tokio::select! {
        result = &mut server => result.map_err(Into::into),
        error = &mut died => Err(error),
    }
}

/// Waits for the model thread to give up (a panic: its model may be half-updated),
/// then turns NOT_SERVING; the error ends the process non-zero so that Kubernetes
/// restarts the replica with a fresh model.
async fn model_thread_died(health: Health, shared: Arc<WorkerShared>) -> anyhow::Error {
    shared.died_notify.notified().await;
    health.set(ServingStatus::NotServing).await;
    shared.metrics.ready.set(0);
    let message = shared
        .died
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .unwrap_or_default();
    tracing::error!("the model thread panicked ({message}); NOT_SERVING, exiting");
    anyhow::anyhow!("the model thread panicked: {message}")
}

/// Health turns SERVING once the model thread reports the base model loaded; an error
/// there ends the service.
async fn mark_ready(
    ready: tokio::sync::oneshot::Receiver<Result<(), String>>,
    health: Health,
    shared: Arc<WorkerShared>,
) -> anyhow::Result<()> {
    match ready.await {
        Ok(Ok(())) => {
            health.set(ServingStatus::Serving).await;
            shared.metrics.ready.set(1);
            tracing::info!("ready");
            Ok(())
        }
        Ok(Err(e)) => Err(anyhow::anyhow!(e)),
        Err(_) => Err(anyhow::anyhow!(
            "the model thread ended before it was ready"
        )),
    }
}

/// On SIGTERM/SIGINT: NOT_SERVING first, then the model thread checkpoints the running
/// job and gives it back, within `grace`.
async fn drain_on_signal(
    health: Health,
    shared: Arc<WorkerShared>,
    worker_thread: std::thread::JoinHandle<()>,
    grace: std::time::Duration,
) {
    server::wait_for_signal().await;
    tracing::warn!("shutting down: NOT_SERVING, checkpointing the running job");
    health.set(ServingStatus::NotServing).await;
    shared.shutdown.store(true, Ordering::SeqCst);
    shared.wake();
    let joined = tokio::task::spawn_blocking(move || worker_thread.join());
    if tokio::time::timeout(grace, joined).await.is_err() {
        tracing::warn!("the running job did not stop within the grace period");
    }
}

/// Reads the configuration for `serve`.
pub fn load_config(file: Option<&Path>) -> Result<ServiceConfig, config::ConfigError> {
    ServiceConfig::load(file)
}
