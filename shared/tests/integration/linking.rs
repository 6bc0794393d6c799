//! The binaries run without `LD_LIBRARY_PATH` (an rpath points at the venv's libtorch)
//! and keep `libtorch_cuda.so` as a NEEDED library, so CUDA works on GPU hosts even
//! though rustc links with `--as-needed`.

use std::process::Command;

#[test]
fn coreg_runs_without_library_path() {
    let out = Command::new(env!("CARGO_BIN_EXE_coreg"))
        .arg("info")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("cuda available:"), "{stdout}");
}

#[test]
fn coreg_links_libtorch_cuda() {
    let out = Command::new("readelf")
        .args(["--dynamic", env!("CARGO_BIN_EXE_coreg")])
        .output()
        .expect("readelf (binutils) is needed to inspect the binary");
    let dynamic = String::from_utf8_lossy(&out.stdout);
    let needed: Vec<&str> = dynamic.lines().filter(|l| l.contains("(NEEDED)")).collect();
    assert!(
        needed.iter().any(|l| l.contains("[libtorch_cuda.so]")),
        "libtorch_cuda.so is not NEEDED: {needed:#?}"
    );
    assert!(
        dynamic
            .lines()
            .any(|l| (l.contains("(RUNPATH)") || l.contains("(RPATH)")) && l.contains("torch/lib")),
        "no rpath to libtorch"
    );
}
