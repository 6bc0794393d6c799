//! Both services end to end from the Go client generated from `proto/`
//! (`clients/go`): a `coreg-trainer serve` and a `coreg-sampler serve` child process on
//! loopback share one `file://` store on the tiny model; `go build` compiles
//! `clients/go/cmd/coreg-example` (its stubs generated with protoc-gen-go and
//! protoc-gen-go-grpc, its modules fetched through the Go module proxy or the module
//! cache) and runs it: it trains a concept from a folder of photos, then generates two
//! images of it to PNG files.
//!
//! Needs `go` on PATH.

use std::path::{Path, PathBuf};
use std::process::Command;

use coreg_test_support::fixture::Fixture;
use coreg_test_support::photos;
use coreg_test_support::reference::workspace_root;

use crate::common::{start_sampler, start_trainer};

/// The bearer token both services require (at least 16 characters).
const TOKEN: &str = "go-client-test-token-0123456789";

/// Three photos of different sizes, in a folder of their own.
fn write_photos(dir: &Path) {
    photos::write_samples(dir);
    // Not an image: the client skips it.
    std::fs::write(dir.join("notes.txt"), "three photos").unwrap();
}

/// `go build` of the example into `out`, from the module in `clients/go`.
fn build_example(out: &Path) -> PathBuf {
    let module = workspace_root().join("clients/go");
    let binary = out.join(format!("coreg-example{}", std::env::consts::EXE_SUFFIX));
    let output = Command::new("go")
        .current_dir(&module)
        // No VCS stamp: the checkout may not be a git work tree (or not one we own).
        .args(["build", "-buildvcs=false", "-o"])
        .arg(&binary)
        .arg("./cmd/coreg-example")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `go` ({e}): the Go client's test needs Go on PATH (go.dev/dl)")
        });
    assert!(
        output.status.success(),
        "go build of clients/go/cmd/coreg-example failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    binary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_go_client_trains_then_generates_to_files() {
    let fx = Fixture::new();
    let photos = fx.path("photos");
    write_photos(&photos);
    let example = build_example(&fx.path(""));

    let model = fx.path("model");
    let store = fx.store_url();
    // Both services require a bearer token, which the client sends with every call.
    let auth = [("COREG_AUTH__BEARER_TOKEN", TOKEN)];
    let trainer = start_trainer(&model, &store, &fx.path("trainer.log"), &auth);
    let sampler = start_sampler(&model, &store, &fx.path("sampler.log"), &auth);
    // The example waits for both services' health itself.

    let out = fx.path("generated");
    let run = |token: Option<&str>| {
        let mut command = Command::new(&example);
        command
            .args(["--trainer", &trainer.address, "--sampler", &sampler.address])
            .arg("--images")
            .arg(&photos)
            .arg("--out")
            .arg(&out)
            .args(["--concept", "goflow", "--size", "64", "--steps", "4"])
            .args(["--prompt", "a photo of {}", "--prompt", "{} on the beach"])
            .args(["--seed", "7"])
            .env_remove("COREG_TOKEN");
        if let Some(token) = token {
            command.args(["--token", token]);
        }
        command
    };

    // Without the token, health still answers (it is exempt) but the job is refused:
    // the example says so and exits 1.
    let refused = run(None).output().unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Unauthenticated"), "{stderr}");

    let mut command = run(Some(TOKEN));
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report = || {
        format!(
            "stdout:\n{stdout}\nstderr:\n{}\ntrainer log:\n{}\nsampler log:\n{}",
            String::from_utf8_lossy(&output.stderr),
            trainer.log_text(),
            sampler.log_text()
        )
    };
    assert!(
        output.status.success(),
        "coreg-example failed\n{}",
        report()
    );
    // Shown with `--nocapture`.
    println!("{stdout}");

    // The job trained from the three photos (not the text file), reported progress
    // and wrote the concept where both services' store is.
    assert!(
        stdout.contains("from 3 photos"),
        "the example did not send exactly the 3 photos\n{}",
        report()
    );
    assert!(
        stdout.contains("stage 1 (embedding): step "),
        "{}",
        report()
    );
    assert!(stdout.contains("SUCCEEDED"), "{}", report());
    assert!(
        fx.path("store/concepts/goflow").is_dir(),
        "no concepts/goflow in the file store\n{}",
        report()
    );

    // One 64×64 PNG per prompt, written where it says and printed on stdout.
    let written: Vec<PathBuf> = stdout
        .lines()
        .filter_map(|line| line.strip_prefix("wrote "))
        .map(|rest| PathBuf::from(rest.split(" (").next().unwrap()))
        .collect();
    assert_eq!(written.len(), 2, "{}", report());
    for (i, path) in written.iter().enumerate() {
        assert_eq!(path, &out.join(format!("goflow-{i}.png")), "{}", report());
        let bytes = std::fs::read(path).unwrap();
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
            "{} is not a PNG",
            path.display()
        );
        let decoded = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
            .unwrap_or_else(|e| panic!("{} does not decode: {e}", path.display()));
        assert_eq!((decoded.width(), decoded.height()), (64, 64));
    }
    assert_ne!(
        std::fs::read(&written[0]).unwrap(),
        std::fs::read(&written[1]).unwrap(),
        "two prompts and seeds gave the same image"
    );
}
