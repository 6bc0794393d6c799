//! `coreg-sampler serve`: the generation service. The gRPC handlers (`api`) check
//! requests, admit a bounded number, and load concepts through the cache
//! (`concepts`); one model thread (`engine`) owns the base model and runs the
//! generations. Health stays NOT_SERVING until the model is loaded and has generated
//! once, and turns NOT_SERVING first on SIGTERM, while admitted generations drain.

mod api;
mod concepts;
pub mod config;
mod engine;
mod metrics;
mod request;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use coreg::artifact::base_model_identity;
use coreg::base_model::{parse_device, BaseModel};
use coreg::model::ModelFolder;
use coreg::store::Store;
use coreg_proto::v1::sampler_service_server::SamplerServiceServer;
use coreg_serving::auth::BearerAuth;
use coreg_serving::server::{self, Health};
use tokio::sync::Semaphore;
use tonic_health::ServingStatus;

use self::concepts::Concepts;
use self::config::SamplerConfig;
use self::engine::Engine;
use self::metrics::Metrics;

/// The service name health reports under besides the overall `""`.
const SERVICE_NAME: &str = "coreg.v1.SamplerService";

/// Image side when the model's config gives no sample size (SD 2.1 base's).
const FALLBACK_SIDE: u32 = 512;

/// Reads the configuration for `serve`.
pub fn load_config(file: Option<&Path>) -> Result<SamplerConfig, config::ConfigError> {
    SamplerConfig::load(file)
}

/// Runs the service until SIGTERM/SIGINT; errors are configuration or start-up
/// failures, described for the operator.
pub fn serve(config: SamplerConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(serve_async(config))
}

async fn serve_async(config: SamplerConfig) -> anyhow::Result<()> {
    tracing::info!(config = %config.redacted(), "starting coreg-sampler serve");
    let store = Store::open(&config.store.url, config.store.options.clone())
        .map_err(|e| anyhow::anyhow!("store: {e}"))?;
    let device =
        parse_device(&config.model.device).map_err(|e| anyhow::anyhow!("model.device: {e}"))?;
    let folder =
        ModelFolder::open(&config.model.path).map_err(|e| anyhow::anyhow!("model.path: {e}"))?;
    let tokenizer = Arc::new(
        folder
            .tokenizer()
            .map_err(|e| anyhow::anyhow!("model: {e}"))?,
    );
    let default_side = folder
        .unet
        .sample_size
        .map_or(FALLBACK_SIDE, |latent| (latent * 8) as u32);
    let token = config.bearer_token()?;

    let (health, health_service) = Health::new(SERVICE_NAME).await;
    let metrics = Arc::new(Metrics::default());
    if let Some(address) = config.metrics_listen {
        let bound = coreg_serving::metrics::spawn_exporter(address, metrics.clone())
            .await
            .map_err(|e| anyhow::anyhow!("metrics_listen {address}: {e}"))?;
        server::announce_metrics(bound);
    }

    // The model loads on its own thread while the server already answers health
    // (NOT_SERVING) and refuses work with UNAVAILABLE.
    let (jobs_tx, jobs_rx) = std::sync::mpsc::channel();
    let engine_shutdown = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<String, String>>();
    let model_path = config.model.path.clone();
    let variant = config.model.variant.clone();
    let engine_metrics = metrics.clone();
    let stop_engine = engine_shutdown.clone();
    let model_thread = std::thread::Builder::new()
        .name("model".into())
        .spawn(move || {
            let loaded = (|| -> coreg::Result<Engine> {
                let model = BaseModel::load(&model_path, device, variant)?;
                let engine = Engine {
                    model,
                    jobs: jobs_rx,
                    metrics: engine_metrics,
                    shutdown: stop_engine,
                };
                engine.warm_up()?;
                Ok(engine)
            })();
            let engine = match loaded {
                Ok(engine) => engine,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("model {}: {e}", model_path.display())));
                    return;
                }
            };
            let identity = base_model_identity(&engine.model.folder).map(|id| id.sha256);
            match identity {
                Ok(sha256) => {
                    let _ = ready_tx.send(Ok(sha256));
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("model identity: {e}")));
                    return;
                }
            }
            engine.run();
        })?;

    let ready = Arc::new(AtomicBool::new(false));
    let concepts = Arc::new(Concepts::new(
        store,
        config.cache.budget_bytes,
        metrics.clone(),
    ));
    let api = api::SamplerApi {
        concepts: concepts.clone(),
        tokenizer,
        jobs: Mutex::new(jobs_tx),
        ready: ready.clone(),
        generations: Arc::new(Semaphore::new(config.limits.max_concurrent_generations)),
        requests: Arc::new(Semaphore::new(config.limits.max_concurrent_requests)),
        limits: config.limits.clone(),
        default_side,
        metrics: metrics.clone(),
    };
    let generations = api.generations.clone();
    let sampler = SamplerServiceServer::new(api)
        .max_decoding_message_size(config.limits.max_message_bytes)
        .max_encoding_message_size(config.limits.max_message_bytes);
    let sampler =
        tonic::service::interceptor::InterceptedService::new(sampler, BearerAuth::new(token));
    let reflection = server::reflection(&[coreg_proto::FILE_DESCRIPTOR_SET])?;

    // TLS first: a bad certificate stops the start before the address is announced.
    let mut builder = server::builder(config.tls.as_ref())?;
    let listener = server::bind_announced(config.listen).await?;
    let router = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(sampler);

    let health_on_ready = health.clone();
    let readiness = async move {
        match ready_rx.await {
            Ok(Ok(sha256)) => {
                concepts.serve_base_model(sha256);
                ready.store(true, Ordering::SeqCst);
                health_on_ready.set(ServingStatus::Serving).await;
                metrics.ready.set(1);
                tracing::info!("ready");
                Ok(())
            }
            Ok(Err(e)) => Err(anyhow::anyhow!(e)),
            Err(_) => Err(anyhow::anyhow!(
                "the model thread ended before it was ready"
            )),
        }
    };
    let grace = config.shutdown_grace();
    let max_generations = config.limits.max_concurrent_generations as u32;
    let shutdown = async move {
        server::wait_for_signal().await;
        tracing::warn!("shutting down: NOT_SERVING, draining admitted generations");
        health.set(ServingStatus::NotServing).await;
        // Admitted generations finish (their permits come back); new ones are refused
        // by the closed semaphore.
        let drained = async {
            let all = generations.acquire_many(max_generations).await;
            generations.close();
            drop(all);
        };
        if tokio::time::timeout(grace, drained).await.is_err() {
            tracing::warn!("generations still running at the end of the grace period");
        }
        engine_shutdown.store(true, Ordering::SeqCst);
    };
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server = router.serve_with_incoming_shutdown(incoming, shutdown);
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result.map_err(Into::into),
        ready = readiness => ready?,
    }
    server.await?;
    let _ = tokio::task::spawn_blocking(move || model_thread.join()).await;
    Ok(())
}
