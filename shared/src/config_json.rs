//! diffusers' JSON configuration files, read leniently where Python is lenient and
//! strictly where a wrong value would change the model.
//!
//! Shared by the model components (`model/config.rs`) and the scheduler
//! (`schedule/config.rs`): both read files that Python's `json` module wrote.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// Reads a JSON file into `T`, naming the file and the offending key on failure.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let text = non_finite_to_null(&text);
    let de = &mut serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        Error::config(path, key, e.into_inner().to_string())
    })
}

/// Python's `json` writes `Infinity`, `-Infinity` and `NaN`, which are not JSON:
/// diffusers saves `"lambda_min_clipped": -Infinity` in DPM-Solver configs. Outside
/// strings they become `null` (every such key is optional here).
fn non_finite_to_null(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            in_string = escaped || c != '"';
            escaped = !escaped && c == '\\';
        } else if c == '"' {
            in_string = true;
        } else if let Some(literal) = ["-Infinity", "Infinity", "NaN"]
            .iter()
            .find(|l| rest.starts_with(*l))
        {
            out.push_str("null");
            rest = &rest[literal.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[test]
    fn python_non_finite_literals_read_as_null() {
        let text = r#"{"a": -Infinity, "b": "NaN -Infinity \" Infinity", "c": [NaN, Infinity]}"#;
        let value: serde_json::Value = serde_json::from_str(&non_finite_to_null(text)).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"a": null, "b": "NaN -Infinity \" Infinity", "c": [null, null]})
        );
    }

    #[test]
    fn errors_name_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"block_out_channels": [32, "x"]}"#).unwrap();
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Probe {
            block_out_channels: Vec<usize>,
        }
        let err = read_json::<Probe>(&path).unwrap_err().to_string();
        assert!(
            err.contains("config.json") && err.contains("block_out_channels[1]"),
            "{err}"
        );
    }
}
