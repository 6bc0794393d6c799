//! `coreg-trainer`: CoRe training. `run` trains one job file to completion (for batch
//! systems and Kubernetes Jobs), with exit codes that separate input a retry cannot
//! fix from transient failures.

// A function over ~80 lines (clippy.toml) mixes ideas that read better apart.
#![warn(clippy::too_many_lines)]

mod exit;
mod failpoint;
mod job;
mod job_store;
mod pipeline;
mod previews;
mod progress;
mod service;

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
    /// Serve the gRPC training API (`coreg.v1.TrainerService`) until SIGTERM.
    ///
    /// Configuration: built-in defaults < `--config FILE` (TOML) < `COREG_…`
    /// environment variables (nested keys joined by `__`, e.g. `COREG_STORE__URL`).
    Serve {
        #[arg(long, env = "COREG_CONFIG")]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run { job, job_id } => {
            coreg_serving::init_logging(false, "info");
            exit::report(pipeline::run_job_file(&job, job_id))
        }
        Command::Serve { config } => {
            let config = match service::load_config(config.as_deref()) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(64);
                }
            };
            coreg_serving::init_logging(config.log_format == "json", "info");
            match service::serve(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(70)
                }
            }
        }
    }
}
