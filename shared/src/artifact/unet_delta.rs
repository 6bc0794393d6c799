//! The stage-2 U-Net stored as its difference from the base model, so that many
//! concepts share one base (a full SD 2.1 U-Net is 3.4 GB in fp32).
//!
//! Two kinds:
//! - **exact** (the default): per parameter, Δ = tuned − base in fp32; parameters that
//!   are bit-identical are left out. fp32 subtraction is not always reversible
//!   (base + (tuned − base) can be one ulp off tuned where the two differ by more than
//!   a factor of two, e.g. weights near zero), so the elements where the round trip
//!   misses are stored too, as (flat index, tuned value) pairs, and applying the delta
//!   reproduces the tuned weights bit for bit.
//! - **low rank**: every 2-D weight, and every 4-D convolution kernel viewed as
//!   `[out, in·kh·kw]`, is replaced by a truncated SVD `up · down` of its Δ when that is
//!   smaller; other parameters stay exact. Each factored layer's relative error
//!   ‖Δ − Δ_r‖_F / ‖Δ‖_F and the overall one (all parameters' Δ as one vector) are
//!   recorded, in the blob and in the manifest.
//!
//! Applying never accumulates: [`UNetDelta::apply`] writes base + Δ into the model's
//! variables from an untouched copy of the base weights (see [`snapshot`]), so a
//! sampler can switch between concepts any number of times without drift, and
//! "no concept" is the empty delta.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::artifact::tensor_file::{self, corrupt};
use crate::store::{BlobRef, Store};
use crate::{Error, Result};

/// Parameters by name, as `VarStore::variables` returns them.
pub type Parameters = HashMap<String, Tensor>;

const FORMAT: &str = "coreg.unet_delta";
const FORMAT_VERSION: &str = "1";
const WHAT: &str = "U-Net delta";
const LORA_UP: &str = ".lora_up";
const LORA_DOWN: &str = ".lora_down";
const EXACT_INDEX: &str = ".exact_index";
const EXACT_VALUE: &str = ".exact_value";

/// What kind of delta a concept holds and what compression cost; recorded in the
/// manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeltaSummary {
    Exact {
        /// Parameters that differ from the base.
        parameters: usize,
    },
    LowRank {
        rank: i64,
        parameters: usize,
        /// ‖Δ − Δ̂‖_F / ‖Δ‖_F over every parameter's Δ taken as one vector.
        overall_relative_error: f64,
        /// Per factored layer, ‖Δ − Δ_r‖_F / ‖Δ‖_F.
        relative_errors: BTreeMap<String, f64>,
    },
}

/// The stored difference of one parameter (fp32, on the CPU).
#[derive(Debug)]
enum ParameterDelta {
    Dense {
        delta: Tensor,
        /// Flat indices (i64) and tuned values (fp32) where base + Δ misses tuned.
        fixes: Option<(Tensor, Tensor)>,
    },
    /// Δ ≈ (up · down) viewed as `shape`; up `[out, r]`, down `[r, rest]`.
    LowRank {
        up: Tensor,
        down: Tensor,
        shape: Vec<i64>,
    },
}

/// A fine-tuned U-Net as a delta from its base.
#[derive(Debug)]
pub struct UNetDelta {
    parameters: BTreeMap<String, ParameterDelta>,
    rank: Option<i64>,
    relative_errors: BTreeMap<String, f64>,
    overall_relative_error: f64,
}

impl UNetDelta {
    /// The delta that applies nothing: the base model itself.
    pub fn empty() -> UNetDelta {
        UNetDelta {
            parameters: BTreeMap::new(),
            rank: None,
            relative_errors: BTreeMap::new(),
            overall_relative_error: 0.0,
        }
    }

    /// tuned − base for every parameter that changed, exactly reversible.
    pub fn exact(base: &Parameters, tuned: &Parameters) -> Result<UNetDelta> {
        Self::build(base, tuned, None)
    }

    /// Like [`UNetDelta::exact`], with each 2-D weight and 4-D convolution kernel whose
    /// Δ is cheaper as rank-`rank` factors stored as its truncated SVD.
    pub fn low_rank(base: &Parameters, tuned: &Parameters, rank: i64) -> Result<UNetDelta> {
        if rank < 1 {
            return Err(Error::InvalidInput(format!(
                "low-rank U-Net delta: rank must be at least 1, got {rank}"
            )));
        }
        Self::build(base, tuned, Some(rank))
    }

    fn build(base: &Parameters, tuned: &Parameters, rank: Option<i64>) -> Result<UNetDelta> {
        let _guard = tch::no_grad_guard();
        check_same_parameters(base, tuned)?;
        let mut names: Vec<&String> = tuned.keys().collect();
        names.sort();
        let mut parameters = BTreeMap::new();
        let mut relative_errors = BTreeMap::new();
        let (mut error_sq, mut norm_sq) = (0.0f64, 0.0f64);
        for name in names {
            let b = base[name].f_detach()?.f_to_kind(Kind::Float)?;
            let t = tuned[name]
                .f_detach()?
                .f_to_device(b.device())?
                .f_to_kind(Kind::Float)?;
            if !all_finite(&t)? {
                return Err(Error::InvalidInput(format!(
                    "tuned U-Net parameter `{name}` holds NaN or infinite values"
                )));
            }
            if bits(&b)?.f_equal(&bits(&t)?)? {
                continue;
            }
            let delta = t.f_sub(&b)?;
            let delta_norm_sq = squared_norm(&delta)?;
            norm_sq += delta_norm_sq;
            let factored = match rank {
                Some(rank) if delta_norm_sq > 0.0 => factorize(&delta, rank)?,
                _ => None,
            };
            let entry = match factored {
                Some((up, down, residual_sq)) => {
                    error_sq += residual_sq;
                    relative_errors.insert(name.clone(), (residual_sq / delta_norm_sq).sqrt());
                    ParameterDelta::LowRank {
                        up: up.f_to_device(Device::Cpu)?,
                        down: down.f_to_device(Device::Cpu)?,
                        shape: t.size(),
                    }
                }
                None => {
                    let fixes = round_trip_fixes(&b, &delta, &t)?;
                    ParameterDelta::Dense {
                        delta: delta.f_to_device(Device::Cpu)?,
                        fixes,
                    }
                }
            };
            parameters.insert(name.clone(), entry);
        }
        let overall_relative_error = if norm_sq > 0.0 {
            (error_sq / norm_sq).sqrt()
        } else {
            0.0
        };
        Ok(UNetDelta {
            parameters,
            rank,
            relative_errors,
            overall_relative_error,
        })
    }

    /// Number of parameters the delta changes.
    pub fn len(&self) -> usize {
        self.parameters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.parameters.is_empty()
    }

    /// The names of the parameters the delta changes, sorted.
    pub fn parameter_names(&self) -> impl Iterator<Item = &str> {
        self.parameters.keys().map(String::as_str)
    }

    pub fn summary(&self) -> DeltaSummary {
        match self.rank {
            None => DeltaSummary::Exact {
                parameters: self.len(),
            },
            Some(rank) => DeltaSummary::LowRank {
                rank,
                parameters: self.len(),
                overall_relative_error: self.overall_relative_error,
                relative_errors: self.relative_errors.clone(),
            },
        }
    }

    /// Sets every variable of `vars` to its `base` value plus this delta (the U-Net's
    /// own dtype and device are kept). `base` must be an untouched copy of the base
    /// weights, not `vars`' own tensors (see [`snapshot`]); since every variable is
    /// rewritten from it, switching concepts leaves no trace of the previous one.
    ///
    /// Everything is checked before anything is written: a delta that does not fit
    /// this U-Net leaves `vars` as they were.
    pub fn apply(&self, base: &Parameters, vars: &mut VarStore) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let variables = vars.variables();
        for name in self.parameters.keys() {
            if !variables.contains_key(name) {
                return Err(Error::InvalidInput(format!(
                    "U-Net delta changes `{name}`, which this U-Net does not have"
                )));
            }
        }
        for (name, var) in &variables {
            let Some(b) = base.get(name) else {
                return Err(Error::InvalidInput(format!(
                    "base weights lack the U-Net parameter `{name}`"
                )));
            };
            let shape = var.size();
            let delta_shape = match self.parameters.get(name) {
                Some(ParameterDelta::Dense { delta, .. }) => Some(delta.size()),
                Some(ParameterDelta::LowRank { shape, .. }) => Some(shape.clone()),
                None => None,
            };
            if b.size() != shape || delta_shape.as_ref().is_some_and(|s| *s != shape) {
                return Err(Error::InvalidInput(format!(
                    "U-Net parameter `{name}` has shape {shape:?}; the base has {:?} and the \
                     delta {delta_shape:?}",
                    b.size()
                )));
            }
        }
        for (name, var) in variables {
            let mut var = var;
            let b = &base[&name];
            match self.parameters.get(&name) {
                None => {
                    var.f_copy_(b)?;
                }
                Some(delta) => {
                    let device = var.device();
                    let b = b.f_to_device(device)?.f_to_kind(Kind::Float)?;
                    let tuned = match delta {
                        ParameterDelta::Dense { delta, fixes } => {
                            let tuned = b.f_add(&delta.f_to_device(device)?)?;
                            if let Some((index, value)) = fixes {
                                let _ = tuned.f_view([-1])?.f_index_copy_(
                                    0,
                                    &index.f_to_device(device)?,
                                    &value.f_to_device(device)?,
                                )?;
                            }
                            tuned
                        }
                        ParameterDelta::LowRank { up, down, shape } => {
                            let product =
                                up.f_to_device(device)?.f_mm(&down.f_to_device(device)?)?;
                            b.f_add(&product.f_view(shape.as_slice())?)?
                        }
                    };
                    var.f_copy_(&tuned)?;
                }
            }
        }
        Ok(())
    }

    /// The delta as safetensors bytes: a dense Δ under the parameter's own name (plus
    /// `<name>.exact_index`/`<name>.exact_value` where the round trip needs them), a
    /// factored one as `<name>.lora_up` `[out, r]` and `<name>.lora_down` `[r, rest]`;
    /// the kind, rank, factored shapes and errors in the header's metadata.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let (named, metadata) = self.layout()?;
        tensor_file::encode(&named, metadata)
    }

    /// The file [`UNetDelta::to_bytes`] writes, laid out over the delta's own tensors
    /// for streaming (see [`TensorFile`](tensor_file::TensorFile)); call it with the
    /// names and metadata this returns.
    #[allow(clippy::type_complexity)]
    pub fn layout(&self) -> Result<(Vec<(String, &Tensor)>, HashMap<String, String>)> {
        let mut names: Vec<String> = Vec::new();
        let mut tensors: Vec<&Tensor> = Vec::new();
        let mut shapes = BTreeMap::new();
        for (name, entry) in &self.parameters {
            match entry {
                ParameterDelta::Dense { delta, fixes } => {
                    names.push(name.clone());
                    tensors.push(delta);
                    if let Some((index, value)) = fixes {
                        names.push(format!("{name}{EXACT_INDEX}"));
                        tensors.push(index);
                        names.push(format!("{name}{EXACT_VALUE}"));
                        tensors.push(value);
                    }
                }
                ParameterDelta::LowRank { up, down, shape } => {
                    names.push(format!("{name}{LORA_UP}"));
                    tensors.push(up);
                    names.push(format!("{name}{LORA_DOWN}"));
                    tensors.push(down);
                    shapes.insert(name.clone(), shape.clone());
                }
            }
        }
        let mut metadata = HashMap::from([
            ("format".to_owned(), FORMAT.to_owned()),
            ("format_version".to_owned(), FORMAT_VERSION.to_owned()),
        ]);
        match self.rank {
            None => {
                metadata.insert("kind".to_owned(), "exact".to_owned());
            }
            Some(rank) => {
                metadata.insert("kind".to_owned(), "low_rank".to_owned());
                metadata.insert("rank".to_owned(), rank.to_string());
                metadata.insert("shapes".to_owned(), to_json(&shapes)?);
                metadata.insert(
                    "relative_errors".to_owned(),
                    to_json(&self.relative_errors)?,
                );
                metadata.insert(
                    "overall_relative_error".to_owned(),
                    to_json(&self.overall_relative_error)?,
                );
            }
        }
        let named: Vec<(String, &Tensor)> = names.into_iter().zip(tensors).collect();
        Ok((named, metadata))
    }

    /// Reads [`UNetDelta::to_bytes`] output, checking its structure; anything
    /// malformed is an [`Error::CorruptArtifact`].
    pub fn from_bytes(bytes: &[u8]) -> Result<UNetDelta> {
        let (tensors, metadata) = tensor_file::decode(WHAT, bytes)?;
        UNetDelta::from_tensors(tensors, &metadata)
    }

    /// Reads the delta stored as content-addressed `blob` in ranges, verifying its
    /// SHA-256 on the way ([`tensor_file::read_blob`]): host memory grows by the
    /// delta's tensors and a chunk, not by the file as well.
    pub async fn read_blob(store: &Store, blob: &BlobRef) -> Result<UNetDelta> {
        let (tensors, metadata) = tensor_file::read_blob(store, blob).await?;
        UNetDelta::from_tensors(tensors, &metadata)
    }

    /// The delta a [`UNetDelta::to_bytes`] file's tensors and metadata describe.
    fn from_tensors(
        mut tensors: BTreeMap<String, Tensor>,
        metadata: &HashMap<String, String>,
    ) -> Result<UNetDelta> {
        let field = |key: &str| {
            metadata
                .get(key)
                .ok_or_else(|| corrupt(WHAT, format!("metadata lacks `{key}`")))
        };
        if field("format")? != FORMAT || field("format_version")? != FORMAT_VERSION {
            return Err(corrupt(
                WHAT,
                format!(
                    "not a {FORMAT} version {FORMAT_VERSION} file (format {:?}, version {:?})",
                    metadata.get("format"),
                    metadata.get("format_version")
                ),
            ));
        }
        let (rank, shapes, relative_errors, overall_relative_error) = match field("kind")?.as_str()
        {
            "exact" => (None, BTreeMap::new(), BTreeMap::new(), 0.0),
            "low_rank" => {
                let rank: i64 = from_json(field("rank")?)?;
                let shapes: BTreeMap<String, Vec<i64>> = from_json(field("shapes")?)?;
                let errors: BTreeMap<String, f64> = from_json(field("relative_errors")?)?;
                let overall: f64 = from_json(field("overall_relative_error")?)?;
                (Some(rank), shapes, errors, overall)
            }
            other => return Err(corrupt(WHAT, format!("unknown delta kind `{other}`"))),
        };
        for tensor in tensors.values() {
            if tensor.is_floating_point() && !all_finite(tensor)? {
                return Err(corrupt(WHAT, "holds NaN or infinite values"));
            }
        }

        let mut parameters = BTreeMap::new();
        for (name, shape) in &shapes {
            let up = take(&mut tensors, &format!("{name}{LORA_UP}"))?;
            let down = take(&mut tensors, &format!("{name}{LORA_DOWN}"))?;
            check_factors(name, &up, &down, shape, rank)?;
            parameters.insert(
                name.clone(),
                ParameterDelta::LowRank {
                    up,
                    down,
                    shape: shape.clone(),
                },
            );
        }
        let fixes = take_fixes(&mut tensors)?;
        let mut fixes_left = fixes.len();
        for (name, delta) in tensors {
            if name.ends_with(LORA_UP) || name.ends_with(LORA_DOWN) {
                return Err(corrupt(WHAT, format!("`{name}` has no recorded shape")));
            }
            if delta.kind() != Kind::Float {
                return Err(corrupt(
                    WHAT,
                    format!("`{name}` is {:?}, not fp32", delta.kind()),
                ));
            }
            let fix = match fixes.get(&name) {
                Some((index, value)) => {
                    fixes_left -= 1;
                    check_fixes(&name, index, value, delta.numel())?;
                    Some((index.shallow_clone(), value.shallow_clone()))
                }
                None => None,
            };
            parameters.insert(name, ParameterDelta::Dense { delta, fixes: fix });
        }
        if fixes_left != 0 {
            return Err(corrupt(
                WHAT,
                "exact-value fixes for a parameter without a delta",
            ));
        }
        if relative_errors.keys().ne(shapes.keys()) {
            return Err(corrupt(
                WHAT,
                "relative errors do not match the factored layers",
            ));
        }
        Ok(UNetDelta {
            parameters,
            rank,
            relative_errors,
            overall_relative_error,
        })
    }
}

/// A deep copy of `vars`' values on `device`: the untouched base that
/// [`UNetDelta::apply`] computes from. Keeping it on the CPU spares accelerator
/// memory at the price of a host-to-device copy per switch.
pub fn snapshot(vars: &VarStore, device: Device) -> Result<Parameters> {
    let _guard = tch::no_grad_guard();
    vars.variables()
        .into_iter()
        .map(|(name, t)| {
            // A fresh allocation even when `device` is the variables' own.
            let mut copy = t.f_zeros_like()?.f_to_device(device)?;
            copy.f_copy_(&t)?;
            Ok((name, copy))
        })
        .collect()
}

fn check_same_parameters(base: &Parameters, tuned: &Parameters) -> Result<()> {
    for (name, t) in tuned {
        match base.get(name) {
            None => {
                return Err(Error::InvalidInput(format!(
                    "tuned U-Net has parameter `{name}`, which the base lacks"
                )))
            }
            Some(b) if b.size() != t.size() => {
                return Err(Error::InvalidInput(format!(
                    "U-Net parameter `{name}`: base shape {:?}, tuned shape {:?}",
                    b.size(),
                    t.size()
                )))
            }
            Some(_) => {}
        }
    }
    if let Some(name) = base.keys().find(|name| !tuned.contains_key(*name)) {
        return Err(Error::InvalidInput(format!(
            "tuned U-Net lacks the base parameter `{name}`"
        )));
    }
    Ok(())
}

/// An fp32 tensor's bit patterns, so that comparisons tell −0 from +0.
fn bits(t: &Tensor) -> Result<Tensor> {
    Ok(t.f_view_dtype(Kind::Int)?)
}

fn all_finite(t: &Tensor) -> Result<bool> {
    Ok(t.f_isfinite()?.f_all()?.f_int64_value(&[])? == 1)
}

fn squared_norm(t: &Tensor) -> Result<f64> {
    Ok(t.f_to_kind(Kind::Double)?
        .f_square()?
        .f_sum(Kind::Double)?
        .f_double_value(&[])?)
}

/// Where fp32 `base + delta` is not bit-identical to `tuned`: the flat indices and the
/// tuned values there.
fn round_trip_fixes(
    base: &Tensor,
    delta: &Tensor,
    tuned: &Tensor,
) -> Result<Option<(Tensor, Tensor)>> {
    let restored = base.f_add(delta)?;
    let missed = bits(&restored)?
        .f_ne_tensor(&bits(tuned)?)?
        .f_reshape([-1])?;
    let index = missed.f_nonzero()?.f_view([-1])?;
    if index.size()[0] == 0 {
        return Ok(None);
    }
    let value = tuned
        .f_contiguous()?
        .f_view([-1])?
        .f_index_select(0, &index)?;
    Ok(Some((
        index.f_to_device(Device::Cpu)?,
        value.f_to_device(Device::Cpu)?,
    )))
}

/// The rank-`rank` truncated SVD of a 2-D or 4-D Δ as (up, down, ‖Δ − up·down‖²), or
/// `None` where the factors would not be smaller than Δ itself.
fn factorize(delta: &Tensor, rank: i64) -> Result<Option<(Tensor, Tensor, f64)>> {
    let shape = delta.size();
    if shape.len() != 2 && shape.len() != 4 {
        return Ok(None);
    }
    let rows = shape[0];
    let cols = shape[1..].iter().product::<i64>();
    if rank * (rows + cols) >= rows * cols {
        return Ok(None);
    }
    let matrix = delta.f_reshape([rows, cols])?;
    let (u, s, v) = matrix.f_svd(true, true)?;
    // Singular values go into `up` so that `down` has orthonormal rows.
    let up = u
        .f_narrow(1, 0, rank)?
        .f_mul(&s.f_narrow(0, 0, rank)?)?
        .f_contiguous()?;
    let down = v.f_narrow(1, 0, rank)?.f_transpose(0, 1)?.f_contiguous()?;
    // Measured on the stored fp32 factors rather than from the discarded singular
    // values, so the recorded error is the one a user gets.
    let residual = matrix.f_sub(&up.f_mm(&down)?)?;
    Ok(Some((up, down, squared_norm(&residual)?)))
}

fn take(tensors: &mut BTreeMap<String, Tensor>, name: &str) -> Result<Tensor> {
    tensors
        .remove(name)
        .ok_or_else(|| corrupt(WHAT, format!("missing tensor `{name}`")))
}

/// Removes the `<name>.exact_index`/`<name>.exact_value` pairs, keyed by `<name>`.
fn take_fixes(
    tensors: &mut BTreeMap<String, Tensor>,
) -> Result<BTreeMap<String, (Tensor, Tensor)>> {
    let names: Vec<String> = tensors
        .keys()
        .filter_map(|k| k.strip_suffix(EXACT_INDEX).map(str::to_owned))
        .collect();
    let mut fixes = BTreeMap::new();
    for name in names {
        let index = take(tensors, &format!("{name}{EXACT_INDEX}"))?;
        let value = take(tensors, &format!("{name}{EXACT_VALUE}"))?;
        fixes.insert(name, (index, value));
    }
    if let Some(orphan) = tensors.keys().find(|k| k.ends_with(EXACT_VALUE)) {
        return Err(corrupt(WHAT, format!("`{orphan}` has no index tensor")));
    }
    Ok(fixes)
}

fn check_factors(
    name: &str,
    up: &Tensor,
    down: &Tensor,
    shape: &[i64],
    rank: Option<i64>,
) -> Result<()> {
    let (us, ds) = (up.size(), down.size());
    let numel: i64 = shape.iter().product();
    let fits = up.kind() == Kind::Float
        && down.kind() == Kind::Float
        && us.len() == 2
        && ds.len() == 2
        && us[1] == ds[0]
        && Some(us[1]) == rank
        && shape.first() == Some(&us[0])
        && us[0] * ds[1] == numel;
    if fits {
        Ok(())
    } else {
        Err(corrupt(
            WHAT,
            format!(
                "factors of `{name}` ({:?} up {us:?}, {:?} down {ds:?}) do not make shape \
                 {shape:?} at rank {rank:?}",
                up.kind(),
                down.kind()
            ),
        ))
    }
}

fn check_fixes(name: &str, index: &Tensor, value: &Tensor, numel: usize) -> Result<()> {
    let count = index.size();
    let in_range = || -> Result<bool> {
        Ok(index.numel() == 0
            || (index.f_min()?.f_int64_value(&[])? >= 0
                && index.f_max()?.f_int64_value(&[])? < numel as i64))
    };
    if index.kind() != Kind::Int64
        || value.kind() != Kind::Float
        || count.len() != 1
        || value.size() != count
        || !in_range()?
    {
        return Err(corrupt(
            WHAT,
            format!("malformed exact-value fixes for `{name}`"),
        ));
    }
    Ok(())
}

fn to_json<T: Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value)
        .map_err(|e| Error::InvalidInput(format!("U-Net delta metadata: {e}")))
}

fn from_json<T: for<'de> Deserialize<'de>>(text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| corrupt(WHAT, format!("metadata: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(entries: &[(&str, Tensor)]) -> Parameters {
        entries
            .iter()
            .map(|(n, t)| ((*n).to_owned(), t.shallow_clone()))
            .collect()
    }

    fn cpu() -> (Kind, Device) {
        (Kind::Float, Device::Cpu)
    }

    #[test]
    fn exact_delta_skips_identical_parameters_and_fixes_lossy_subtractions() {
        // base + (tuned − base) ≠ tuned in fp32 here: 1.0 + (1e-8 − 1.0) rounds to 0.
        let b = Tensor::from_slice(&[1.0f32, 2.0, 0.0]);
        let t = Tensor::from_slice(&[1e-8f32, 2.5, -0.0]);
        let same = Tensor::ones([3], cpu());
        let base = params(&[("w", b.copy()), ("same", same.copy())]);
        let tuned = params(&[("w", t.copy()), ("same", same.copy())]);
        let delta = UNetDelta::exact(&base, &tuned).unwrap();
        assert_eq!(delta.parameter_names().collect::<Vec<_>>(), ["w"]);
        let ParameterDelta::Dense {
            fixes: Some((index, value)),
            ..
        } = &delta.parameters["w"]
        else {
            panic!("expected exact-value fixes");
        };
        // Element 0 (rounding) and element 2 (−0 vs +0) need fixing; element 1 does not.
        assert_eq!(Vec::<i64>::try_from(index).unwrap(), [0, 2]);
        assert_eq!(Vec::<f32>::try_from(value).unwrap()[0], 1e-8);

        let decoded = UNetDelta::from_bytes(&delta.to_bytes().unwrap()).unwrap();
        let vs = VarStore::new(Device::Cpu);
        let _w = vs.root().zeros("w", &[3]);
        let _s = vs.root().zeros("same", &[3]);
        let mut vs = vs;
        decoded.apply(&base, &mut vs).unwrap();
        let got = vs.variables()["w"].shallow_clone();
        assert!(bits(&got).unwrap().equal(&bits(&t).unwrap()));
    }

    #[test]
    fn low_rank_factors_a_rank_one_difference_exactly_and_keeps_vectors_dense() {
        tch::manual_seed(0);
        let b = Tensor::randn([6, 5], cpu());
        let outer = Tensor::randn([6, 1], cpu()).mm(&Tensor::randn([1, 5], cpu()));
        let bias = Tensor::randn([6], cpu());
        let base = params(&[("w", b.copy()), ("bias", bias.copy())]);
        let tuned = params(&[("w", &b + &outer), ("bias", &bias + 0.5)]);
        let delta = UNetDelta::low_rank(&base, &tuned, 1).unwrap();
        let DeltaSummary::LowRank {
            rank,
            parameters,
            relative_errors,
            overall_relative_error,
        } = delta.summary()
        else {
            panic!("expected a low-rank summary");
        };
        assert_eq!((rank, parameters), (1, 2));
        assert_eq!(relative_errors.keys().collect::<Vec<_>>(), ["w"]);
        assert!(relative_errors["w"] < 1e-5, "{relative_errors:?}");
        assert!(overall_relative_error <= relative_errors["w"]);
        assert!(matches!(
            delta.parameters["bias"],
            ParameterDelta::Dense { .. }
        ));
        let decoded = UNetDelta::from_bytes(&delta.to_bytes().unwrap()).unwrap();
        assert_eq!(decoded.summary(), delta.summary());
    }

    #[test]
    fn malformed_bytes_are_corrupt() {
        let up = Tensor::ones([4, 2], cpu());
        let down = Tensor::ones([2, 3], cpu());
        let metadata = HashMap::from([
            ("format".to_owned(), FORMAT.to_owned()),
            ("format_version".to_owned(), FORMAT_VERSION.to_owned()),
            ("kind".to_owned(), "low_rank".to_owned()),
            ("rank".to_owned(), "2".to_owned()),
            ("shapes".to_owned(), r#"{"w":[4,4]}"#.to_owned()),
            ("relative_errors".to_owned(), r#"{"w":0.1}"#.to_owned()),
            ("overall_relative_error".to_owned(), "0.1".to_owned()),
        ]);
        let bytes = tensor_file::encode(
            &[("w.lora_up".into(), &up), ("w.lora_down".into(), &down)],
            metadata,
        )
        .unwrap();
        let err = UNetDelta::from_bytes(&bytes).unwrap_err();
        assert!(err.to_string().contains("do not make shape"), "{err}");

        let bytes = tensor_file::encode(&[("w".into(), &up)], HashMap::new()).unwrap();
        let err = UNetDelta::from_bytes(&bytes).unwrap_err();
        assert!(matches!(err, Error::CorruptArtifact { .. }), "{err}");
    }

    #[test]
    fn mismatched_models_are_refused() {
        let base = params(&[("w", Tensor::zeros([2], cpu()))]);
        let other = params(&[("w", Tensor::zeros([3], cpu()))]);
        assert!(UNetDelta::exact(&base, &other).is_err());
        let extra = params(&[
            ("w", Tensor::zeros([2], cpu())),
            ("v", Tensor::zeros([2], cpu())),
        ]);
        assert!(UNetDelta::exact(&base, &extra).is_err());
        assert!(UNetDelta::exact(&extra, &base).is_err());
        let nan = params(&[("w", Tensor::from_slice(&[0.0f32, f32::NAN]))]);
        assert!(UNetDelta::exact(&base, &nan).is_err());
        assert!(UNetDelta::low_rank(&base, &base, 0).is_err());
    }
}
