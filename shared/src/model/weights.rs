//! Loading safetensors weights into a component's variables.
//!
//! Every variable a module declared must be present in the file with the same shape;
//! the file's dtype (fp32, fp16, bf16) is converted to the variable's. Extra tensors in
//! the file are ignored, as diffusers does. tch's own `VarStore::load` is not used
//! because `copy_` broadcasts, which would let a wrong-shaped tensor load silently.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::nn::VarStore;
use tch::Tensor;

use crate::{Error, Result};

/// The safetensors file of one component, e.g. `unet/diffusion_pytorch_model.safetensors`
/// or, with `variant = Some("fp16")`, `unet/diffusion_pytorch_model.fp16.safetensors`.
///
/// Without a variant, a folder holding only the `.fp16` file is accepted too: many
/// published SD 2.1 copies ship just that.
pub fn component_file(dir: &Path, stem: &str, variant: Option<&str>) -> Result<PathBuf> {
    let plain = dir.join(format!("{stem}.safetensors"));
    if let Some(variant) = variant {
        let path = dir.join(format!("{stem}.{variant}.safetensors"));
        return if path.is_file() {
            Ok(path)
        } else {
            Err(Error::weights(
                path,
                format!("no weights file for variant {variant:?}"),
            ))
        };
    }
    if plain.is_file() {
        return Ok(plain);
    }
    let half = dir.join(format!("{stem}.fp16.safetensors"));
    if half.is_file() {
        return Ok(half);
    }
    Err(Error::weights(
        plain,
        "no weights file (looked for it and its .fp16 variant)",
    ))
}

/// Names under which an older checkpoint may store a variable: the VAE's attention
/// used `query/key/value/proj_attn` before diffusers renamed them.
pub fn legacy_attention_names(name: &str) -> Vec<String> {
    const RENAMES: [(&str, &str); 4] = [
        (".to_q.", ".query."),
        (".to_k.", ".key."),
        (".to_v.", ".value."),
        (".to_out.0.", ".proj_attn."),
    ];
    RENAMES
        .iter()
        .filter(|(new, _)| name.contains(new))
        .map(|(new, old)| name.replacen(new, old, 1))
        .collect()
}

/// Reads every tensor of a safetensors file, naming the file on failure.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let tensors = Tensor::read_safetensors(path)
        .map_err(|e| Error::weights(path, format!("not a readable safetensors file ({e})")))?;
    Ok(tensors.into_iter().collect())
}

/// Copies the tensors of `path` into every variable of `vs`.
///
/// `aliases` lists other names a variable may have in the file (see
/// [`legacy_attention_names`]).
pub fn load_into(vs: &mut VarStore, path: &Path, aliases: fn(&str) -> Vec<String>) -> Result<()> {
    let file = read_safetensors(path)?;
    let _guard = tch::no_grad_guard();
    // Sorted so that a broken file always reports the same first problem.
    let mut variables: Vec<_> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, mut var) in variables {
        let found = std::iter::once(name.clone())
            .chain(aliases(&name))
            .find_map(|n| file.get(&n));
        let Some(src) = found else {
            return Err(Error::weights(path, format!("missing tensor `{name}`")));
        };
        let src = match_shape(src, &var.size()).ok_or_else(|| {
            Error::weights(
                path,
                format!(
                    "tensor `{name}` has shape {:?}, the config implies {:?}",
                    src.size(),
                    var.size()
                ),
            )
        })?;
        var.f_copy_(&src.f_to_kind(var.kind())?)?;
    }
    Ok(())
}

/// `src` viewed with `shape`, if it holds the same values: equal shapes, or a 1×1
/// convolution kernel `[o, i, 1, 1]` standing for a linear weight `[o, i]` (legacy VAE
/// attention checkpoints store them that way).
fn match_shape(src: &Tensor, shape: &[i64]) -> Option<Tensor> {
    let have = src.size();
    if have == shape {
        return Some(src.shallow_clone());
    }
    if have.len() == 4 && shape.len() == 2 && have[2] == 1 && have[3] == 1 && have[..2] == *shape {
        return Some(src.view([shape[0], shape[1]]));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn store_with(names: &[(&str, &[i64])]) -> VarStore {
        let vs = VarStore::new(Device::Cpu);
        for (name, shape) in names {
            let path = vs.root();
            let mut p = path.clone();
            let parts: Vec<&str> = name.split('.').collect();
            for part in &parts[..parts.len() - 1] {
                p = p / *part;
            }
            let _ = p.zeros(parts[parts.len() - 1], shape);
        }
        vs
    }

    #[test]
    fn loads_converts_dtype_and_accepts_legacy_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let q = Tensor::arange(6, (Kind::Half, Device::Cpu)).view([2, 3]);
        let k = Tensor::ones([2, 3, 1, 1], (Kind::Float, Device::Cpu));
        Tensor::write_safetensors(
            &[("attn.query.weight", &q), ("attn.to_k.weight", &k)],
            &path,
        )
        .unwrap();
        let mut vs = store_with(&[("attn.to_q.weight", &[2, 3]), ("attn.to_k.weight", &[2, 3])]);
        load_into(&mut vs, &path, legacy_attention_names).unwrap();
        let vars = vs.variables();
        let got = &vars["attn.to_q.weight"];
        assert_eq!(got.kind(), Kind::Float);
        assert_eq!(
            Vec::<f32>::try_from(got.flatten(0, -1)).unwrap(),
            vec![0., 1., 2., 3., 4., 5.]
        );
        assert_eq!(
            vars["attn.to_k.weight"].sum(Kind::Float).double_value(&[]),
            6.0
        );
    }

    #[test]
    fn names_missing_and_misshapen_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let t = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        Tensor::write_safetensors(&[("a.bias", &t)], &path).unwrap();

        let mut vs = store_with(&[("a.bias", &[4]), ("a.weight", &[4, 4])]);
        let err = load_into(&mut vs, &path, |_| vec![])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("missing tensor `a.weight`") && err.contains("w.safetensors"),
            "{err}"
        );

        // A [1] tensor would broadcast into [4] with a plain copy_: it must be refused.
        let one = Tensor::zeros([1], (Kind::Float, Device::Cpu));
        Tensor::write_safetensors(&[("a.bias", &one)], &path).unwrap();
        let mut vs = store_with(&[("a.bias", &[4])]);
        let err = load_into(&mut vs, &path, |_| vec![])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`a.bias` has shape [1]") && err.contains("[4]"),
            "{err}"
        );
    }

    #[test]
    fn truncated_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let t = Tensor::zeros([64], (Kind::Float, Device::Cpu));
        Tensor::write_safetensors(&[("a.bias", &t)], &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let mut vs = store_with(&[("a.bias", &[64])]);
        let err = load_into(&mut vs, &path, |_| vec![])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a readable safetensors file"), "{err}");
    }
}
