//! Configuration both services read the same way: built-in defaults, overridden by a
//! TOML file (which must exist when named), overridden by `COREG_…` environment
//! variables whose nested keys are split on `__` (`COREG_STORE__URL`,
//! `COREG_AUTH__BEARER_TOKEN`). The sections they share (model, store, auth, TLS) are
//! defined here; each service adds its own keys and validates the whole before it
//! starts, with errors naming the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A configuration that cannot be used; the message names the key.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

/// The shortest bearer token accepted: a guessable token is worse than none, since it
/// looks like protection.
pub const MIN_TOKEN_CHARS: usize = 16;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A diffusers-layout SD 2.1 folder.
    pub path: PathBuf,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    pub variant: Option<String>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            path: PathBuf::from("model"),
            device: "auto".into(),
            variant: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub url: String,
    /// Backend options (credentials, endpoint, region) by object_store's key names.
    #[serde(deserialize_with = "options_as_strings")]
    pub options: BTreeMap<String, String>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: "file:///var/lib/coreg/store".into(),
            options: BTreeMap::new(),
        }
    }
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

impl AuthConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.bearer_token.is_some() && self.bearer_token_file.is_some() {
            return Err(ConfigError(
                "auth: give bearer_token or bearer_token_file, not both".into(),
            ));
        }
        if let Some(token) = &self.bearer_token {
            if token.len() < MIN_TOKEN_CHARS {
                return Err(ConfigError(format!(
                    "auth.bearer_token: must be at least {MIN_TOKEN_CHARS} characters"
                )));
            }
        }
        Ok(())
    }

    /// The bearer token clients must present, if authentication is on.
    pub fn bearer_token(&self) -> Result<Option<String>, ConfigError> {
        match (&self.bearer_token, &self.bearer_token_file) {
            (Some(token), _) => Ok(Some(token.clone())),
            (None, Some(path)) => {
                let token = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError(format!("auth.bearer_token_file {}: {e}", path.display()))
                })?;
                let token = token.trim().to_string();
                if token.len() < MIN_TOKEN_CHARS {
                    return Err(ConfigError(format!(
                        "auth.bearer_token_file {}: the token must be at least \
                         {MIN_TOKEN_CHARS} characters",
                        path.display()
                    )));
                }
                Ok(Some(token))
            }
            (None, None) => Ok(None),
        }
    }
}

/// Refuses a log format other than `text` or `json`.
pub fn validate_log_format(format: &str) -> Result<(), ConfigError> {
    match format {
        "text" | "json" => Ok(()),
        other => Err(ConfigError(format!(
            "log_format: {other:?} is not \"text\" or \"json\""
        ))),
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

/// An optional listen address such as `metrics_listen`: a socket address, or `"off"`
/// (also `""`) for none. TOML has no null, so without a word for "none" an address
/// with a default could never be turned off.
pub mod optional_address {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub const OFF: &str = "off";

    pub fn serialize<S: Serializer>(
        address: &Option<SocketAddr>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match address {
            Some(address) => serializer.collect_str(address),
            None => serializer.serialize_str(OFF),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(deserializer)?;
        let text = text.trim();
        if text.is_empty() || text.eq_ignore_ascii_case(OFF) {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not a socket address like \"0.0.0.0:9090\" or \"{OFF}\" ({e})"
            ))
        })
    }
}

/// The `{prefix}…` variables naming one of `top_level_keys`, nested keys split on
/// `__`. Other tools share the `COREG_` prefix (`COREG_CONFIG` names the file, the
/// test set-up exports `COREG_PYTHON`), so only a service's own keys are read; a
/// misspelt nested key (`COREG_STORE__ULR`) is still refused as unknown.
pub fn environment(prefix: &str, top_level_keys: &'static [&'static str]) -> Env {
    Env::prefixed(prefix).split("__").filter(move |key| {
        let top = key.as_str().split('.').next().unwrap_or_default();
        top_level_keys
            .iter()
            .any(|known| top.eq_ignore_ascii_case(known))
    })
}

/// `defaults` < `file` (must exist when given) < `env`, unknown keys refused.
pub fn load<T>(defaults: T, file: Option<&Path>, env: Env) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned,
{
    let mut figment = Figment::from(Serialized::defaults(defaults));
    if let Some(file) = file {
        if !file.is_file() {
            return Err(ConfigError(format!(
                "the configuration file {} does not exist",
                file.display()
            )));
        }
        figment = figment.merge(Toml::file_exact(file));
    }
    figment
        .merge(env)
        .extract()
        .map_err(|e| ConfigError(e.to_string()))
}

/// `config` as logged at start: the store options' values and the bearer token
/// replaced, keeping the keys so an operator sees what was set.
pub fn redacted<T: Serialize>(config: &T) -> serde_json::Value {
    let mut value = serde_json::to_value(config).unwrap_or_default();
    if let Some(options) = value.pointer_mut("/store/options") {
        let keys: Vec<String> = options
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        *options = serde_json::json!(keys);
    }
    if let Some(token) = value.pointer_mut("/auth/bearer_token") {
        if !token.is_null() {
            *token = serde_json::json!("<redacted>");
        }
    }
    value
}

/// The sorted top-level keys `defaults` serializes to, for a service's test that its
/// key list and its fields agree.
pub fn field_names<T: Serialize>(defaults: &T) -> Vec<String> {
    let value = serde_json::to_value(defaults).unwrap_or_default();
    let mut fields: Vec<String> = value
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    fields.sort_unstable();
    fields
}

/// Environment variables for tests: `vars` under a prefix no real environment uses
/// and no other call shares (tests run concurrently in one process), read as
/// [`environment`] would.
pub fn test_environment(vars: &[(&str, &str)], top_level_keys: &'static [&'static str]) -> Env {
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let prefix = format!("COREG_TEST_{}_{call}_", std::process::id());
    for (key, value) in vars {
        // Each call has its own prefix, so no other test reads or writes these.
        std::env::set_var(format!("{prefix}{key}"), value);
    }
    environment(&prefix, top_level_keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: &[&str] = &["store", "auth", "model"];

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        store: StoreConfig,
        auth: AuthConfig,
        model: ModelConfig,
    }

    #[test]
    fn other_tools_variables_are_ignored_but_misspelt_nested_keys_are_not() {
        let config: Sample = load(
            Sample::default(),
            None,
            test_environment(
                &[
                    ("PYTHON", "/usr/bin/python3"),
                    ("CONFIG", "/etc/coreg.toml"),
                    ("STORE__URL", "memory:///"),
                    ("STORE__OPTIONS__AWS_ALLOW_HTTP", "true"),
                    ("STORE__OPTIONS__AWS_REGION", "us-east-1"),
                    ("MODEL__PATH", "/m"),
                ],
                KEYS,
            ),
        )
        .unwrap();
        assert_eq!(config.store.url, "memory:///");
        assert_eq!(config.store.options["aws_allow_http"], "true");
        assert_eq!(config.store.options["aws_region"], "us-east-1");
        assert_eq!(config.model.path, PathBuf::from("/m"));
        let error = load(
            Sample::default(),
            None,
            test_environment(&[("STORE__ULR", "memory:///")], KEYS),
        )
        .unwrap_err();
        assert!(error.to_string().contains("ulr"), "{error}");
    }

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct WithMetrics {
        #[serde(with = "optional_address")]
        metrics_listen: Option<std::net::SocketAddr>,
    }

    #[test]
    fn an_optional_address_can_be_turned_off_from_toml_or_the_environment() {
        const METRICS: &[&str] = &["metrics_listen"];
        let defaults = || WithMetrics {
            metrics_listen: Some("0.0.0.0:9090".parse().unwrap()),
        };
        let kept = load(defaults(), None, test_environment(&[], METRICS)).unwrap();
        assert_eq!(kept.metrics_listen, defaults().metrics_listen);

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "metrics_listen = \"off\"\n").unwrap();
        let off = load(defaults(), Some(&file), test_environment(&[], METRICS)).unwrap();
        assert_eq!(off.metrics_listen, None);
        // Serialized "off" reads back as off (defaults pass through serialization).
        let again = load(off, None, test_environment(&[], METRICS)).unwrap();
        assert_eq!(again.metrics_listen, None);

        let moved = load(
            defaults(),
            Some(&file),
            test_environment(&[("METRICS_LISTEN", "127.0.0.1:9999")], METRICS),
        )
        .unwrap();
        assert_eq!(
            moved.metrics_listen,
            Some("127.0.0.1:9999".parse().unwrap())
        );
        let off = load(
            defaults(),
            None,
            test_environment(&[("METRICS_LISTEN", "OFF")], METRICS),
        )
        .unwrap();
        assert_eq!(off.metrics_listen, None);

        let error = load(
            defaults(),
            None,
            test_environment(&[("METRICS_LISTEN", "localhost:nine")], METRICS),
        )
        .unwrap_err()
        .to_string();
        // The variable is named as the operator spelt it.
        assert!(error.contains("METRICS_LISTEN"), "{error}");
        assert!(error.contains("\"off\""), "{error}");
    }

    #[test]
    fn a_named_file_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(
            Sample::default(),
            Some(&dir.path().join("absent.toml")),
            test_environment(&[], KEYS),
        )
        .unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn tokens_must_be_long_and_given_once() {
        let short = AuthConfig {
            bearer_token: Some("short".into()),
            bearer_token_file: None,
        };
        assert!(short
            .validate()
            .unwrap_err()
            .0
            .contains("auth.bearer_token"));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "tiny\n").unwrap();
        let both = AuthConfig {
            bearer_token: Some("0123456789abcdef".into()),
            bearer_token_file: Some(file.clone()),
        };
        assert!(both.validate().unwrap_err().0.contains("not both"));
        let from_file = AuthConfig {
            bearer_token: None,
            bearer_token_file: Some(file.clone()),
        };
        assert!(from_file.bearer_token().is_err());
        std::fs::write(&file, "0123456789abcdef-from-file\n").unwrap();
        assert_eq!(
            from_file.bearer_token().unwrap().as_deref(),
            Some("0123456789abcdef-from-file")
        );
    }

    #[test]
    fn secrets_are_redacted_but_their_keys_shown() {
        let mut config = Sample::default();
        config.auth.bearer_token = Some("0123456789abcdef-secret".into());
        config
            .store
            .options
            .insert("aws_secret_access_key".into(), "hunter2".into());
        let shown = redacted(&config).to_string();
        assert!(!shown.contains("0123456789abcdef-secret"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("aws_secret_access_key"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }
}
