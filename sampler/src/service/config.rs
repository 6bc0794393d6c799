//! `coreg-sampler serve`'s configuration: built-in defaults < TOML file < `COREG_…`
//! environment, read as [`coreg_serving::config`] describes (the same keys as the
//! trainer's where they mean the same). Validated before the service starts, with
//! errors naming the key.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use coreg_serving::config::{self, AuthConfig, ModelConfig, StoreConfig, TlsConfig};
use figment::providers::Env;
use serde::{Deserialize, Serialize};

pub use coreg_serving::config::ConfigError;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SamplerConfig {
    /// The gRPC address.
    pub listen: SocketAddr,
    /// Prometheus metrics (`GET /metrics`) on their own port; `"off"` for none.
    #[serde(with = "config::optional_address")]
    pub metrics_listen: Option<SocketAddr>,
    pub model: ModelConfig,
    pub store: StoreConfig,
    pub cache: CacheConfig,
    pub limits: LimitsConfig,
    /// On SIGTERM, how long in-flight generations have to finish before the service
    /// exits anyway.
    pub shutdown_grace_seconds: u64,
    /// `text` or `json`.
    pub log_format: String,
    pub auth: AuthConfig,
    pub tls: Option<TlsConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Verified concepts (embedding, U-Net delta, training latents) kept in memory,
    /// least recently used evicted first. A full SD 2.1 exact delta is up to 3.4 GB;
    /// 0 turns the cache off (every request reads and verifies its concept).
    pub budget_bytes: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// The largest gRPC message accepted or sent (inline PNGs travel in responses).
    pub max_message_bytes: usize,
    /// Generations admitted at once (one runs on the model thread, the others wait
    /// their turn); more are answered RESOURCE_EXHAUSTED.
    pub max_concurrent_generations: usize,
    /// Concurrent ListConcepts/GetConcept calls; more are RESOURCE_EXHAUSTED.
    pub max_concurrent_requests: usize,
    /// The largest image side in pixels (a multiple of 8).
    pub max_image_side: u32,
    /// The most denoising steps per request.
    pub max_steps: u32,
    /// The most test-time optimization steps per prompt.
    pub max_tto_steps: u32,
    /// The most images one request may ask for (prompts × images per prompt).
    pub max_images_per_request: u32,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            listen: "0.0.0.0:50052".parse().expect("a socket address"),
            metrics_listen: Some("0.0.0.0:9091".parse().expect("a socket address")),
            model: ModelConfig::default(),
            store: StoreConfig::default(),
            cache: CacheConfig {
                budget_bytes: 8 << 30,
            },
            limits: LimitsConfig {
                max_message_bytes: 64 << 20,
                max_concurrent_generations: 4,
                max_concurrent_requests: 64,
                max_image_side: 1024,
                max_steps: 200,
                max_tto_steps: 100,
                max_images_per_request: 16,
            },
            shutdown_grace_seconds: 60,
            log_format: "text".into(),
            auth: AuthConfig::default(),
            tls: None,
        }
    }
}

/// The top-level keys of [`SamplerConfig`]: only `COREG_` variables naming one of them
/// are configuration (see [`config::environment`]).
const TOP_LEVEL_KEYS: &[&str] = &[
    "listen",
    "metrics_listen",
    "model",
    "store",
    "cache",
    "limits",
    "shutdown_grace_seconds",
    "log_format",
    "auth",
    "tls",
];

impl SamplerConfig {
    /// Defaults < `file` (must exist when given) < `COREG_…` environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, config::environment("COREG_", TOP_LEVEL_KEYS))
    }

    fn load_from(file: Option<&Path>, env: Env) -> Result<Self, ConfigError> {
        let config: SamplerConfig = config::load(SamplerConfig::default(), file, env)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: String| Err(ConfigError(format!("{key}: {why}")));
        let limits = &self.limits;
        if !(1 << 20..=1 << 30).contains(&limits.max_message_bytes) {
            return bad(
                "limits.max_message_bytes",
                format!("{} is outside [1 MiB, 1 GiB]", limits.max_message_bytes),
            );
        }
        for (key, value, range) in [
            (
                "limits.max_concurrent_generations",
                limits.max_concurrent_generations as u64,
                1..=1024,
            ),
            (
                "limits.max_concurrent_requests",
                limits.max_concurrent_requests as u64,
                1..=65536,
            ),
            ("limits.max_steps", u64::from(limits.max_steps), 1..=1000),
            (
                "limits.max_tto_steps",
                u64::from(limits.max_tto_steps),
                1..=1000,
            ),
            (
                "limits.max_images_per_request",
                u64::from(limits.max_images_per_request),
                1..=64,
            ),
        ] {
            if !range.contains(&value) {
                return bad(
                    key,
                    format!("{value} is outside [{}, {}]", range.start(), range.end()),
                );
            }
        }
        if limits.max_image_side < 64
            || limits.max_image_side > 4096
            || limits.max_image_side % 8 != 0
        {
            return bad(
                "limits.max_image_side",
                format!(
                    "{} must be a multiple of 8 in [64, 4096]",
                    limits.max_image_side
                ),
            );
        }
        if self.shutdown_grace_seconds > 3600 {
            return bad(
                "shutdown_grace_seconds",
                format!("{} is over 3600", self.shutdown_grace_seconds),
            );
        }
        config::validate_log_format(&self.log_format)?;
        self.auth.validate()
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
        assert_eq!(config::field_names(&SamplerConfig::default()), known);
    }

    #[test]
    fn environment_overrides_the_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sampler.toml");
        std::fs::write(
            &file,
            "[cache]\nbudget_bytes = 1000\n[limits]\nmax_steps = 30\n[model]\npath = \"/m\"\n",
        )
        .unwrap();
        let config = SamplerConfig::load_from(
            Some(&file),
            env(&[
                ("LIMITS__MAX_STEPS", "40"),
                ("STORE__URL", "memory:///"),
                ("PYTHON", "/usr/bin/python3"),
            ]),
        )
        .unwrap();
        assert_eq!(config.limits.max_steps, 40);
        assert_eq!(config.cache.budget_bytes, 1000);
        assert_eq!(config.store.url, "memory:///");
        assert_eq!(config.model.path, std::path::PathBuf::from("/m"));
        assert_eq!(config.limits.max_concurrent_generations, 4);
    }

    #[test]
    fn bad_values_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        for (text, key) in [
            ("[limits]\nmax_steps = 0", "limits.max_steps"),
            (
                "[limits]\nmax_concurrent_generations = 0",
                "limits.max_concurrent_generations",
            ),
            ("[limits]\nmax_image_side = 1020", "limits.max_image_side"),
            (
                "[limits]\nmax_message_bytes = 10",
                "limits.max_message_bytes",
            ),
            ("log_format = \"yaml\"", "log_format"),
            ("[auth]\nbearer_token = \"short\"", "auth.bearer_token"),
            ("[cache]\nbudget = 1", "budget"),
        ] {
            let file = dir.path().join("c.toml");
            std::fs::write(&file, text).unwrap();
            let err = SamplerConfig::load_from(Some(&file), env(&[])).unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
    }
}
