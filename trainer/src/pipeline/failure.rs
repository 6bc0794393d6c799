//! How a library error becomes a [`JobFailure`], and so an exit code a batch system
//! acts on.
//!
//! The error's kind says what went wrong; the job's phase settles the one ambiguity.
//! Storage trouble is transient whenever it happens (a retry resumes from the last
//! checkpoint). An unusable value is the user's to fix while the job's inputs are
//! read and the stages built from them (65), but once training runs the same kind of
//! error — a NaN loss, a malformed checkpoint — means the run itself failed (70).

use coreg::Error;

use crate::exit::JobFailure;

/// What the job was doing when the library failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Reading and checking the photos, the placeholder, the category word and the
    /// prompts, and building the stages from them.
    Inputs,
    /// Training, checkpointing, resuming and publishing.
    Training,
}

impl Phase {
    /// The failure `error` means in this phase.
    pub(super) fn classify(self, error: Error) -> JobFailure {
        let message = error.to_string();
        match error {
            Error::Io { .. } | Error::Store { .. } => JobFailure::Transient(message),
            Error::NotFound { .. } => match self {
                // A photo key that names nothing.
                Phase::Inputs => JobFailure::BadInput(message),
                // Something of the job's own vanished from the store: try again.
                Phase::Training => JobFailure::Transient(message),
            },
            // A concept version is never overwritten: publishing again needs a new one.
            Error::AlreadyExists { .. } => JobFailure::BadInput(message),
            Error::CorruptArtifact { .. } | Error::Torch(_) => JobFailure::Failed(message),
            Error::InvalidInput(_)
            | Error::Tokenizer(_)
            | Error::Config { .. }
            | Error::Weights { .. } => match self {
                Phase::Inputs => JobFailure::BadInput(message),
                Phase::Training => JobFailure::Failed(message),
            },
        }
    }

    /// [`Phase::classify`] as a function for `map_err`.
    pub(super) fn of(self) -> impl Fn(Error) -> JobFailure {
        move |error| self.classify(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(phase: Phase, error: Error) -> u8 {
        phase.classify(error).code()
    }

    #[test]
    fn storage_trouble_is_transient_in_every_phase() {
        for phase in [Phase::Inputs, Phase::Training] {
            let store = Error::Store {
                path: "jobs/x".into(),
                message: "503".into(),
            };
            assert_eq!(code(phase, store), 75);
        }
    }

    #[test]
    fn unusable_values_are_bad_input_before_training_and_failures_during_it() {
        let nan = || Error::InvalidInput("loss is NaN".into());
        assert_eq!(code(Phase::Inputs, nan()), 65);
        assert_eq!(code(Phase::Training, nan()), 70);
        let missing = || Error::NotFound {
            what: "uploads/a.png".into(),
        };
        assert_eq!(code(Phase::Inputs, missing()), 65);
        assert_eq!(code(Phase::Training, missing()), 75);
    }
}
