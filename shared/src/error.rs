//! The library's error type. Every error that comes from a file names the file (and,
//! for configuration, the key) so that a user with a broken model folder knows what
//! to fix.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A configuration file is missing a key, has a malformed value, or asks for
    /// something this implementation does not support.
    #[error("{}: key `{key}`: {message}", path.display())]
    Config {
        path: PathBuf,
        key: String,
        message: String,
    },
    /// A weights file is unreadable, lacks a tensor, or holds one of the wrong shape.
    #[error("{}: {message}", path.display())]
    Weights { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Caller input that the model cannot take (wrong shape, out-of-range value).
    #[error("{0}")]
    InvalidInput(String),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// The object store failed: unreachable, refused, or an operation its backend lacks.
    #[error("object store: `{path}`: {message}")]
    Store { path: String, message: String },
    /// A concept, version or stored object that does not exist.
    #[error("{what} not found")]
    NotFound { what: String },
    /// A create-only write found its target already there (a concept version is never
    /// overwritten).
    #[error("{what} already exists")]
    AlreadyExists { what: String },
    /// Stored data that fails its size, digest or format check, or a blob a manifest
    /// lists that is missing.
    #[error("corrupt artifact `{path}`: {message}")]
    CorruptArtifact { path: String, message: String },
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn config(
        path: impl Into<PathBuf>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Config {
            path: path.into(),
            key: key.into(),
            message: message.into(),
        }
    }

    pub fn weights(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Weights {
            path: path.into(),
            message: message.into(),
        }
    }
}
