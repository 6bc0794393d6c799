//! `coreg-sampler`: the generation service (sampling with optional test-time optimization).
//!
//! At this stage the binary only reports the libtorch it links; its commands arrive
//! with the gRPC contracts (see the top-level README's status table).

use clap::Parser;

#[derive(Parser)]
#[command(name = "coreg-sampler", version)]
struct Cli {}

fn main() {
    Cli::parse();
    println!("coreg-sampler {}", env!("CARGO_PKG_VERSION"));
    println!("cuda available: {}", tch::Cuda::is_available());
}
