//! `coreg-trainer`: the CoRe training service (stage 1, stage 2, artifacts).
//!
//! At this stage the binary only reports the libtorch it links; its commands arrive
//! with the gRPC contracts (see the top-level README's status table).

use clap::Parser;

#[derive(Parser)]
#[command(name = "coreg-trainer", version)]
struct Cli {}

fn main() {
    Cli::parse();
    println!("coreg-trainer {}", env!("CARGO_PKG_VERSION"));
    println!("cuda available: {}", tch::Cuda::is_available());
}
