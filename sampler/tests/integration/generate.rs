//! `coreg-sampler generate`, the one-shot mode, on the tiny random model with a
//! concept written to a `file://` store the way the trainer writes one: PNGs of the
//! requested size, reproducible from the seed, test-time optimization that changes
//! the images, and clear refusals.

use std::path::PathBuf;
use std::process::{Command, Output};

use coreg_test_support::process::assert_exit;

struct Fixture(coreg_test_support::fixture::Fixture);

impl Fixture {
    /// The tiny model and concept `toy` version `v1` (token `<toy>`, category `dog`).
    fn new() -> Fixture {
        Fixture(coreg_test_support::fixture::Fixture::with_concepts(&[(
            "toy", 7,
        )]))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.path(name)
    }

    /// `coreg-sampler generate` on the fixture into `out`: 64 px, 4 DDIM steps, seed
    /// 11, unless `extra` sets them.
    fn generate(&self, out: &str, extra: &[&str]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_coreg-sampler"));
        command
            .args(["generate", "--device", "cpu", "--model"])
            .arg(self.path("model"))
            .args(["--store", &self.0.store_url(), "--concept", "toy", "--out"])
            .arg(self.path(out))
            // Environments may hold variables that are not UTF-8; opening the store
            // reads the environment and must not trip over them.
            .env(
                "AWS_NOT_UTF8",
                std::os::unix::ffi::OsStrExt::from_bytes(b"caf\xe9") as &std::ffi::OsStr,
            );
        let defaults = [
            ("--width", "64"),
            ("--height", "64"),
            ("--steps", "4"),
            ("--scheduler", "ddim"),
            ("--seed", "11"),
        ];
        for (flag, value) in defaults {
            if !extra.contains(&flag) {
                command.args([flag, value]);
            }
        }
        command.args(extra).output().unwrap()
    }
}

/// The printed paths, each read back as a decoded image.
fn images(out: &Output) -> Vec<(PathBuf, image::RgbImage)> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            let path = PathBuf::from(line);
            let image = image::open(&path).unwrap().to_rgb8();
            (path, image)
        })
        .collect()
}

#[test]
fn generates_reproducible_pngs_of_the_concept_and_tto_changes_them() {
    let fx = Fixture::new();
    let prompts = [
        "--prompt",
        "a photo of a <toy> on the beach",
        "--prompt",
        "a {} in the snow",
        "--images-per-prompt",
        "2",
    ];
    let first = fx.generate("first", &prompts);
    assert_exit(&first, 0, "");
    let first = images(&first);
    assert_eq!(first.len(), 4);
    for (k, (path, image)) in first.iter().enumerate() {
        assert_eq!(image.dimensions(), (64, 64));
        let name = path.file_name().unwrap().to_str().unwrap();
        assert_eq!(name, format!("{k:03}-seed{}.png", 11 + k));
    }
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fx.path("first/images.json")).unwrap()).unwrap();
    assert_eq!(index[1]["prompt"], "a photo of a <toy> on the beach");
    assert_eq!(index[2]["prompt"], "a <toy> in the snow");
    assert_eq!(index[3]["seed"], 14);
    // Distinct seeds and prompts give distinct images.
    assert_ne!(first[0].1, first[1].1);
    assert_ne!(first[0].1, first[2].1);

    let again = images(&fx.generate("again", &prompts));
    for ((_, a), (_, b)) in first.iter().zip(&again) {
        assert_eq!(a, b, "the same seed must give the same image");
    }

    let tuned = fx.generate(
        "tto",
        &[&prompts[..], &["--tto", "--tto-steps", "2"]].concat(),
    );
    assert_exit(&tuned, 0, "test-time loss");
    let tuned = images(&tuned);
    assert_eq!(tuned.len(), 4);
    for ((_, a), (_, b)) in first.iter().zip(&tuned) {
        assert_ne!(
            a, b,
            "test-time optimization must change the embedding used"
        );
    }
}

#[test]
fn the_base_model_alone_generates_without_a_concept() {
    let fx = Fixture::new();
    let out = Command::new(env!("CARGO_BIN_EXE_coreg-sampler"))
        .args(["generate", "--device", "cpu", "--model"])
        .arg(fx.path("model"))
        .args([
            "--prompt",
            "a photo of a dog",
            "--width",
            "32",
            "--height",
            "48",
        ])
        .args(["--steps", "2", "--scheduler", "euler", "--out"])
        .arg(fx.path("base"))
        .output()
        .unwrap();
    assert_exit(&out, 0, "");
    let images = images(&out);
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].1.dimensions(), (32, 48));
}

#[test]
fn bad_requests_are_refused_with_clear_errors_and_write_nothing() {
    let fx = Fixture::new();
    let cases: [(&str, &[&str], i32, &str); 6] = [
        (
            "no placeholder",
            &["--prompt", "a photo of a dog"],
            65,
            "does not name the concept",
        ),
        (
            "over-long prompt",
            &["--prompt", &format!("a {{}} {}", "very ".repeat(80))],
            65,
            "CLIP tokens",
        ),
        (
            "size not a multiple of 8",
            &["--prompt", "a {}", "--width", "60"],
            65,
            "60",
        ),
        (
            "zero steps",
            &["--prompt", "a {}", "--steps", "0"],
            65,
            "denoising step",
        ),
        (
            "NaN guidance",
            &["--prompt", "a {}", "--guidance-scale", "NaN"],
            65,
            "guidance",
        ),
        (
            "unknown version",
            &["--prompt", "a {}", "--version", "v9"],
            66,
            "not found",
        ),
    ];
    for (case, args, code, needle) in cases {
        let out = fx.generate(case, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{case}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{case}: expected {needle:?} in {stderr}"
        );
        assert!(!fx.path(case).exists(), "{case}: wrote output");
    }

    // A corrupt blob is refused, never turned into an image.
    let blobs = fx.path("store/blobs/sha256");
    for entry in std::fs::read_dir(&blobs).unwrap() {
        let path = entry.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
    }
    let out = fx.generate("corrupt", &["--prompt", "a {}"]);
    assert_exit(&out, 74, "corrupt");
    assert!(!fx.path("corrupt").exists());
}
