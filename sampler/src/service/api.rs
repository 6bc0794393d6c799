//! The `SamplerService` handlers. They check requests, admit at most the configured
//! number of generations (the rest get RESOURCE_EXHAUSTED, not a queue that grows),
//! load the concept (verified, through the cache), and hand the work to the model
//! thread; they never touch a tensor. A Generate stream ends when the model thread is
//! done with the request, or at once when the client goes away, which the model
//! thread notices before its next step.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use coreg::model::tokenizer::ClipTokenizer;
use coreg_proto::v1 as pb;
use coreg_proto::v1::sampler_service_server::SamplerService;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::personalized::resolve_prompts;

use super::concepts::{self, Concepts};
use super::config::LimitsConfig;
use super::engine::{Event, FinishedImage, Job};
use super::metrics::{Metrics, Outcome};
use super::request::{self, Destination};

/// Where generated images go in the store when a request asks for it.
const GENERATED_PREFIX: &str = "generated";
/// The largest ListConcepts page.
const MAX_PAGE_SIZE: u32 = 100;
const DEFAULT_PAGE_SIZE: u32 = 20;

pub struct SamplerApi {
    pub concepts: Arc<Concepts>,
    /// The base tokenizer, to check prompt lengths before any work.
    pub tokenizer: Arc<ClipTokenizer>,
    /// To the model thread; a `Mutex` because a std `Sender` is cloned per use.
    pub jobs: Mutex<Sender<Job>>,
    pub ready: Arc<AtomicBool>,
    pub generations: Arc<Semaphore>,
    pub requests: Arc<Semaphore>,
    pub limits: LimitsConfig,
    /// The model's native image side, for requests that leave the size unset.
    pub default_side: u32,
    pub metrics: Arc<Metrics>,
}

/// Request ids for logs and stored image keys: unique within the process, ordered.
fn next_request_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!(
        "{}-{n:06}-{:08x}",
        chrono::Utc::now().format("%Y%m%dT%H%M%S"),
        rand::random::<u32>()
    )
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

impl SamplerApi {
    fn check_ready(&self) -> Result<(), Status> {
        if self.ready.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(Status::unavailable(
                "the sampler is still loading its model; retry shortly",
            ))
        }
    }

    fn reject(&self, status: Status) -> Status {
        self.metrics.ended(Outcome::Rejected);
        status
    }

    async fn start_generation(
        &self,
        request: pb::GenerateRequest,
    ) -> Result<GenerateStream, Status> {
        self.check_ready()?;
        let checked = request::check(&request, &self.limits, self.default_side)?;
        // Admission before the store is read, so that a burst cannot make this replica
        // load concepts it has no capacity to use.
        let permit = self.generations.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "the sampler is running its limit of {} generations; retry with backoff",
                self.limits.max_concurrent_generations
            ))
        })?;
        let concept = match &checked.concept {
            Some((name, version)) => {
                let version = self.concepts.resolve(name, version).await?;
                Some(self.concepts.load(name, &version).await?)
            }
            None => None,
        };
        // Prompt lengths and the placeholder, with the concept's token known.
        let mut tokenizer = (*self.tokenizer).clone();
        let token = match &concept {
            Some(concept) => {
                let token = concept.token().to_owned();
                tokenizer
                    .add_placeholder(&token)
                    .map_err(|e| Status::internal(e.to_string()))?;
                Some(token)
            }
            None => None,
        };
        resolve_prompts(
            &tokenizer,
            token.as_deref(),
            &checked.request.prompts,
            &checked.request.negative_prompt,
        )
        .map_err(|e| Status::invalid_argument(request::strip(&e)))?;

        let id = next_request_id();
        tracing::info!(
            %id,
            concept = ?checked.concept,
            prompts = checked.request.prompts.len(),
            images = checked.request.image_count(),
            steps = checked.request.params.steps,
            tto = checked.request.tto.is_some(),
            "generation admitted"
        );
        let (events_tx, events) = mpsc::unbounded_channel();
        let job = Job {
            id: id.clone(),
            concept,
            request: checked.request,
            events: events_tx,
            permit,
        };
        self.metrics.in_flight.add(1);
        let in_flight = InFlight(self.metrics.clone());
        self.jobs
            .lock()
            .expect("jobs lock")
            .send(job)
            .map_err(|_| Status::unavailable("the sampler is shutting down"))?;

        let (tx, rx) = mpsc::channel(16);
        let store = self.concepts.store.clone();
        let destination = checked.destination;
        tokio::spawn(async move {
            let _in_flight = in_flight;
            forward(events, tx, store, destination, id).await;
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

/// Counts a generation in flight until dropped.
struct InFlight(Arc<Metrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.add(-1);
    }
}

/// Relays the model thread's events to the client, writing images to the store first
/// when asked. Returns when the model thread is done or the client is gone (dropping
/// `events` tells the model thread to stop).
async fn forward(
    mut events: mpsc::UnboundedReceiver<Event>,
    tx: mpsc::Sender<Result<pb::GenerateResponse, Status>>,
    store: coreg::store::Store,
    destination: Destination,
    id: String,
) {
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            _ = tx.closed() => return,
        };
        let Some(event) = event else { return };
        let message = match event {
            Event::Progress {
                optimized_prompts,
                step,
                total_steps,
                step_time,
                eta,
            } => Ok(pb::GenerateResponse {
                event: Some(pb::generate_response::Event::Progress(
                    pb::GenerationProgress {
                        optimized_prompts,
                        step,
                        total_steps,
                        timing: Some(pb::Timing {
                            step_time: prost_types::Duration::try_from(step_time).ok(),
                            eta: prost_types::Duration::try_from(eta).ok(),
                        }),
                    },
                )),
            }),
            Event::Image(image) => image_message(image, &store, destination, &id).await,
            Event::Failed(status) => Err(status),
        };
        if tx.send(message).await.is_err() {
            return;
        }
    }
}

async fn image_message(
    image: FinishedImage,
    store: &coreg::store::Store,
    destination: Destination,
    id: &str,
) -> Result<pb::GenerateResponse, Status> {
    let (finish_reason, payload) = match image.png {
        None => (pb::FinishReason::NonFinite, None),
        Some(png) => {
            let payload = match destination {
                Destination::Inline => pb::generated_image::Image::Png(png),
                Destination::Store => {
                    let key = format!(
                        "{GENERATED_PREFIX}/{id}/{:03}-seed{}.png",
                        image.index, image.seed
                    );
                    store
                        .put_overwrite(&key, png.into())
                        .await
                        .map_err(concepts::status_of)?;
                    pb::generated_image::Image::Uri(format!(
                        "{}/{key}",
                        store.url().trim_end_matches('/')
                    ))
                }
            };
            (pb::FinishReason::Completed, Some(payload))
        }
    };
    Ok(pb::GenerateResponse {
        event: Some(pb::generate_response::Event::Image(pb::GeneratedImage {
            index: image.index,
            prompt: image.prompt,
            seed: image.seed,
            image: payload,
            finish_reason: finish_reason as i32,
            width: image.width,
            height: image.height,
        })),
    })
}

#[tonic::async_trait]
impl SamplerService for SamplerApi {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        match self.start_generation(request.into_inner()).await {
            Ok(stream) => Ok(Response::new(stream)),
            Err(status) => {
                tracing::info!(code = ?status.code(), message = status.message(), "generate refused");
                Err(self.reject(status))
            }
        }
    }

    async fn list_concepts(
        &self,
        request: Request<pb::ListConceptsRequest>,
    ) -> Result<Response<pb::ListConceptsResponse>, Status> {
        self.check_ready()?;
        let _permit = self.requests.try_acquire().map_err(|_| busy())?;
        let request = request.into_inner();
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n <= MAX_PAGE_SIZE => n,
            n => {
                return Err(Status::invalid_argument(format!(
                    "page_size: {n} is over {MAX_PAGE_SIZE}"
                )))
            }
        } as usize;
        // The token is the last name of the previous page: stable under concepts
        // added or removed between pages.
        let after = request.page_token;
        if after.len() > 64 {
            return Err(Status::invalid_argument(
                "page_token: not one this service gave",
            ));
        }
        let names = self.concepts.names().await?;
        let page: Vec<&String> = names
            .iter()
            .filter(|name| after.is_empty() || name.as_str() > after.as_str())
            .take(page_size + 1)
            .collect();
        let more = page.len() > page_size;
        let mut concepts = Vec::with_capacity(page_size);
        for name in page.iter().take(page_size) {
            let versions = self.concepts.versions(name).await?;
            let newest = versions.last().expect("never empty");
            concepts.push(concepts::summary(newest, &versions));
        }
        let next_page_token = if more {
            page[page_size - 1].clone()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListConceptsResponse {
            concepts,
            next_page_token,
        }))
    }

    async fn get_concept(
        &self,
        request: Request<pb::GetConceptRequest>,
    ) -> Result<Response<pb::Concept>, Status> {
        self.check_ready()?;
        let _permit = self.requests.try_acquire().map_err(|_| busy())?;
        let reference = request
            .into_inner()
            .concept
            .ok_or_else(|| Status::invalid_argument("concept: missing"))?;
        coreg::artifact::validate_concept_name(&reference.name).map_err(|e| {
            Status::invalid_argument(format!("concept.name: {}", request::strip(&e)))
        })?;
        if !reference.version.is_empty() {
            coreg::artifact::validate_concept_version(&reference.version).map_err(|e| {
                Status::invalid_argument(format!("concept.version: {}", request::strip(&e)))
            })?;
        }
        let versions = self.concepts.versions(&reference.name).await?;
        let manifest = if reference.version.is_empty() {
            versions.last().expect("never empty")
        } else {
            versions
                .iter()
                .find(|m| m.version == reference.version)
                .ok_or_else(|| {
                    Status::not_found(format!(
                        "concept {:?} has no version {:?}",
                        reference.name, reference.version
                    ))
                })?
        };
        Ok(Response::new(concepts::summary(manifest, &versions)))
    }
}

fn busy() -> Status {
    Status::resource_exhausted("the sampler is handling too many requests; retry later")
}
