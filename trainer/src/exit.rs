//! How a one-shot run ends, as a batch system reads it (sysexits.h numbering): a
//! Kubernetes `podFailurePolicy` fails the job at once on 64, 65 and 70, and retries
//! on 75 and on disruption.

use std::process::ExitCode;

/// Why a run did not finish.
#[derive(Debug, thiserror::Error)]
pub enum JobFailure {
    /// The job file itself is wrong.
    #[error("invalid job: {0}")]
    InvalidJob(String),
    /// The job's input cannot be trained on: images, category word, prompts.
    #[error("unusable input: {0}")]
    BadInput(String),
    /// Training failed in a way a retry with the same input would repeat.
    #[error("training failed: {0}")]
    Failed(String),
    /// Storage or another dependency failed: running the same job again resumes from
    /// the last checkpoint.
    #[error("interrupted: {0}")]
    Transient(String),
    /// The run was asked to stop (SIGTERM) and checkpointed: running the same job
    /// again resumes from there. Unlike [`JobFailure::Transient`], nothing failed.
    #[error("stopped: {0}")]
    Interrupted(String),
    /// The job was cancelled (the service only).
    #[error("cancelled")]
    Cancelled,
    /// Another replica took the job over (the service only): this one must stop
    /// without writing anything of it.
    #[error("the job's lease was lost to another replica")]
    LeaseLost,
}

impl JobFailure {
    pub fn code(&self) -> u8 {
        match self {
            JobFailure::InvalidJob(_) => 64,
            JobFailure::BadInput(_) => 65,
            JobFailure::Failed(_) => 70,
            JobFailure::Transient(_)
            | JobFailure::Interrupted(_)
            | JobFailure::Cancelled
            | JobFailure::LeaseLost => 75,
        }
    }
}

pub fn report(result: Result<String, JobFailure>) -> ExitCode {
    match result {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(failure) => {
            eprintln!("error: {failure}");
            ExitCode::from(failure.code())
        }
    }
}
