//! The Python reference the parity tests compare against (`tests/reference/`, on
//! diffusers and transformers, installed in the set-up's venv), the workspace paths
//! tests need from any crate, and the tolerance measure the parity tests state.
//!
//! Exists so that every test crate finds the same interpreter and runs the reference
//! the same way, and so that "within 1e-3" means the same thing in every parity test.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use tch::{Kind, Tensor};

/// The workspace root, whichever crate's test asks (this crate is `tests/support`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .unwrap()
        .to_path_buf()
}

/// The Python that has the reference packages: `COREG_PYTHON`, else the set-up's venv.
/// A missing interpreter fails the test: `make test` installs it.
pub fn python() -> PathBuf {
    let path = std::env::var_os("COREG_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/python"));
    assert!(
        path.exists(),
        "no Python reference interpreter at {} (run `make test`, which sets it up, or set COREG_PYTHON)",
        path.display()
    );
    path
}

/// Runs `python -m <module> args…` from `tests/reference`, panicking with its output
/// if it fails.
pub fn run_reference(module: &str, args: &[&str]) {
    let out = Command::new(python())
        .current_dir(workspace_root().join("tests/reference"))
        .arg("-m")
        .arg(module)
        .args(args)
        .output()
        .expect("starting the Python reference");
    assert!(
        out.status.success(),
        "reference `{module} {}` failed:\n{}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Reads a safetensors file into name → tensor.
pub fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// max |got − want| / max |want|: the tolerance measure the parity tests state.
pub fn relative_max_error(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.size(), want.size(), "shapes differ");
    let got = got.to_kind(Kind::Double);
    let want = want.to_kind(Kind::Double);
    let diff = (&got - &want).abs().max().double_value(&[]);
    let scale = want.abs().max().double_value(&[]);
    assert!(
        scale > 0.0,
        "reference tensor is all zeros: the comparison would prove nothing"
    );
    diff / scale
}

/// Asserts `got` matches `want` within `tol` of the reference's largest magnitude.
pub fn assert_close(name: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let err = relative_max_error(got, want);
    assert!(
        err <= tol,
        "{name}: max |rust − ref| / max |ref| = {err:.3e} exceeds {tol:.0e}"
    );
}
