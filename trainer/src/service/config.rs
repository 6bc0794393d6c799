//! `coreg-trainer serve`'s configuration: built-in defaults, overridden by a TOML file
//! (which must exist when named), overridden by `COREG_…` environment variables whose
//! nested keys are split on `__` (`COREG_STORE__URL`, `COREG_AUTH__BEARER_TOKEN`).
//! Everything is validated before the service starts, with errors naming the key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// The gRPC address.
    pub listen: SocketAddr,
    /// Prometheus metrics (`GET /metrics`) on their own port; off when absent.
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
pub struct ModelConfig {
    /// A diffusers-layout SD 2.1 folder.
    pub path: PathBuf,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    pub variant: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub url: String,
    /// Backend options (credentials, endpoint, region) by object_store's key names.
    #[serde(deserialize_with = "options_as_strings")]
    pub options: BTreeMap<String, String>,
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

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Clients must send `authorization: Bearer <token>`; health checks are exempt.
    pub bearer_token: Option<String>,
    /// The same, read from a file (a mounted Kubernetes secret).
    pub bearer_token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain and private key of the server.
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            listen: "0.0.0.0:50051".parse().expect("a socket address"),
            metrics_listen: Some("0.0.0.0:9090".parse().expect("a socket address")),
            model: ModelConfig {
                path: PathBuf::from("model"),
                device: "auto".into(),
                variant: None,
            },
            store: StoreConfig {
                url: "file:///var/lib/coreg/store".into(),
                options: BTreeMap::new(),
            },
            replica_id: None,
            lease_seconds: 30,
            poll_milliseconds: 1000,
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

/// Store options are strings to object_store, but figment reads `COREG_STORE__OPTIONS__
/// AWS_ALLOW_HTTP=true` as a boolean and TOML may say `true` or `443` unquoted: any
/// scalar is taken as its text.
fn options_as_strings<'de, D>(deserializer: D) -> Result<BTreeMap<String, String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Scalar(String);
    impl<'de> Deserialize<'de> for Scalar {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct Visitor;
            impl serde::de::Visitor<'_> for Visitor {
                type Value = Scalar;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a string, number or boolean")
                }
                fn visit_str<E>(self, v: &str) -> Result<Scalar, E> {
                    Ok(Scalar(v.to_owned()))
                }
                fn visit_bool<E>(self, v: bool) -> Result<Scalar, E> {
                    Ok(Scalar(v.to_string()))
                }
                fn visit_i64<E>(self, v: i64) -> Result<Scalar, E> {
                    Ok(Scalar(v.to_string()))
                }
                fn visit_u64<E>(self, v: u64) -> Result<Scalar, E> {
                    Ok(Scalar(v.to_string()))
                }
                fn visit_f64<E>(self, v: f64) -> Result<Scalar, E> {
                    Ok(Scalar(v.to_string()))
                }
            }
            deserializer.deserialize_any(Visitor)
        }
    }
    let map = BTreeMap::<String, Scalar>::deserialize(deserializer)?;
    Ok(map.into_iter().map(|(k, v)| (k, v.0)).collect())
}

/// The top-level keys of [`ServiceConfig`]. Only environment variables naming one of
/// them are configuration: other tools share the `COREG_` prefix (`COREG_CONFIG`
/// names the file, the test set-up exports `COREG_PYTHON`), and a misspelt nested
/// key (`COREG_STORE__ULR`) is still refused as unknown.
const TOP_LEVEL_KEYS: [&str; 12] = [
    "listen",
    "metrics_listen",
    "model",
    "store",
    "replica_id",
    "lease_seconds",
    "poll_milliseconds",
    "shutdown_grace_seconds",
    "limits",
    "log_format",
    "auth",
    "tls",
];

/// The `{prefix}…` variables that configure the service, nested keys split on `__`.
fn environment(prefix: &str) -> Env {
    Env::prefixed(prefix).split("__").filter(|key| {
        let top = key.as_str().split('.').next().unwrap_or_default();
        TOP_LEVEL_KEYS
            .iter()
            .any(|known| top.eq_ignore_ascii_case(known))
    })
}

/// A configuration that cannot be used; the message names the key.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

impl ServiceConfig {
    /// Defaults < `file` (must exist when given) < `COREG_…` environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, environment("COREG_"))
    }

    fn load_from(file: Option<&Path>, env: Env) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(ServiceConfig::default()));
        if let Some(file) = file {
            if !file.is_file() {
                return Err(ConfigError(format!(
                    "the configuration file {} does not exist",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        let config: ServiceConfig = figment
            .merge(env)
            .extract()
            .map_err(|e| ConfigError(e.to_string()))?;
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
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return bad(
                "log_format",
                format!("{:?} is not \"text\" or \"json\"", self.log_format),
            );
        }
        if let Some(id) = &self.replica_id {
            let safe = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
            if id.is_empty() || id.len() > 128 || !id.chars().all(safe) {
                return bad(
                    "replica_id",
                    format!("{id:?} must be 1–128 characters of [A-Za-z0-9._-]"),
                );
            }
        }
        if self.auth.bearer_token.is_some() && self.auth.bearer_token_file.is_some() {
            return bad(
                "auth",
                "give bearer_token or bearer_token_file, not both".into(),
            );
        }
        if let Some(token) = &self.auth.bearer_token {
            if token.len() < 16 {
                return bad("auth.bearer_token", "must be at least 16 characters".into());
            }
        }
        Ok(())
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
        match (&self.auth.bearer_token, &self.auth.bearer_token_file) {
            (Some(token), _) => Ok(Some(token.clone())),
            (None, Some(path)) => {
                let token = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError(format!("auth.bearer_token_file {}: {e}", path.display()))
                })?;
                let token = token.trim().to_string();
                if token.len() < 16 {
                    return Err(ConfigError(format!(
                        "auth.bearer_token_file {}: the token must be at least 16 characters",
                        path.display()
                    )));
                }
                Ok(Some(token))
            }
            (None, None) => Ok(None),
        }
    }

    /// The configuration as logged at start: secrets and store options' values
    /// redacted.
    pub fn redacted(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        if let Some(options) = value.pointer_mut("/store/options") {
            let keys: Vec<&String> = self.store.options.keys().collect();
            *options = serde_json::json!(keys);
        }
        if self.auth.bearer_token.is_some() {
            if let Some(token) = value.pointer_mut("/auth/bearer_token") {
                *token = serde_json::json!("<redacted>");
            }
        }
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `vars` under a prefix no real environment uses and no other call shares (tests
    /// run concurrently in one process), so only these variables count.
    fn env(vars: &[(&str, &str)]) -> Env {
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prefix = format!("COREG_TEST_{}_{call}_", std::process::id());
        for (key, value) in vars {
            // Each call has its own prefix, so no other test reads or writes these.
            std::env::set_var(format!("{prefix}{key}"), value);
        }
        environment(&prefix)
    }

    #[test]
    fn the_known_keys_are_exactly_the_configuration_fields() {
        let value = serde_json::to_value(ServiceConfig::default()).unwrap();
        let mut fields: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        fields.sort_unstable();
        let mut known = TOP_LEVEL_KEYS.to_vec();
        known.sort_unstable();
        assert_eq!(fields, known);
    }

    #[test]
    fn other_tools_variables_are_ignored_but_misspelt_nested_keys_are_not() {
        let config = ServiceConfig::load_from(
            None,
            env(&[
                ("PYTHON", "/usr/bin/python3"),
                ("CONFIG", "/etc/coreg.toml"),
                ("STORE__URL", "memory:///"),
                ("STORE__OPTIONS__AWS_ALLOW_HTTP", "true"),
                ("STORE__OPTIONS__AWS_REGION", "us-east-1"),
                ("MODEL__PATH", "/m"),
            ]),
        )
        .unwrap();
        assert_eq!(config.store.url, "memory:///");
        assert_eq!(config.store.options["aws_allow_http"], "true");
        assert_eq!(config.store.options["aws_region"], "us-east-1");
        let error = ServiceConfig::load_from(
            None,
            env(&[("STORE__ULR", "memory:///"), ("MODEL__PATH", "/m")]),
        )
        .unwrap_err();
        assert!(error.to_string().contains("ulr"), "{error}");
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
        assert_eq!(config.model.path, PathBuf::from("/m"));
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
        ] {
            let file = dir.path().join("c.toml");
            std::fs::write(&file, text).unwrap();
            let err =
                ServiceConfig::load_from(Some(&file), Env::prefixed("COREG_NONE_")).unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn secrets_are_redacted() {
        let mut config = ServiceConfig::default();
        config.auth.bearer_token = Some("0123456789abcdef-secret".into());
        config
            .store
            .options
            .insert("aws_secret_access_key".into(), "hunter2".into());
        let shown = config.redacted().to_string();
        assert!(!shown.contains("0123456789abcdef-secret"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("aws_secret_access_key"), "{shown}");
    }
}
