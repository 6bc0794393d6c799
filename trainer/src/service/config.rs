//! `coreg-trainer serve`'s configuration: built-in defaults < TOML file < `COREG_…`
//! environment, read as [`coreg_serving::config`] describes. Everything is validated
//! before the service starts, with errors naming the key.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use coreg_serving::config::{self, AuthConfig, ModelConfig, StoreConfig, TlsConfig};
use figment::providers::Env;
use serde::{Deserialize, Serialize};

pub use coreg_serving::config::ConfigError;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// The gRPC address.
    pub listen: SocketAddr,
    /// Prometheus metrics (`GET /metrics`) on their own port; `"off"` for none.
    #[serde(with = "config::optional_address")]
    pub metrics_listen: Option<SocketAddr>,
    pub model: ModelConfig,
    pub store: StoreConfig,
    /// This replica's name in job claims; host name and process id by default.
    pub replica_id: Option<String>,
    /// How long a claim on a job lasts without renewal: a replica that dies without
    /// releasing its job loses it this long after its last renewal.
    pub lease_seconds: u64,
    /// How often an idle replica looks for queued jobs.
    pub poll_milliseconds: u64,
    /// A job whose replicas died with it this many times (killed, out of memory, a
    /// panic: the lease expired without being released) ends FAILED, so that a job
    /// that kills its replica cannot cycle through the fleet forever.
    pub max_crashes: u32,
    /// A job whose attempts failed this many times for reasons a retry may fix
    /// (storage trouble) ends FAILED. Give-backs on shutdown never count.
    pub max_failures: u32,
    /// Photos given by object key must lie under this prefix of the store (users
    /// upload there); every other key — concepts, generated images, other jobs, the
    /// queue — is refused.
    pub upload_prefix: String,
    /// On SIGTERM, how long a running job has to reach a step boundary and checkpoint
    /// before the service exits anyway.
    pub shutdown_grace_seconds: u64,
    pub limits: LimitsConfig,
    /// `text` or `json`.
    pub log_format: String,
    pub auth: AuthConfig,
    pub tls: Option<TlsConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// The largest gRPC message accepted (inline images travel in it).
    pub max_request_bytes: usize,
    /// Requests handled at once; more are answered RESOURCE_EXHAUSTED.
    pub max_concurrent_requests: usize,
    /// Jobs that may wait in the queue; more are answered RESOURCE_EXHAUSTED.
    pub max_queued_jobs: usize,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            listen: "0.0.0.0:50051".parse().expect("a socket address"),
            metrics_listen: Some("0.0.0.0:9090".parse().expect("a socket address")),
            model: ModelConfig::default(),
            store: StoreConfig::default(),
            replica_id: None,
            lease_seconds: 30,
            poll_milliseconds: 1000,
            max_crashes: 3,
            max_failures: 5,
            upload_prefix: "uploads/".into(),
            shutdown_grace_seconds: 30,
            limits: LimitsConfig {
                max_request_bytes: 64 << 20,
                max_concurrent_requests: 64,
                max_queued_jobs: 1000,
            },
            log_format: "text".into(),
            auth: AuthConfig::default(),
            tls: None,
        }
    }
}

/// The top-level keys of [`ServiceConfig`]: only `COREG_` variables naming one of them
/// are configuration (see [`config::environment`]).
const TOP_LEVEL_KEYS: &[&str] = &[
    "listen",
    "metrics_listen",
    "model",
    "store",
    "replica_id",
    "lease_seconds",
    "poll_milliseconds",
    "max_crashes",
    "max_failures",
    "upload_prefix",
    "shutdown_grace_seconds",
    "limits",
    "log_format",
    "auth",
    "tls",
];

impl ServiceConfig {
    /// Defaults < `file` (must exist when given) < `COREG_…` environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, config::environment("COREG_", TOP_LEVEL_KEYS))
    }

    fn load_from(file: Option<&Path>, env: Env) -> Result<Self, ConfigError> {
        let config: ServiceConfig = config::load(ServiceConfig::default(), file, env)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: String| Err(ConfigError(format!("{key}: {why}")));
        if self.lease_seconds < 3 || self.lease_seconds > 3600 {
            return bad(
                "lease_seconds",
                format!("{} is outside [3, 3600]", self.lease_seconds),
            );
        }
        if self.poll_milliseconds == 0 || self.poll_milliseconds > 60_000 {
            return bad(
                "poll_milliseconds",
                format!("{} is outside [1, 60000]", self.poll_milliseconds),
            );
        }
        for (key, value) in [
            ("max_crashes", self.max_crashes),
            ("max_failures", self.max_failures),
        ] {
            if !(1..=100).contains(&value) {
                return bad(key, format!("{value} is outside [1, 100]"));
            }
        }
        let prefix = &self.upload_prefix;
        let segments_ok = prefix
            .trim_end_matches('/')
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..");
        let reserved = ["jobs", "concepts", "blobs", "index", "queue", "generated"]
            .iter()
            .any(|r| prefix.trim_end_matches('/') == *r);
        if !prefix.ends_with('/') || prefix.starts_with('/') || !segments_ok || reserved {
            return bad(
                "upload_prefix",
                format!(
                    "{prefix:?} must be a folder of the store ending in `/` (e.g. `uploads/`), \
                     not one of coreg's own"
                ),
            );
        }
        if self.shutdown_grace_seconds > 3600 {
            return bad(
                "shutdown_grace_seconds",
                format!("{} is over 3600", self.shutdown_grace_seconds),
            );
        }
        let limits = &self.limits;
        if !(1 << 20..=1 << 30).contains(&limits.max_request_bytes) {
            return bad(
                "limits.max_request_bytes",
                format!("{} is outside [1 MiB, 1 GiB]", limits.max_request_bytes),
            );
        }
        if limits.max_concurrent_requests == 0 {
            return bad(
                "limits.max_concurrent_requests",
                "must be at least 1".into(),
            );
        }
        if limits.max_queued_jobs == 0 {
            return bad("limits.max_queued_jobs", "must be at least 1".into());
        }
        config::validate_log_format(&self.log_format)?;
        if let Some(id) = &self.replica_id {
            let safe = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
            if id.is_empty() || id.len() > 128 || !id.chars().all(safe) {
                return bad(
                    "replica_id",
                    format!("{id:?} must be 1–128 characters of [A-Za-z0-9._-]"),
                );
            }
        }
        self.auth.validate()
    }

    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.lease_seconds)
    }

    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_milliseconds)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_seconds)
    }

    /// The bearer token clients must present, if authentication is on.
    pub fn bearer_token(&self) -> Result<Option<String>, ConfigError> {
        self.auth.bearer_token()
    }

    /// The configuration as logged at start, secrets redacted.
    pub fn redacted(&self) -> serde_json::Value {
        config::redacted(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Env {
        config::test_environment(vars, TOP_LEVEL_KEYS)
    }

    #[test]
    fn the_known_keys_are_exactly_the_configuration_fields() {
        let mut known: Vec<String> = TOP_LEVEL_KEYS.iter().map(|k| k.to_string()).collect();
        known.sort_unstable();
        assert_eq!(config::field_names(&ServiceConfig::default()), known);
    }

    #[test]
    fn environment_overrides_the_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("trainer.toml");
        std::fs::write(
            &file,
            "lease_seconds = 10\n[store]\nurl = \"memory:///\"\n[model]\npath = \"/m\"\n",
        )
        .unwrap();
        let config = ServiceConfig::load_from(
            Some(&file),
            env(&[("LEASE_SECONDS", "12"), ("MODEL__DEVICE", "cpu")]),
        )
        .unwrap();
        assert_eq!(config.lease_seconds, 12);
        assert_eq!(config.model.device, "cpu");
        assert_eq!(config.model.path, std::path::PathBuf::from("/m"));
        assert_eq!(config.store.url, "memory:///");
        assert_eq!(config.poll_milliseconds, 1000);
    }

    #[test]
    fn bad_values_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.toml");
        let err =
            ServiceConfig::load_from(Some(&missing), Env::prefixed("COREG_NONE_")).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");

        for (text, key) in [
            ("lease_seconds = 1", "lease_seconds"),
            ("log_format = \"yaml\"", "log_format"),
            ("replica_id = \"../x\"", "replica_id"),
            ("[auth]\nbearer_token = \"short\"", "auth.bearer_token"),
            (
                "[limits]\nmax_request_bytes = 10",
                "limits.max_request_bytes",
            ),
            ("lease_secs = 10", "lease_secs"),
            ("max_crashes = 0", "max_crashes"),
            ("upload_prefix = \"jobs/\"", "upload_prefix"),
            ("upload_prefix = \"uploads\"", "upload_prefix"),
            ("upload_prefix = \"../x/\"", "upload_prefix"),
        ] {
            let file = dir.path().join("c.toml");
            std::fs::write(&file, text).unwrap();
            let err =
                ServiceConfig::load_from(Some(&file), Env::prefixed("COREG_NONE_")).unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
    }
}
