//! `coreg-trainer serve` against hostile input: a real server process on loopback with
//! the tiny model, sent requests a careless or malicious client might send. Each must be
//! refused with the right gRPC code and a message that names what is wrong, and none
//! may leave anything in the store (the contract: "nothing is stored for a refused
//! request"). Then bearer-token authentication, on a second server.

use std::time::Instant;

use coreg_proto::v1 as pb;
use coreg_test_support::fixture::Fixture;
use coreg_test_support::photos::{gigantic_png, png, read_all as photos};
use coreg_test_support::process::Server;
use coreg_test_support::trainer::spec;
use pb::trainer_service_client::TrainerServiceClient;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::common;
use crate::common::server::TrainerServer;

/// The request size limit the input server runs with (the configuration's minimum is
/// 1 MiB): small, so an over-limit request is cheap to build and send.
const MAX_REQUEST_BYTES: usize = 2_000_000;

/// The most photos a job takes (`trainer/src/pipeline.rs`'s `MAX_IMAGES`).
const MAX_IMAGES: usize = 20;

/// An upload far over the photo limit that the hostile-input test puts in the store.
const HUGE_UPLOAD: &str = "uploads/huge.png";

/// The bearer token of the authenticated server. The brief's `s3cret` is too short for
/// the service (`auth.bearer_token` must be at least 16 characters, checked at start),
/// which `a_short_bearer_token_is_refused_at_start` shows.
const TOKEN: &str = "s3cret-s3cret-s3cret";

/// One hostile `CreateTrainingJob` call and how it must be answered.
struct Case {
    name: &'static str,
    request: pb::CreateTrainingJobRequest,
    code: Code,
    /// Substrings the status message must contain (the field at fault, the problem).
    needles: Vec<String>,
}

fn case(
    name: &'static str,
    request: pb::CreateTrainingJobRequest,
    code: Code,
    needles: &[&str],
) -> Case {
    Case {
        name,
        request,
        code,
        needles: needles.iter().map(|s| s.to_string()).collect(),
    }
}

/// A CreateTrainingJob request without a request id.
fn request(spec: pb::TrainingJobSpec) -> pb::CreateTrainingJobRequest {
    pb::CreateTrainingJobRequest {
        request_id: String::new(),
        spec: Some(spec),
    }
}

fn inline(bytes: Vec<u8>) -> pb::TrainingImage {
    pb::TrainingImage {
        source: Some(pb::training_image::Source::Data(bytes)),
    }
}

fn stored_key(key: &str) -> pb::TrainingImage {
    pb::TrainingImage {
        source: Some(pb::training_image::Source::ObjectKey(key.into())),
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), incompressible for PNG.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

/// A real PNG of noise, about 3 MB: over `MAX_REQUEST_BYTES`, under the image limits.
fn large_png() -> Vec<u8> {
    let (width, height) = (1000, 1000);
    let pixels = noise((width * height * 3) as usize, 7);
    let bytes = png(&image::RgbImage::from_raw(width, height, pixels).unwrap());
    assert!(bytes.len() > MAX_REQUEST_BYTES + 500_000, "{}", bytes.len());
    bytes
}

/// Builds each hostile request from a valid job on the fixture's photos.
struct Requests<'a> {
    photos: &'a [Vec<u8>],
}

impl Requests<'_> {
    fn valid(&self) -> pb::TrainingJobSpec {
        spec(self.photos, "", 6, 4, 3)
    }

    /// The valid job with `change` made.
    fn with(&self, change: &dyn Fn(&mut pb::TrainingJobSpec)) -> pb::CreateTrainingJobRequest {
        let mut spec = self.valid();
        change(&mut spec);
        request(spec)
    }

    fn stage1(&self, change: &dyn Fn(&mut pb::Stage1Parameters)) -> pb::CreateTrainingJobRequest {
        self.with(&|spec| change(spec.stage1.as_mut().unwrap()))
    }

    fn stage2(&self, change: &dyn Fn(&mut pb::Stage2Parameters)) -> pb::CreateTrainingJobRequest {
        self.with(&|spec| change(spec.stage2.as_mut().unwrap()))
    }

    fn custom(&self, prompts: &[&str]) -> pb::CreateTrainingJobRequest {
        self.with(&|spec| {
            spec.prompt_set = pb::PromptSet::Custom.into();
            spec.custom_prompts = prompts.iter().map(|p| p.to_string()).collect();
        })
    }

    fn concept_name(&self, name: String) -> pb::CreateTrainingJobRequest {
        self.with(&move |spec| spec.concept_name = name.clone())
    }
}

/// Every hostile request, each otherwise a valid job on the fixture's photos.
fn cases(photos: &[Vec<u8>]) -> Vec<Case> {
    let r = Requests { photos };
    [
        request_cases(&r),
        object_key_cases(&r),
        prompt_cases(&r),
        name_cases(&r),
        optimizer_cases(&r),
        setting_cases(&r),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// The request as a whole and its inline photos.
fn request_cases(r: &Requests<'_>) -> Vec<Case> {
    let invalid = Code::InvalidArgument;
    vec![
        case(
            "empty request (no spec)",
            pb::CreateTrainingJobRequest::default(),
            invalid,
            &["spec", "missing"],
        ),
        // tonic checks the size of each message against
        // `max_decoding_message_size` (the service sets it from
        // `limits.max_request_bytes`) before decoding it, and refuses a larger one with
        // OUT_OF_RANGE ("Error, decoded message length too large: found … bytes, the
        // limit is: … bytes", tonic 0.14 `codec/decode.rs`), not RESOURCE_EXHAUSTED.
        case(
            "request over limits.max_request_bytes (~3 MB inline photo)",
            r.with(&|spec| spec.images = vec![inline(large_png())]),
            Code::OutOfRange,
            &["too large", &MAX_REQUEST_BYTES.to_string()],
        ),
        case(
            "no images",
            r.with(&|spec| spec.images.clear()),
            invalid,
            &["spec.images", "at least one"],
        ),
        case(
            "21 images",
            r.with(&|spec| spec.images = vec![inline(r.photos[0].clone()); MAX_IMAGES + 1]),
            invalid,
            &["spec.images", "21", "20"],
        ),
        case(
            "an image that is random bytes",
            r.with(&|spec| spec.images[1] = inline(noise(4096, 11))),
            invalid,
            &["spec.images[1]", "not a recognized image format"],
        ),
        case(
            "an image that is text",
            r.with(&|spec| spec.images = vec![inline(b"these are not pixels".to_vec())]),
            invalid,
            &["spec.images[0]", "not a recognized image format"],
        ),
        case(
            "a PNG claiming 100000x100000 pixels (after a valid photo)",
            r.with(&|spec| spec.images[1] = inline(gigantic_png())),
            invalid,
            &["spec.images[1]", "100000"],
        ),
        case(
            "an image with neither data nor object_key",
            r.with(&|spec| spec.images[0] = pb::TrainingImage { source: None }),
            invalid,
            &["spec.images[0]", "object_key"],
        ),
    ]
}

/// Photos named by object key: nothing outside the uploads may be read.
fn object_key_cases(r: &Requests<'_>) -> Vec<Case> {
    let invalid = Code::InvalidArgument;
    vec![
        case(
            "object_key escaping the store (../../etc/passwd)",
            r.with(&|spec| spec.images = vec![stored_key("../../etc/passwd")]),
            invalid,
            &["spec.images[0]", "../../etc/passwd"],
        ),
        case(
            "absolute object_key (/etc/passwd)",
            r.with(&|spec| spec.images = vec![stored_key("/etc/passwd")]),
            invalid,
            &["spec.images[0]", "/etc/passwd"],
        ),
        case(
            "object_key inside another job's inputs",
            r.with(&|spec| spec.images = vec![stored_key("jobs/r0/inputs/00")]),
            invalid,
            &["spec.images[0]", "jobs/r0/inputs/00", "uploads/"],
        ),
        case(
            "object_key naming another user's generated image",
            r.with(&|spec| spec.images = vec![stored_key("generated/someone/0.png")]),
            invalid,
            &["spec.images[0]", "generated/someone/0.png", "uploads/"],
        ),
        case(
            "object_key naming a queue marker",
            r.with(&|spec| spec.images = vec![stored_key("queue/r0")]),
            invalid,
            &["spec.images[0]", "uploads/"],
        ),
        // `huge.png` is put there by the test: 64 GiB by its metadata (a sparse
        // file), so a server that downloaded it to measure it would not answer.
        case(
            "object_key naming an upload over the 20 MiB photo limit",
            r.with(&|spec| spec.images = vec![stored_key(HUGE_UPLOAD)]),
            invalid,
            &["spec.images[0]", HUGE_UPLOAD, "bytes"],
        ),
        // The inline photo is valid; the second image's key names nothing. The
        // request must be refused before the first photo is written anywhere.
        case(
            "object_key not in the store, after a valid inline photo",
            r.with(&|spec| spec.images[1] = stored_key("uploads/rex/missing.png")),
            invalid,
            &["spec.images[1]", "uploads/rex/missing.png"],
        ),
    ]
}

/// Custom and preview prompts.
fn prompt_cases(r: &Requests<'_>) -> Vec<Case> {
    // 100 single-token words: far over CLIP's 77 tokens, far under the 1000-byte
    // template limit, so the token count is what must refuse it.
    let long_prompt = format!("a photo of {{}} {}", "dog ".repeat(100).trim_end());
    let invalid = Code::InvalidArgument;
    vec![
        case(
            "custom prompt without {}",
            r.custom(&["a photo of a dog"]),
            invalid,
            &["spec.custom_prompts", "{}"],
        ),
        case(
            "custom prompt with two {}",
            r.custom(&["a {} next to a {}"]),
            invalid,
            &["spec.custom_prompts", "{}"],
        ),
        case(
            "PROMPT_SET_CUSTOM without prompts",
            r.custom(&[]),
            invalid,
            &["spec.custom_prompts", "at least one"],
        ),
        case(
            "custom prompts without PROMPT_SET_CUSTOM",
            r.with(&|spec| spec.custom_prompts = vec!["a photo of {}".into()]),
            invalid,
            &["spec.custom_prompts", "PROMPT_SET_CUSTOM"],
        ),
        case(
            "custom prompt over 77 CLIP tokens",
            r.custom(&[long_prompt.as_str()]),
            invalid,
            &["spec.custom_prompts", "CLIP tokens"],
        ),
        case(
            "preview prompt over 77 CLIP tokens",
            r.with(&|spec| {
                spec.previews = Some(pb::PreviewParameters {
                    prompts: vec![long_prompt.clone()],
                    ..Default::default()
                })
            }),
            invalid,
            &["spec.previews.prompts", "CLIP tokens"],
        ),
    ]
}

/// Names that become store keys, and the category word.
fn name_cases(r: &Requests<'_>) -> Vec<Case> {
    let invalid = Code::InvalidArgument;
    vec![
        case(
            "concept_name ../x",
            r.concept_name("../x".into()),
            invalid,
            &["spec.concept_name", "../x"],
        ),
        case(
            "empty concept_name",
            r.concept_name(String::new()),
            invalid,
            &["spec.concept_name"],
        ),
        case(
            "concept_name of 300 characters",
            r.concept_name("a".repeat(300)),
            invalid,
            &["spec.concept_name", "300"],
        ),
        case(
            "concept_version ../x",
            r.with(&|spec| spec.concept_version = "../x".into()),
            invalid,
            &["spec.concept_version", "../x"],
        ),
        case(
            "empty category",
            r.with(&|spec| spec.category = String::new()),
            invalid,
            &["spec.category"],
        ),
        case(
            "category of two words",
            r.with(&|spec| spec.category = "hot dog".into()),
            invalid,
            &["spec.category", "single CLIP token"],
        ),
        case(
            "request_id ../x",
            pb::CreateTrainingJobRequest {
                request_id: "../x".into(),
                spec: Some(r.valid()),
            },
            invalid,
            &["request_id"],
        ),
    ]
}

/// The stages' hyper-parameters.
fn optimizer_cases(r: &Requests<'_>) -> Vec<Case> {
    let invalid = Code::InvalidArgument;
    vec![
        case(
            "stage1 learning_rate negative",
            r.stage1(&|s| s.learning_rate = Some(-1e-3)),
            invalid,
            &["spec.stage1.learning_rate", "-0.001"],
        ),
        case(
            "stage1 learning_rate NaN",
            r.stage1(&|s| s.learning_rate = Some(f64::NAN)),
            invalid,
            &["spec.stage1.learning_rate", "NaN"],
        ),
        case(
            "stage2 learning_rate infinite",
            r.stage2(&|s| s.learning_rate = Some(f64::INFINITY)),
            invalid,
            &["spec.stage2.learning_rate", "inf"],
        ),
        case(
            "stage1 weight_decay negative",
            r.stage1(&|s| s.weight_decay = Some(-1.0)),
            invalid,
            &["spec.stage1.weight_decay"],
        ),
        case(
            "stage1 lambda_attention NaN",
            r.stage1(&|s| s.lambda_attention = Some(f64::NAN)),
            invalid,
            &["spec.stage1.lambda_attention"],
        ),
        case(
            "stage1 steps 0",
            r.stage1(&|s| s.steps = Some(0)),
            invalid,
            &["spec.stage1.steps", "0"],
        ),
        case(
            "stage1 steps 10_000_000",
            r.stage1(&|s| s.steps = Some(10_000_000)),
            invalid,
            &["spec.stage1.steps", "10000000"],
        ),
        case(
            "stage2 steps 10_000_000",
            r.stage2(&|s| s.steps = Some(10_000_000)),
            invalid,
            &["spec.stage2.steps", "10000000"],
        ),
        case(
            "stage1 batch_size 0",
            r.stage1(&|s| s.batch_size = Some(0)),
            invalid,
            &["spec.stage1.batch_size"],
        ),
        case(
            "stage2 batch_size 100000",
            r.stage2(&|s| s.batch_size = Some(100_000)),
            invalid,
            &["spec.stage2.batch_size", "100000"],
        ),
        case(
            "stage2 delta_rank 0",
            r.stage2(&|s| s.delta_rank = Some(0)),
            invalid,
            &["spec.stage2.delta_rank"],
        ),
    ]
}

/// Sizes, previews and enum values.
fn setting_cases(r: &Requests<'_>) -> Vec<Case> {
    let invalid = Code::InvalidArgument;
    vec![
        case(
            "resolution not a multiple of 8",
            r.with(&|spec| spec.resolution = Some(100)),
            invalid,
            &["spec.resolution", "100"],
        ),
        case(
            "resolution huge",
            r.with(&|spec| spec.resolution = Some(1_000_000)),
            invalid,
            &["spec.resolution", "1000000"],
        ),
        case(
            "resolution 0",
            r.with(&|spec| spec.resolution = Some(0)),
            invalid,
            &["spec.resolution"],
        ),
        case(
            "previews steps 1000",
            r.with(&|spec| {
                spec.previews = Some(pb::PreviewParameters {
                    every: Some(2),
                    steps: Some(1000),
                    ..Default::default()
                })
            }),
            invalid,
            &["spec.previews.steps", "1000"],
        ),
        case(
            "loss_variant 99",
            r.with(&|spec| spec.loss_variant = 99),
            invalid,
            &["spec.loss_variant"],
        ),
        case(
            "prompt_set 99",
            r.with(&|spec| spec.prompt_set = 99),
            invalid,
            &["spec.prompt_set"],
        ),
        case(
            "stage2 precision 99",
            r.stage2(&|s| s.precision = 99),
            invalid,
            &["spec.stage2.precision"],
        ),
    ]
}

/// The store's object paths under `prefix` (off the async runtime: `common::list`
/// runs its own).
async fn list(store: &str, prefix: &'static str) -> Vec<String> {
    let store = store.to_string();
    tokio::task::spawn_blocking(move || common::list(&store, prefix))
        .await
        .unwrap()
}

/// What the service may have stored for a job: its records and its concepts.
async fn stored(store: &str) -> Vec<String> {
    let mut paths = list(store, "jobs/").await;
    paths.extend(list(store, "concepts/").await);
    paths
}

/// What is wrong with how `case` was answered, if anything.
async fn check(client: &mut TrainerServiceClient<Channel>, case: Case) -> Option<String> {
    match client.create_training_job(case.request).await {
        Ok(job) => Some(format!("accepted: created job {:?}", job.into_inner().id)),
        Err(status) => {
            let message = status.message();
            let missing: Vec<&String> = case
                .needles
                .iter()
                .filter(|needle| !message.contains(needle.as_str()))
                .collect();
            if status.code() != case.code || !missing.is_empty() {
                Some(format!(
                    "expected {:?} with {:?}; got {:?}: {message:?}",
                    case.code,
                    case.needles,
                    status.code()
                ))
            } else {
                eprintln!("ok   {}: {:?}: {message}", case.name, status.code());
                None
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_job_requests_are_refused_and_store_nothing() {
    let started = Instant::now();
    let fx = Fixture::with_photos();
    let store = fx.store_url();
    let limit = MAX_REQUEST_BYTES.to_string();
    let server = Server::start(
        &fx.path("model"),
        &store,
        &fx.path("serve.log"),
        &[("COREG_LIMITS__MAX_REQUEST_BYTES", limit.as_str())],
    );
    server.wait_serving().await;
    let photos = photos(&fx.path("photos"));
    assert_eq!(photos.len(), 3);
    let huge = fx.path("store").join(HUGE_UPLOAD);
    std::fs::create_dir_all(huge.parent().unwrap()).unwrap();
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(64 << 30)
        .unwrap();

    let mut failures = Vec::new();
    for case in cases(&photos) {
        let name = case.name;
        // A fresh connection per case: an over-limit message may end its stream in
        // ways that should not decide the next case.
        let mut client = server.client().await;
        let before = stored(&store).await;
        if let Some(failure) = check(&mut client, case).await {
            failures.push(format!("{name}: {failure}"));
        }
        let added: Vec<String> = stored(&store)
            .await
            .into_iter()
            .filter(|path| !before.contains(path))
            .collect();
        if !added.is_empty() {
            failures.push(format!("{name}: stored {added:?}"));
        }
    }

    let mut client = server.client().await;
    let jobs = client
        .list_training_jobs(pb::ListTrainingJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    if !jobs.jobs.is_empty() {
        let ids: Vec<&str> = jobs.jobs.iter().map(|job| job.id.as_str()).collect();
        failures.push(format!("ListTrainingJobs returns jobs {ids:?}"));
    }
    let jobs_objects = list(&store, "jobs/").await;
    let concept_objects = list(&store, "concepts/").await;
    if !jobs_objects.is_empty() || !concept_objects.is_empty() {
        failures.push(format!(
            "the store holds {jobs_objects:?} under jobs/ and {concept_objects:?} under concepts/"
        ));
    }
    // The server survived it all.
    assert_eq!(server.health("").await, Some(ServingStatus::Serving));
    eprintln!("hostile input checked in {:?}", started.elapsed());
    assert!(
        failures.is_empty(),
        "{} problem(s):\n{}\nserver log:\n{}",
        failures.len(),
        failures.join("\n"),
        server.log_text()
    );
}

/// `request` with `authorization: <value>` metadata.
fn authorized<T>(message: T, value: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", value.parse().unwrap());
    request
}

fn assert_unauthenticated<T: std::fmt::Debug>(result: Result<T, tonic::Status>, what: &str) {
    let status = result.expect_err(what);
    assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
    assert!(
        status.message().contains("bearer token"),
        "{what}: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_needs_the_bearer_token_but_health_does_not() {
    let started = Instant::now();
    let fx = Fixture::with_photos();
    let store = fx.store_url();
    let server = Server::start(
        &fx.path("model"),
        &store,
        &fx.path("serve.log"),
        &[("COREG_AUTH__BEARER_TOKEN", TOKEN)],
    );
    // Health is open: `wait_serving` sends no token.
    server.wait_serving().await;
    for service in ["", "coreg.v1.TrainerService"] {
        assert_eq!(
            server.health(service).await,
            Some(ServingStatus::Serving),
            "health of {service:?} without a token"
        );
    }

    let mut client = server.client().await;
    let list_request = pb::ListTrainingJobsRequest::default;
    assert_unauthenticated(client.list_training_jobs(list_request()).await, "no token");
    for wrong in [
        "Bearer wrong-wrong-wrong-wrong",
        "Bearer s3cret",
        "Bearer s3cret-s3cret-s3cre",
        "bearer s3cret-s3cret-s3cret",
        "s3cret-s3cret-s3cret",
        "Basic czNjcmV0LXMzY3JldC1zM2NyZXQ=",
    ] {
        assert_unauthenticated(
            client
                .list_training_jobs(authorized(list_request(), wrong))
                .await,
            wrong,
        );
    }
    // A job without the token is refused before anything is looked at or stored.
    let photos = photos(&fx.path("photos"));
    assert_unauthenticated(
        client
            .create_training_job(request(spec(&photos, "", 6, 4, 3)))
            .await,
        "CreateTrainingJob without a token",
    );
    assert_unauthenticated(
        client
            .get_training_job(pb::GetTrainingJobRequest { id: "x".into() })
            .await,
        "GetTrainingJob without a token",
    );
    assert!(list(&store, "jobs/").await.is_empty());

    let bearer = format!("Bearer {TOKEN}");
    let jobs = client
        .list_training_jobs(authorized(list_request(), &bearer))
        .await
        .expect("ListTrainingJobs with the token")
        .into_inner();
    assert!(jobs.jobs.is_empty(), "{jobs:?}");
    // Past authentication, the handler answers as usual.
    let missing = client
        .get_training_job(authorized(
            pb::GetTrainingJobRequest {
                id: "no-such-job".into(),
            },
            &bearer,
        ))
        .await
        .expect_err("GetTrainingJob of a job that does not exist");
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    eprintln!("authentication checked in {:?}", started.elapsed());
}

/// The brief's token, `s3cret`, is refused when the service starts: the error names the
/// key and the exit code is 64 (configuration).
#[test]
fn a_short_bearer_token_is_refused_at_start() {
    let fx = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_coreg-trainer"))
        .arg("serve")
        .env("COREG_LISTEN", "127.0.0.1:0")
        .env("COREG_METRICS_LISTEN", "127.0.0.1:0")
        .env("COREG_MODEL__PATH", fx.path().join("model"))
        .env(
            "COREG_STORE__URL",
            format!("file://{}", fx.path().display()),
        )
        .env("COREG_AUTH__BEARER_TOKEN", "s3cret")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("auth.bearer_token"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "the token is echoed: {stderr}");
}
