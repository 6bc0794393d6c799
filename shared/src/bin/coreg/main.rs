//! `coreg`: the project's command-line tool for working with models directly.
//!
//! `coreg model init` makes a random SD 2.1-architecture model, `coreg model forward`
//! runs its components on tensors from a safetensors file, `coreg model tokenize`
//! tokenizes prompts, and `coreg info` reports the libtorch it runs on.

mod core_commands;
mod model_commands;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "coreg",
    version,
    about = "CoRe personalization of Stable Diffusion 2.1"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work with a diffusers-layout model folder.
    #[command(subcommand)]
    Model(model_commands::ModelCommand),
    /// CoRe's method on tensors from a file (context regularization losses).
    #[command(subcommand)]
    Core(core_commands::CoreCommand),
    /// Print the libtorch version and the devices it can use.
    Info,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Model(command) => model_commands::run(command),
        Command::Core(command) => core_commands::run(command),
        Command::Info => {
            println!("coreg {}", env!("CARGO_PKG_VERSION"));
            println!("cuda available: {}", tch::Cuda::is_available());
            println!("cuda devices: {}", tch::Cuda::device_count());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
