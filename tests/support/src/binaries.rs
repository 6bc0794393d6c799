//! A workspace binary (`coreg-trainer`, `coreg-sampler`) for a test of any crate.
//!
//! Cargo hands a test only its own package's binaries (`CARGO_BIN_EXE_…`). A test that
//! runs another package's binary (the end-to-end tests run both services) asks here:
//! the binary is built by the `cargo` that compiled the test, into the same target
//! directory and profile, once per test process; cargo rebuilds it when stale and does
//! nothing when it is current. So no test depends on something else having been
//! built first.
//!
//! The build is `cargo build --workspace --bin <name>`: features resolved over every
//! workspace member, as `make build` (`cargo build --workspace`) resolves them, so after
//! that it is a no-op. `cargo build -p <package>` would resolve them for that package
//! alone (without this crate's `tempfile`, say, which turns on `bitflags/std`) and
//! compile `coreg` and a dozen dependencies again (minutes on two cores), then link
//! the binary again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use crate::reference::workspace_root;

/// `coreg-trainer`, built if needed.
pub fn trainer() -> PathBuf {
    workspace_binary("coreg-trainer")
}

/// `coreg-sampler`, built if needed.
pub fn sampler() -> PathBuf {
    workspace_binary("coreg-sampler")
}

/// The workspace's binary `name`, built for this test's profile and target (once per
/// process: later calls return the path at once).
pub fn workspace_binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    // Held while building: cargo would serialize the builds on its lock anyway, and
    // concurrent tests asking for the same binary wait for the one build.
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(path) = built.get(name) {
        return path.clone();
    }
    let path = build(name);
    built.insert(name.to_owned(), path.clone());
    path
}

/// Where this test's cargo puts binaries: the test executable is
/// `<target-dir>[/<triple>]/<profile-dir>/deps/<test>-<hash>`.
struct Output {
    /// `<target-dir>[/<triple>]/<profile-dir>`, where binaries land.
    profile_dir: PathBuf,
    target_dir: PathBuf,
    triple: Option<String>,
    /// The `cargo build` arguments that select the profile.
    profile_args: Vec<String>,
}

fn output() -> Output {
    let exe = std::env::current_exe().expect("the test executable's path");
    let deps = exe.parent().unwrap();
    assert_eq!(
        deps.file_name().and_then(|n| n.to_str()),
        Some("deps"),
        "{} is not in a cargo target directory's deps/",
        exe.display()
    );
    let profile_dir = deps.parent().unwrap().to_path_buf();
    let profile = profile_dir
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    // The target directory as cargo itself resolves it (CARGO_TARGET_DIR, config,
    // or `target/`); binaries built for an explicit `--target` sit one level below it.
    let target_dir = cargo_target_dir();
    let above = profile_dir.parent().unwrap();
    let triple = (above != target_dir.as_path())
        .then(|| above.file_name().unwrap().to_str().unwrap().to_owned());
    let profile_args = match profile.as_str() {
        // `cargo test` builds binaries with `dev` (its `test` profile's base) into
        // `debug/`, and with `--release` into `release/`.
        "debug" => vec![],
        "release" => vec!["--release".to_owned()],
        other => vec!["--profile".to_owned(), other.to_owned()],
    };
    Output {
        profile_dir,
        target_dir,
        triple,
        profile_args,
    }
}

/// `target_directory` from `cargo metadata` for this workspace.
fn cargo_target_dir() -> PathBuf {
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--manifest-path",
        ])
        .arg(workspace_root().join("Cargo.toml"))
        .output()
        .expect("running cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metadata: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");
    let dir = metadata["target_directory"]
        .as_str()
        .expect("cargo metadata names the target directory");
    PathBuf::from(dir)
}

fn build(name: &str) -> PathBuf {
    let output = output();
    let binary = output
        .profile_dir
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let cargo = env!("CARGO");
    let mut command = Command::new(cargo);
    command
        .arg("build")
        .arg("--manifest-path")
        .arg(workspace_root().join("Cargo.toml"))
        .args(["--workspace", "--bin", name])
        .arg("--target-dir")
        .arg(&output.target_dir)
        .args(&output.profile_args);
    if let Some(triple) = &output.triple {
        command.args(["--target", triple]);
    }
    // What cargo set for this test process describes the test's package, not the
    // build: build scripts that watch such a variable (ring's watches
    // CARGO_MANIFEST_DIR) would rerun and rebuild half the workspace, twice.
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(set_for_the_test) {
            command.env_remove(&key);
        }
    }
    let result = command.output();
    match result {
        // Shown with the test's output: says what was built, when it took long.
        Ok(out) if out.status.success() => eprint!("{}", String::from_utf8_lossy(&out.stderr)),
        Ok(out) => panic!(
            "`{cargo} build --workspace --bin {name}` failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        // No cargo where the test was compiled (a test executable copied elsewhere):
        // use the binary as built beside it, if it is there.
        Err(e) if binary_exists(&binary) => {
            eprintln!(
                "cannot run {cargo} ({e}); using {} as it is",
                binary.display()
            );
        }
        Err(e) => panic!(
            "cannot run {cargo} to build {name} ({e}), and there is no {}",
            binary.display()
        ),
    }
    assert!(
        binary_exists(&binary),
        "cargo built {name}, but not at {}",
        binary.display()
    );
    binary
}

/// The variables cargo sets for a test it runs (beside the dynamic library path),
/// none of which configures cargo itself (unlike `CARGO_TARGET_DIR`, `CARGO_HOME`,
/// `CARGO_PROFILE_…`, `CARGO_INCREMENTAL`, which pass through).
fn set_for_the_test(key: &str) -> bool {
    matches!(
        key,
        "CARGO_MANIFEST_DIR"
            | "CARGO_MANIFEST_PATH"
            | "CARGO_CRATE_NAME"
            | "CARGO_BIN_NAME"
            | "CARGO_PRIMARY_PACKAGE"
            | "CARGO_TARGET_TMPDIR"
            | "OUT_DIR"
    ) || key.starts_with("CARGO_PKG_")
        || key.starts_with("CARGO_BIN_EXE_")
}

fn binary_exists(path: &Path) -> bool {
    path.is_file()
}
