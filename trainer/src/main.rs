//! `coreg-trainer`: CoRe training. `run` trains one job file to completion (for batch
//! systems and Kubernetes Jobs), with exit codes that separate input a retry cannot
//! fix from transient failures.

mod exit;
mod job;
mod pipeline;
mod previews;
mod progress;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "coreg-trainer",
    version,
    about = "CoRe training for Stable Diffusion 2.1"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train the concept a job file describes, write it to the store and exit.
    ///
    /// Exit codes: 0 done; 64 the job file is invalid; 65 the job's input is unusable
    /// (images, category, prompts); 70 training failed for a reason a retry will not
    /// fix (e.g. a non-finite loss); 75 a transient failure or SIGTERM after a
    /// checkpoint: run the same job again to resume.
    Run {
        /// The job file (TOML; see the README).
        #[arg(long)]
        job: PathBuf,
        /// Identifies the run in the store (`jobs/<id>/`); running the same id again
        /// resumes from its last checkpoint. Defaults to a digest of the job file.
        #[arg(long)]
        job_id: Option<String>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run { job, job_id } => exit::report(pipeline::run_job_file(&job, job_id)),
    }
}
