//! Generates the Rust messages, clients and servers of `coreg/v1/*.proto`, plus the
//! file descriptor set that server reflection serves. `protoc` comes from the
//! `protoc-bin-vendored` crate, so no system package is needed.

use std::path::PathBuf;

const PROTOS: [&str; 3] = [
    "coreg/v1/common.proto",
    "coreg/v1/trainer.proto",
    "coreg/v1/sampler.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let well_known = protoc_bin_vendored::include_path()?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // SAFETY: a build script is single-threaded; prost-build reads PROTOC from the
    // environment.
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("coreg_v1_descriptor.bin"))
        .compile_protos(
            &PROTOS.map(PathBuf::from),
            &[PathBuf::from("."), well_known],
        )?;
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
