//! Both services end to end from the Python client generated from `proto/`: a
//! `coreg-trainer serve` and a `coreg-sampler serve` child process on loopback share
//! one object store; `tests/clients/python/sampler_flow.py` trains a concept on the
//! trainer, finds it on the sampler, generates with and without test-time
//! optimization and checks the PNGs. Once on a `file://` store, once on a bucket of a
//! real S3 API (`moto_server`).

use std::path::PathBuf;

use coreg_test_support::fixture::Fixture;
use coreg_test_support::moto::MotoServer;
use coreg_test_support::photos;
use coreg_test_support::reference::{python, workspace_root};

use crate::common::{start_sampler, start_trainer};

/// Three photos of different sizes for the training job.
fn write_photos(fx: &Fixture) -> Vec<PathBuf> {
    photos::write_samples(&fx.path("photos"))
}

/// Starts both services on `store` with `env` on top, runs `sampler_flow.py` against
/// them and returns its JSON summary, after the checks every store shares.
async fn run_flow(fx: &Fixture, store: &str, env: &[(&str, &str)]) -> serde_json::Value {
    let photos = write_photos(fx);
    let model = fx.path("model");
    let trainer = start_trainer(&model, store, &fx.path("trainer.log"), env);
    let sampler = start_sampler(&model, store, &fx.path("sampler.log"), env);
    trainer.wait_serving().await;
    sampler.wait_serving().await;

    let stubs = std::env::var("COREG_PYTHON_STUBS")
        .expect("COREG_PYTHON_STUBS names the generated Python stubs; run through `make test`");
    let script = workspace_root().join("tests/clients/python/sampler_flow.py");
    let out = fx.path("images");
    let summary_path = fx.path("flow.json");
    let output = std::process::Command::new(python())
        .arg(&script)
        .args(["--trainer", &trainer.address])
        .args(["--sampler", &sampler.address])
        .args(["--stubs", &stubs])
        .arg("--out")
        .arg(&out)
        .arg("--summary")
        .arg(&summary_path)
        .arg("--images")
        .args(&photos)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "sampler_flow.py failed:\n{}\n{}\ntrainer log:\n{}\nsampler log:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        trainer.log_text(),
        sampler.log_text()
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&summary_path).unwrap()).unwrap();

    // The job wrote the concept the sampler then described and generated with.
    let job = &summary["job"];
    assert_eq!(job["state"], "JOB_STATE_SUCCEEDED", "{summary:#}");
    assert_eq!(job["concept"]["name"], "pyflow");
    assert_eq!(job["concept"]["version"], job["id"]);
    assert!(job["progress_events"].as_u64().unwrap() > 0, "{summary:#}");
    let concept = &summary["concept"];
    assert_eq!(concept["version"], job["id"]);
    assert_eq!(concept["token"], "<pyflow>");
    assert_eq!(concept["category"], "dog");
    assert!(
        summary["listed_concepts"]
            .as_array()
            .unwrap()
            .contains(&"pyflow".into()),
        "{summary:#}"
    );

    // Two 64×64 PNGs each way, with the seeds asked for, written where it says and
    // printed on stdout.
    let stdout = String::from_utf8_lossy(&output.stdout);
    for kind in ["plain", "tto"] {
        let images = summary[kind]["images"].as_array().unwrap();
        assert_eq!(images.len(), 2, "{summary:#}");
        for (i, image) in images.iter().enumerate() {
            assert_eq!(image["seed"], [11, 12][i]);
            let path = PathBuf::from(image["path"].as_str().unwrap());
            assert!(path.starts_with(&out), "{}", path.display());
            assert!(stdout.contains(path.to_str().unwrap()), "{stdout}");
            let decoded = image::open(&path)
                .unwrap_or_else(|e| panic!("{} does not decode: {e}", path.display()));
            assert_eq!((decoded.width(), decoded.height()), (64, 64));
        }
        assert!(summary[kind]["progress_events"].as_u64().unwrap() > 0);
        assert_eq!(
            summary[kind]["finish_reasons"],
            serde_json::json!(["FINISH_REASON_COMPLETED", "FINISH_REASON_COMPLETED"])
        );
    }
    assert_eq!(summary["tto"]["optimized_prompts"], 2);
    assert_eq!(summary["repeat_identical"], true);
    assert_eq!(summary["tto_differs"], true);
    for i in 0..2 {
        assert_ne!(
            std::fs::read(out.join(format!("plain-{i}.png"))).unwrap(),
            std::fs::read(out.join(format!("tto-{i}.png"))).unwrap(),
            "image {i}: test-time optimization changed nothing"
        );
    }
    let errors = &summary["errors"];
    assert!(
        errors["no_placeholder"]
            .as_str()
            .unwrap()
            .contains("does not name the concept"),
        "{summary:#}"
    );
    assert!(
        errors["unknown_concept"]
            .as_str()
            .unwrap()
            .contains("no-such-concept"),
        "{summary:#}"
    );
    summary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_trains_then_generates_on_a_file_store() {
    let fx = Fixture::new();
    run_flow(&fx, &fx.store_url(), &[]).await;
    // The concept is where both services' store is.
    assert!(
        fx.path("store/concepts/pyflow").is_dir(),
        "no concepts/pyflow in the file store"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_trains_then_generates_on_a_real_s3_api() {
    let fx = Fixture::new();
    let moto = MotoServer::start();
    moto.create_bucket("coreg");
    // As on a cluster: the credentials arrive as the AWS SDK's own variables (a
    // Secret or an identity webhook), the rest as the services' configuration.
    let env: Vec<(String, String)> = moto
        .options()
        .into_iter()
        .map(|(k, v)| {
            if k.starts_with("aws_access_key_id") || k.starts_with("aws_secret_access_key") {
                (k.to_uppercase(), v)
            } else {
                (format!("COREG_STORE__OPTIONS__{}", k.to_uppercase()), v)
            }
        })
        .collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    run_flow(&fx, "s3://coreg", &env).await;
    for log in ["trainer.log", "sampler.log"] {
        let text = std::fs::read_to_string(fx.path(log)).unwrap();
        let line = text
            .lines()
            .find(|l| l.contains("store options taken from the environment"))
            .unwrap_or_else(|| {
                panic!("{log} does not say the credentials came from the environment:\n{text}")
            });
        assert!(
            line.contains("AWS_ACCESS_KEY_ID") && line.contains("AWS_SECRET_ACCESS_KEY"),
            "{line}"
        );
        assert!(
            !text.contains("\"test\""),
            "{log} shows a credential's value"
        );
    }
    // Nothing went to a local folder by mistake.
    assert!(!fx.path("store").exists(), "the S3 run wrote a local store");
}
