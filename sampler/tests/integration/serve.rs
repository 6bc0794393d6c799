//! `coreg-sampler serve` end to end: real server processes on loopback with the tiny
//! model and concepts in a `file://` store, driven over gRPC: streamed progress and
//! PNGs, the concept cache (A, B, A bit-identical), test-time optimization that stays
//! within its request, DATA_LOSS for a corrupt blob, 32 concurrent calls against a
//! limit of 4, a client cancel that stops work within one step, hostile requests, and
//! a SIGTERM that drains.

use std::time::{Duration, Instant};

use coreg_proto::v1 as pb;
use coreg_test_support::fixture::Fixture;
use coreg_test_support::process::Server;
use futures::StreamExt;
use tonic::{Code, Status};

use crate::common::SamplerServer;

/// A request for `prompts` of concept `name` (none when empty): 64 px, `steps` DDIM
/// steps, seeds 100, 101, ….
fn request(name: &str, prompts: &[&str], steps: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        concept: (!name.is_empty()).then(|| pb::ConceptRef {
            name: name.into(),
            version: String::new(),
        }),
        prompts: prompts.iter().map(|p| p.to_string()).collect(),
        seeds: (0..prompts.len() as u64).map(|k| 100 + k).collect(),
        steps: Some(steps),
        width: 64,
        height: 64,
        scheduler: pb::Scheduler::Ddim as i32,
        ..Default::default()
    }
}

struct Generated {
    progress: Vec<pb::GenerationProgress>,
    images: Vec<pb::GeneratedImage>,
}

impl Generated {
    fn pngs(&self) -> Vec<Vec<u8>> {
        self.images
            .iter()
            .map(|image| match &image.image {
                Some(pb::generated_image::Image::Png(png)) => png.clone(),
                other => panic!("expected inline PNG bytes, got {other:?}"),
            })
            .collect()
    }
}

async fn generate(server: &Server, request: pb::GenerateRequest) -> Result<Generated, Status> {
    let mut client = server.client().await;
    let mut stream = client.generate(request).await?.into_inner();
    let mut generated = Generated {
        progress: Vec::new(),
        images: Vec::new(),
    };
    while let Some(event) = stream.next().await {
        match event?.event {
            Some(pb::generate_response::Event::Progress(p)) => generated.progress.push(p),
            Some(pb::generate_response::Event::Image(i)) => generated.images.push(i),
            None => panic!("an empty event"),
        }
    }
    Ok(generated)
}

/// The value of the metric line `name` (exact, labels included).
fn metric(server: &Server, name: &str) -> f64 {
    let text = server.scrape_metrics();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing in:\n{text}"))
}

fn decoded_size(png: &[u8]) -> (u32, u32) {
    let image = image::load_from_memory_with_format(png, image::ImageFormat::Png).expect("a PNG");
    (image.width(), image.height())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generates_concepts_from_the_cache_without_drift_and_tto_stays_in_its_request() {
    let fx = Fixture::with_concepts(&[("a", 1), ("b", 2)]);
    let server = Server::start(
        &fx.path("model"),
        &fx.store_url(),
        &fx.path("serve.log"),
        &[],
    );
    server.wait_serving().await;

    let a = request("a", &["a photo of a {}", "a <a> on the beach"], 4);
    let first = generate(&server, a.clone()).await.unwrap();
    // Progress: every step of each prompt's batch, with a step time and an ETA that
    // shrinks to zero; then one image per prompt, in order, with its seed.
    let steps: Vec<(u32, u32)> = first
        .progress
        .iter()
        .map(|p| (p.step, p.total_steps))
        .collect();
    assert_eq!(steps, [(1, 4), (2, 4), (3, 4), (4, 4)].repeat(2));
    let last = first.progress.last().unwrap().timing.unwrap();
    assert_eq!(
        last.eta.unwrap().seconds + i64::from(last.eta.unwrap().nanos),
        0
    );
    assert!(first.progress[0].timing.unwrap().step_time.is_some());
    assert_eq!(first.images.len(), 2);
    for (k, image) in first.images.iter().enumerate() {
        assert_eq!(image.index, k as u32);
        assert_eq!(image.seed, 100 + k as u64);
        assert_eq!(image.prompt, a.prompts[k]);
        assert_eq!(image.finish_reason, pb::FinishReason::Completed as i32);
        assert_eq!((image.width, image.height), (64, 64));
    }
    for png in first.pngs() {
        assert_eq!(decoded_size(&png), (64, 64));
    }

    let b = generate(
        &server,
        request("b", &["a photo of a {}", "a {} on the beach"], 4),
    )
    .await
    .unwrap();
    assert_ne!(b.pngs(), first.pngs(), "concepts a and b must differ");
    let base = generate(&server, request("", &["a photo of a dog"], 4))
        .await
        .unwrap();
    assert_eq!(base.images.len(), 1);

    // Test-time optimization changes this request's images only.
    let mut tuned = a.clone();
    tuned.test_time_optimization = Some(pb::TestTimeOptimization {
        enabled: true,
        steps: Some(2),
        learning_rate: Some(5e-2),
    });
    let tuned = generate(&server, tuned).await.unwrap();
    assert_eq!(
        tuned.progress.iter().map(|p| p.optimized_prompts).max(),
        Some(2)
    );
    assert_ne!(
        tuned.pngs(),
        first.pngs(),
        "TTO must change the embedding used"
    );

    let again = generate(&server, a).await.unwrap();
    assert_eq!(
        again.pngs(),
        first.pngs(),
        "a after b, the base model and a TTO request must render bit for bit the same"
    );
    // a twice from the store is a hit; so are b and the TTO request's a.
    assert!(
        metric(
            &server,
            "coreg_sampler_concept_cache_lookups_total{result=\"hit\"}"
        ) >= 2.0
    );
    assert_eq!(
        metric(
            &server,
            "coreg_sampler_concept_cache_lookups_total{result=\"miss\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &server,
            "coreg_sampler_generations_total{outcome=\"completed\"}"
        ),
        5.0
    );
    assert_eq!(metric(&server, "coreg_sampler_images_total"), 9.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_images_listing_and_a_corrupt_blob() {
    let fx = Fixture::with_concepts(&[("a", 1), ("b", 2), ("c", 3)]);
    // As a log collector would run it: JSON lines, and no metrics port.
    let server = Server::start(
        &fx.path("model"),
        &fx.store_url(),
        &fx.path("serve.log"),
        &[
            ("COREG_LOG_FORMAT", "json"),
            ("COREG_METRICS_LISTEN", "off"),
        ],
    );
    server.wait_serving().await;
    let mut client = server.client().await;

    // Images written to the store come back as URIs of real PNGs.
    let mut to_store = request("a", &["a {}"], 2);
    to_store.destination = pb::ImageDestination::Store as i32;
    let stored = generate(&server, to_store).await.unwrap();
    let Some(pb::generated_image::Image::Uri(uri)) = &stored.images[0].image else {
        panic!("expected a URI, got {:?}", stored.images[0].image);
    };
    let path = uri.strip_prefix("file://").expect("a file:// URI");
    assert_eq!(decoded_size(&std::fs::read(path).unwrap()), (64, 64));

    // Listing, a page at a time, and one concept.
    let page = client
        .list_concepts(pb::ListConceptsRequest {
            page_size: 2,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<String> = page
        .concepts
        .iter()
        .map(|c| c.r#ref.clone().unwrap().name)
        .collect();
    assert_eq!(names, ["a", "b"]);
    let rest = client
        .list_concepts(pb::ListConceptsRequest {
            page_size: 2,
            page_token: page.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.concepts.len(), 1);
    assert!(rest.next_page_token.is_empty());
    let c = client
        .get_concept(pb::GetConceptRequest {
            concept: Some(pb::ConceptRef {
                name: "c".into(),
                version: String::new(),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((c.token.as_str(), c.category.as_str()), ("<c>", "dog"));
    assert_eq!(c.versions, ["v1"]);
    assert!(!c.base_model_sha256.is_empty());

    // Flip one byte of a blob of `c` (not cached yet): DATA_LOSS, never an image.
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fx.path("store/concepts/c/v1/manifest.json")).unwrap(),
    )
    .unwrap();
    let digest = manifest["blobs"]["unet_delta"]["sha256"].as_str().unwrap();
    let blob = fx.path(&format!("store/blobs/sha256/{digest}"));
    let mut bytes = std::fs::read(&blob).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&blob, bytes).unwrap();
    let status = generate(&server, request("c", &["a {}"], 2))
        .await
        .err()
        .expect("a corrupt concept must not generate");
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert!(status.message().contains("corrupt"), "{status:?}");
    // The server is fine and still serves the others.
    assert_eq!(
        generate(&server, request("b", &["a {}"], 2))
            .await
            .unwrap()
            .images
            .len(),
        1
    );

    assert!(
        server.metrics.is_empty(),
        "metrics were served at {} though turned off",
        server.metrics
    );
    let log = server.log_text();
    let events: Vec<serde_json::Value> = log
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"))
        })
        .collect();
    let message = |event: &serde_json::Value| {
        event["fields"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        events
            .iter()
            .any(|e| e["level"] == "INFO" && message(e).starts_with("starting coreg-sampler")),
        "no start-up event in the JSON log:\n{log}"
    );
    // The corrupt concept is reported to the operator too, as a structured event.
    assert!(
        events.iter().any(|e| e["level"] == "ERROR"
            && message(e) == "concept failed verification"
            && e["fields"]["concept"] == "c"),
        "no error event for the corrupt blob:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_clear_errors() {
    let fx = Fixture::with_concepts(&[("a", 1)]);
    let server = Server::start(
        &fx.path("model"),
        &fx.store_url(),
        &fx.path("serve.log"),
        &[("COREG_AUTH__BEARER_TOKEN", "0123456789abcdef-test")],
    );
    server.wait_serving().await;
    let long_prompt = format!("a {{}} {}", "very ".repeat(80));
    type Edit = Box<dyn Fn(&mut pb::GenerateRequest)>;
    let cases: Vec<(&str, Edit, Code, &str)> = vec![
        (
            "unknown concept",
            Box::new(|r| r.concept.as_mut().unwrap().name = "nobody".into()),
            Code::NotFound,
            "nobody",
        ),
        (
            "no placeholder",
            Box::new(|r| r.prompts = vec!["a photo of a dog".into()]),
            Code::InvalidArgument,
            "does not name the concept",
        ),
        (
            "over-long prompt",
            Box::new(move |r| r.prompts = vec![long_prompt.clone()]),
            Code::InvalidArgument,
            "CLIP tokens long",
        ),
        (
            "width not a multiple of 8",
            Box::new(|r| r.width = 100),
            Code::InvalidArgument,
            "width",
        ),
        (
            "height beyond the limit",
            Box::new(|r| r.height = 2048),
            Code::InvalidArgument,
            "height",
        ),
        (
            "0 steps",
            Box::new(|r| r.steps = Some(0)),
            Code::InvalidArgument,
            "steps",
        ),
        (
            "10,000 steps",
            Box::new(|r| r.steps = Some(10_000)),
            Code::InvalidArgument,
            "steps",
        ),
        (
            "NaN guidance",
            Box::new(|r| r.guidance_scale = Some(f64::NAN)),
            Code::InvalidArgument,
            "guidance_scale",
        ),
        (
            "path traversal",
            Box::new(|r| r.concept.as_mut().unwrap().name = "../jobs".into()),
            Code::InvalidArgument,
            "concept.name",
        ),
        (
            "too many images",
            Box::new(|r| {
                r.prompts = vec!["a {}".into(); 4];
                r.seeds.clear();
                r.images_per_prompt = 8;
            }),
            Code::InvalidArgument,
            "images_per_prompt",
        ),
    ];
    let mut client = server.client().await;
    for (what, edit, code, needle) in cases {
        let mut r = request("a", &["a photo of a {}"], 2);
        edit(&mut r);
        let mut call = tonic::Request::new(r);
        call.metadata_mut().insert(
            "authorization",
            "Bearer 0123456789abcdef-test".parse().unwrap(),
        );
        let status = match client.generate(call).await {
            Ok(_) => panic!("{what}: accepted"),
            Err(status) => status,
        };
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(status.message().contains(needle), "{what}: {status:?}");
    }
    // Without the token: UNAUTHENTICATED; health stays open.
    let status = client
        .generate(request("a", &["a photo of a {}"], 2))
        .await
        .expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(
        metric(
            &server,
            "coreg_sampler_generations_total{outcome=\"completed\"}"
        ),
        0.0
    );
}

/// Peak resident memory of process `pid` in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_calls_against_a_limit_of_four() {
    let fx = Fixture::with_concepts(&[("a", 1)]);
    let server = Server::start(
        &fx.path("model"),
        &fx.store_url(),
        &fx.path("serve.log"),
        &[("COREG_LIMITS__MAX_CONCURRENT_GENERATIONS", "4")],
    );
    server.wait_serving().await;
    // One generation first, so the peak below is the load's, not the first load's.
    generate(&server, request("a", &["a {}"], 8)).await.unwrap();
    let before = peak_rss_kib(server.pid());

    let calls = (0..32).map(|k| {
        let mut r = request("a", &["a photo of a {}", "a {} in the snow"], 8);
        r.seeds = vec![k, k + 1000];
        let server = &server;
        async move { generate(server, r).await }
    });
    let results = futures::future::join_all(calls).await;
    let mut completed = 0;
    let mut exhausted = 0;
    for result in &results {
        match result {
            Ok(generated) => {
                assert_eq!(
                    generated.images.len(),
                    2,
                    "a call that runs makes every image"
                );
                for png in generated.pngs() {
                    assert_eq!(decoded_size(&png), (64, 64));
                }
                completed += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(status.message().contains("retry"), "{status:?}");
                exhausted += 1;
            }
        }
    }
    eprintln!("{completed} completed, {exhausted} RESOURCE_EXHAUSTED");
    assert_eq!(completed + exhausted, 32);
    assert!(
        completed >= 4,
        "the limit admits 4 at once: {completed} completed"
    );
    assert!(exhausted >= 1, "32 at once must overflow a limit of 4");
    assert_eq!(
        server.health("").await,
        Some(tonic_health::pb::health_check_response::ServingStatus::Serving)
    );
    assert_eq!(metric(&server, "coreg_sampler_in_flight_generations"), 0.0);
    let after = peak_rss_kib(server.pid());
    eprintln!("peak RSS {before} KiB after one call, {after} KiB after the load");
    // Bounded: admitted work waits its turn for the one model thread, so the peak grows
    // by little more than a few requests' images and buffers.
    assert!(
        after < before + 256 * 1024,
        "peak RSS grew from {before} KiB to {after} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_call_stops_within_one_step_and_sigterm_drains() {
    let fx = Fixture::with_concepts(&[("a", 1)]);
    let mut server = Server::start(
        &fx.path("model"),
        &fx.store_url(),
        &fx.path("serve.log"),
        &[],
    );
    server.wait_serving().await;
    let steps_run = |server: &Server| metric(server, "coreg_sampler_denoising_steps_total");
    let before = steps_run(&server);

    let mut client = server.client().await;
    let mut long = request("a", &["a photo of a {}"], 200);
    long.width = 128;
    long.height = 128;
    let mut stream = client.generate(long).await.unwrap().into_inner();
    let mut seen = 0;
    while seen < 3 {
        if let Some(pb::generate_response::Event::Progress(p)) =
            stream.next().await.unwrap().unwrap().event
        {
            seen = p.step;
        }
    }
    drop(stream);
    drop(client);
    let cancelled_at = steps_run(&server) - before;
    // Wait until the count stops moving, then compare.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = steps_run(&server);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = steps_run(&server);
        if now == last {
            break;
        }
        last = now;
        assert!(
            Instant::now() < deadline,
            "steps kept running after the cancel"
        );
    }
    let ran = last - before;
    eprintln!("cancelled after {seen} steps seen ({cancelled_at} run); {ran} ran in all");
    assert!(
        ran <= cancelled_at + 1.0,
        "the cancel must stop work within one step: {ran} steps ran, {cancelled_at} when cancelled"
    );
    assert_eq!(
        metric(
            &server,
            "coreg_sampler_generations_total{outcome=\"cancelled\"}"
        ),
        1.0
    );

    // SIGTERM while a generation runs: it completes, then the server exits 0.
    let address = server.url();
    let running = tokio::spawn(async move {
        let mut client = pb::sampler_service_client::SamplerServiceClient::connect(address)
            .await
            .unwrap();
        let mut stream = client
            .generate(request("a", &["a {}"], 40))
            .await
            .unwrap()
            .into_inner();
        let mut images = 0;
        while let Some(event) = stream.next().await {
            if let Some(pb::generate_response::Event::Image(_)) = event.unwrap().event {
                images += 1;
            }
        }
        images
    });
    while metric(&server, "coreg_sampler_in_flight_generations") < 1.0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let code = tokio::task::spawn_blocking(move || server.terminate())
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    assert_eq!(
        running.await.unwrap(),
        1,
        "the admitted generation must finish"
    );
}
