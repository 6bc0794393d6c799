//! Named tensors to and from safetensors bytes (the format every artifact blob uses,
//! so that diffusers, AUTOMATIC1111 and `safetensors.torch` read them directly).
//!
//! tch only reads and writes safetensors *files* and drops the header's metadata; the
//! artifacts live in an object store and carry metadata, hence this module.
//!
//! Blobs are content-addressed, so the same tensors must always give the same bytes.
//! The safetensors crate writes `__metadata__` from a `HashMap` in its random
//! iteration order; the header is therefore written here, every key sorted.

use std::collections::{BTreeMap, HashMap};

use safetensors::tensor::SafeTensors;
use serde_json::{json, Map, Value};
use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// The safetensors dtype name of a tensor kind.
fn dtype_name(kind: Kind) -> Result<&'static str> {
    Ok(match kind {
        Kind::Bool => "BOOL",
        Kind::Uint8 => "U8",
        Kind::Int8 => "I8",
        Kind::Int16 => "I16",
        Kind::Int => "I32",
        Kind::Int64 => "I64",
        Kind::Half => "F16",
        Kind::BFloat16 => "BF16",
        Kind::Float => "F32",
        Kind::Double => "F64",
        other => {
            return Err(Error::InvalidInput(format!(
                "tensors of kind {other:?} cannot be stored"
            )))
        }
    })
}

/// Serializes `tensors` (any device, any layout) with the header's `__metadata__`,
/// deterministically: tensors and metadata sorted by name, data in name order.
pub fn encode(tensors: &[(String, &Tensor)], metadata: HashMap<String, String>) -> Result<Vec<u8>> {
    let sorted: BTreeMap<&str, &Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), *t)).collect();
    if sorted.len() != tensors.len() || sorted.contains_key("__metadata__") {
        return Err(Error::InvalidInput(
            "tensor names must be unique and not `__metadata__`".to_owned(),
        ));
    }
    let mut header = Map::new();
    if !metadata.is_empty() {
        let metadata: BTreeMap<String, String> = metadata.into_iter().collect();
        header.insert("__metadata__".to_owned(), json!(metadata));
    }
    let mut data = Vec::new();
    for (name, tensor) in sorted {
        let tensor = tensor.f_to_device(Device::Cpu)?.f_contiguous()?;
        let kind = tensor.f_kind()?;
        let numel = tensor.numel();
        let start = data.len();
        data.resize(start + numel * kind.elt_size_in_bytes(), 0);
        tensor.f_copy_data_u8(&mut data[start..], numel)?;
        header.insert(
            name.to_owned(),
            json!({
                "dtype": dtype_name(kind)?,
                "shape": tensor.size(),
                "data_offsets": [start, data.len()],
            }),
        );
    }
    let mut header = serde_json::to_vec(&Value::Object(header))
        .map_err(|e| Error::InvalidInput(format!("serializing a tensor header: {e}")))?;
    // The format recommends padding the header with spaces to 8-byte alignment.
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut bytes = Vec::with_capacity(8 + header.len() + data.len());
    bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(&data);
    Ok(bytes)
}

/// The tensors (on the CPU) and metadata of safetensors `bytes`. `what` names the
/// artifact in the [`Error::CorruptArtifact`] a malformed buffer gives.
pub fn decode(
    what: &str,
    bytes: &[u8],
) -> Result<(BTreeMap<String, Tensor>, HashMap<String, String>)> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| corrupt(what, format!("{e:?}")))?;
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| corrupt(what, format!("{e:?}")))?;
    let mut tensors = BTreeMap::new();
    for (name, view) in file.tensors() {
        let tensor =
            Tensor::try_from(view).map_err(|e| corrupt(what, format!("tensor `{name}`: {e}")))?;
        tensors.insert(name, tensor);
    }
    Ok((tensors, header.metadata().clone().unwrap_or_default()))
}

pub(crate) fn corrupt(what: &str, message: impl Into<String>) -> Error {
    Error::CorruptArtifact {
        path: what.to_owned(),
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_tensors_and_metadata() {
        let a = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]);
        // A transposed (non-contiguous) tensor is written in its logical order.
        let b = Tensor::arange(6, (Kind::Int64, Device::Cpu))
            .view([2, 3])
            .transpose(0, 1);
        // Each call makes a map with its own random iteration order.
        let metadata = || -> HashMap<String, String> {
            (0..8)
                .map(|i| (format!("key{i}"), format!("{i}")))
                .collect()
        };
        let bytes = encode(&[("a".into(), &a), ("b".into(), &b)], metadata()).unwrap();
        let (tensors, read_metadata) = decode("test", &bytes).unwrap();
        assert_eq!(read_metadata, metadata());
        assert!(tensors["a"].equal(&a));
        assert_eq!(tensors["b"].size(), [3, 2]);
        assert!(tensors["b"].equal(&b));
        // Content addressing needs the same bytes every time.
        for _ in 0..5 {
            let again = encode(&[("b".into(), &b), ("a".into(), &a)], metadata()).unwrap();
            assert_eq!(again, bytes);
        }
        let err = decode("thing", &bytes[..bytes.len() - 1]).unwrap_err();
        assert!(matches!(err, Error::CorruptArtifact { ref path, .. } if path == "thing"));
    }
}
