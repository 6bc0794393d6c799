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
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::store::{BlobRef, Store};
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

/// How much of a tensor is copied to host memory at a time when a file is read out.
const CHUNK_BYTES: usize = 4 << 20;
/// The largest header a stored file may declare (SD 2.1's U-Net delta needs ~100 KB).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// A safetensors file laid out over tensors, deterministically (tensors and metadata
/// sorted by name, data in name order). It holds the tensors themselves (shallow
/// clones, sharing their storage), and nothing is copied until it is read:
/// [`TensorFile::reader`] yields the bytes tensor by tensor, a chunk at a time, so a
/// 10 GB checkpoint streams to the store with a few MB of host memory.
pub struct TensorFile {
    /// The 8-byte length and the JSON header, padded with spaces to 8 bytes.
    header: Vec<u8>,
    /// In data order.
    tensors: Vec<Tensor>,
    size: u64,
}

impl TensorFile {
    /// Lays out `tensors` (any device, any layout) with the header's `__metadata__`.
    pub fn new(
        tensors: &[(String, &Tensor)],
        metadata: HashMap<String, String>,
    ) -> Result<TensorFile> {
        let sorted: BTreeMap<&str, &Tensor> =
            tensors.iter().map(|(n, t)| (n.as_str(), *t)).collect();
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
        let mut end = 0usize;
        for (name, tensor) in &sorted {
            let kind = tensor.f_kind()?;
            let start = end;
            end += tensor.numel() * kind.elt_size_in_bytes();
            header.insert(
                (*name).to_owned(),
                json!({
                    "dtype": dtype_name(kind)?,
                    "shape": tensor.size(),
                    "data_offsets": [start, end],
                }),
            );
        }
        let mut json = serde_json::to_vec(&Value::Object(header))
            .map_err(|e| Error::InvalidInput(format!("serializing a tensor header: {e}")))?;
        // The format recommends padding the header with spaces to 8-byte alignment.
        json.resize(json.len().next_multiple_of(8), b' ');
        let mut header = (json.len() as u64).to_le_bytes().to_vec();
        header.extend_from_slice(&json);
        Ok(TensorFile {
            size: (header.len() + end) as u64,
            header,
            tensors: sorted.into_values().map(Tensor::shallow_clone).collect(),
        })
    }

    /// The file's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The file's bytes, produced as they are read. The reader owns what it reads
    /// (the header and shallow clones of the tensors), so it can move between threads.
    pub fn reader(&self) -> TensorFileReader {
        TensorFileReader {
            header: self.header.clone(),
            tensors: self.tensors.iter().map(Tensor::shallow_clone).collect(),
            header_at: 0,
            next_tensor: 0,
            current: None,
            chunk: Vec::new(),
            chunk_at: 0,
        }
    }
}

/// Reads a [`TensorFile`] out; libtorch errors arrive as `io::Error`s wrapping the
/// library's [`Error`].
pub struct TensorFileReader {
    header: Vec<u8>,
    tensors: Vec<Tensor>,
    header_at: usize,
    next_tensor: usize,
    /// The tensor being read, flat and contiguous on its device, and the next element.
    current: Option<(Tensor, i64)>,
    chunk: Vec<u8>,
    chunk_at: usize,
}

impl TensorFileReader {
    /// Copies the next chunk of tensor data to `self.chunk`; false at the end.
    fn fill_chunk(&mut self) -> Result<bool> {
        loop {
            if self.current.is_none() {
                let Some(tensor) = self.tensors.get(self.next_tensor) else {
                    return Ok(false);
                };
                self.next_tensor += 1;
                self.current = Some((tensor.f_contiguous()?.f_view([-1])?, 0));
            }
            let (flat, at) = self.current.as_mut().expect("set above");
            let element = flat.f_kind()?.elt_size_in_bytes();
            let count = ((CHUNK_BYTES / element) as i64).min(flat.numel() as i64 - *at);
            if count <= 0 {
                self.current = None;
                continue;
            }
            let piece = flat
                .f_narrow(0, *at, count)?
                .f_to_device(Device::Cpu)?
                .f_contiguous()?;
            self.chunk.resize(count as usize * element, 0);
            piece.f_copy_data_u8(&mut self.chunk, count as usize)?;
            self.chunk_at = 0;
            *at += count;
            return Ok(true);
        }
    }
}

impl std::io::Read for TensorFileReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let header = &self.header;
        if self.header_at < header.len() {
            let n = buf.len().min(header.len() - self.header_at);
            buf[..n].copy_from_slice(&header[self.header_at..self.header_at + n]);
            self.header_at += n;
            return Ok(n);
        }
        if self.chunk_at == self.chunk.len() && !self.fill_chunk().map_err(std::io::Error::other)? {
            return Ok(0);
        }
        let n = buf.len().min(self.chunk.len() - self.chunk_at);
        buf[..n].copy_from_slice(&self.chunk[self.chunk_at..self.chunk_at + n]);
        self.chunk_at += n;
        Ok(n)
    }
}

/// Serializes `tensors` (any device, any layout) with the header's `__metadata__`,
/// deterministically (see [`TensorFile`]), into memory: for small files.
pub fn encode(tensors: &[(String, &Tensor)], metadata: HashMap<String, String>) -> Result<Vec<u8>> {
    let file = TensorFile::new(tensors, metadata)?;
    let mut bytes = Vec::with_capacity(file.size() as usize);
    std::io::Read::read_to_end(&mut file.reader(), &mut bytes).map_err(|e| {
        match e.into_inner().map(|inner| inner.downcast::<Error>()) {
            Some(Ok(error)) => *error,
            _ => Error::InvalidInput("encoding tensors failed".to_owned()),
        }
    })?;
    Ok(bytes)
}

/// The tensor kind a safetensors dtype name stands for.
fn kind_of(dtype: &str) -> Option<Kind> {
    Some(match dtype {
        "BOOL" => Kind::Bool,
        "U8" => Kind::Uint8,
        "I8" => Kind::Int8,
        "I16" => Kind::Int16,
        "I32" => Kind::Int,
        "I64" => Kind::Int64,
        "F16" => Kind::Half,
        "BF16" => Kind::BFloat16,
        "F32" => Kind::Float,
        "F64" => Kind::Double,
        _ => return None,
    })
}

/// One tensor's entry in a header.
struct Entry {
    name: String,
    kind: Kind,
    shape: Vec<i64>,
    data: std::ops::Range<u64>,
}

/// The entries and metadata of a safetensors header, checked against the file's size.
fn parse_header(
    path: &str,
    json: &[u8],
    data_size: u64,
) -> Result<(Vec<Entry>, HashMap<String, String>)> {
    let bad = |message: String| corrupt(path, message);
    let header: Map<String, Value> =
        serde_json::from_slice(json).map_err(|e| bad(format!("header: {e}")))?;
    let mut entries = Vec::new();
    let mut metadata = HashMap::new();
    for (name, value) in header {
        if name == "__metadata__" {
            metadata = serde_json::from_value(value).map_err(|e| bad(format!("metadata: {e}")))?;
            continue;
        }
        let kind = value["dtype"]
            .as_str()
            .and_then(kind_of)
            .ok_or_else(|| bad(format!("tensor `{name}`: unknown dtype")))?;
        let shape: Vec<i64> = serde_json::from_value(value["shape"].clone())
            .map_err(|e| bad(format!("tensor `{name}`: shape: {e}")))?;
        let [start, end]: [u64; 2] = serde_json::from_value(value["data_offsets"].clone())
            .map_err(|e| bad(format!("tensor `{name}`: data_offsets: {e}")))?;
        let numel = shape.iter().try_fold(1u64, |n, &d| {
            u64::try_from(d).ok().and_then(|d| n.checked_mul(d))
        });
        let expected = numel.and_then(|n| n.checked_mul(kind.elt_size_in_bytes() as u64));
        if start > end || end > data_size || expected != Some(end - start) {
            return Err(bad(format!(
                "tensor `{name}`: offsets {start}..{end} do not hold {shape:?} {kind:?} within \
                 {data_size} bytes of data"
            )));
        }
        entries.push(Entry {
            name,
            kind,
            shape,
            data: start..end,
        });
    }
    Ok((entries, metadata))
}

/// Reads the safetensors object at `path` with ranged reads: the header first, then
/// each tensor straight into its own CPU storage, a chunk at a time. Host memory grows
/// by the tensors and one chunk, never by the file again.
pub async fn read_from_store(
    store: &Store,
    path: &str,
) -> Result<(BTreeMap<String, Tensor>, HashMap<String, String>)> {
    let size = store.size(path).await?;
    read_ranges(store, path, size, None).await
}

/// Reads content-addressed safetensors `blob` as [`read_from_store`] does, hashing
/// every byte on the way: a blob whose size or SHA-256 differs from the reference, or
/// whose tensors do not tile its data exactly (bytes no tensor covers would escape
/// the use of the tensors, not the hash), is an [`Error::CorruptArtifact`]. For
/// blobs too large to hold twice: a 3.4 GB U-Net delta costs its tensors and a chunk.
pub async fn read_blob(
    store: &Store,
    blob: &BlobRef,
) -> Result<(BTreeMap<String, Tensor>, HashMap<String, String>)> {
    crate::store::check_blob_path(blob)?;
    let size = match store.size(&blob.path).await {
        Ok(size) => size,
        Err(Error::NotFound { .. }) => {
            return Err(corrupt(&blob.path, "the blob is missing from the store"))
        }
        Err(e) => return Err(e),
    };
    if size != blob.size {
        return Err(corrupt(
            &blob.path,
            format!("size is {size} bytes, expected {}", blob.size),
        ));
    }
    let mut hasher = Sha256::new();
    let read = read_ranges(store, &blob.path, size, Some(&mut hasher)).await?;
    let digest = hex::encode(hasher.finalize());
    if digest != blob.sha256 {
        return Err(corrupt(
            &blob.path,
            format!("sha256 is {digest}, expected {}", blob.sha256),
        ));
    }
    Ok(read)
}

/// The ranged reads behind [`read_from_store`] and [`read_blob`]; with `hasher`, the
/// tensors are read in file order and must cover the data without gap or overlap, so
/// that every byte of the file passes through it once.
async fn read_ranges(
    store: &Store,
    path: &str,
    size: u64,
    mut hasher: Option<&mut Sha256>,
) -> Result<(BTreeMap<String, Tensor>, HashMap<String, String>)> {
    let bad = |message: String| corrupt(path, message);
    if size < 8 {
        return Err(bad(format!("{size} bytes is no safetensors file")));
    }
    let length = store.get_range(path, 0..8).await?;
    let header_size = u64::from_le_bytes(length[..8].try_into().expect("8 bytes"));
    if header_size > MAX_HEADER_BYTES || 8 + header_size > size {
        return Err(bad(format!(
            "header of {header_size} bytes in a {size}-byte file"
        )));
    }
    let json = store.get_range(path, 8..8 + header_size).await?;
    let base = 8 + header_size;
    let (mut entries, metadata) = parse_header(path, &json, size - base)?;
    if let Some(hasher) = hasher.as_deref_mut() {
        hasher.update(&length);
        hasher.update(&json);
        entries.sort_by_key(|entry| entry.data.start);
        let mut covered = 0;
        for entry in &entries {
            if entry.data.start != covered {
                return Err(bad(format!(
                    "tensor `{}` starts at {}, not where the previous ends ({covered})",
                    entry.name, entry.data.start
                )));
            }
            covered = entry.data.end;
        }
        if covered != size - base {
            return Err(bad(format!(
                "{} bytes of data follow the last tensor",
                size - base - covered
            )));
        }
    }
    let mut tensors = BTreeMap::new();
    for entry in entries {
        let tensor = Tensor::f_empty(&entry.shape, (entry.kind, Device::Cpu))?;
        let flat = tensor.f_view([-1])?;
        let element = entry.kind.elt_size_in_bytes() as u64;
        let chunk = (CHUNK_BYTES as u64 / element) * element;
        let mut at = entry.data.start;
        while at < entry.data.end {
            let end = (at + chunk).min(entry.data.end);
            let bytes = store.get_range(path, base + at..base + end).await?;
            if let Some(hasher) = hasher.as_deref_mut() {
                hasher.update(&bytes);
            }
            let count = ((end - at) / element) as i64;
            let piece = Tensor::f_from_data_size(&bytes, &[count], entry.kind)?;
            let first = ((at - entry.data.start) / element) as i64;
            flat.f_narrow(0, first, count)?.f_copy_(&piece)?;
            at = end;
        }
        tensors.insert(entry.name, tensor);
    }
    Ok((tensors, metadata))
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
        // Streamed to a store and read back in ranges: the same tensors, the same
        // bytes.
        let store = Store::open("memory:///", Vec::<(String, String)>::new()).unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let named = [("a".to_owned(), &a), ("b".to_owned(), &b)];
        let file = TensorFile::new(&named, metadata()).unwrap();
        assert_eq!(file.size(), bytes.len() as u64);
        let (stored, ranged) = runtime.block_on(async {
            let written = store.put_streamed("t", &mut file.reader()).await.unwrap();
            assert_eq!(written.size, bytes.len() as u64);
            (
                store.get("t").await.unwrap(),
                read_from_store(&store, "t").await.unwrap(),
            )
        });
        assert_eq!(stored, bytes);
        assert_eq!(ranged.1, metadata());
        assert!(ranged.0["a"].equal(&a) && ranged.0["b"].equal(&b));

        let err = decode("thing", &bytes[..bytes.len() - 1]).unwrap_err();
        assert!(matches!(err, Error::CorruptArtifact { ref path, .. } if path == "thing"));
    }

    /// The message of the [`Error::CorruptArtifact`] `read_blob` gives for `blob`.
    fn refused(store: &Store, blob: &BlobRef) -> String {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        match runtime.block_on(read_blob(store, blob)) {
            Err(Error::CorruptArtifact { path, message }) => {
                assert_eq!(path, blob.path);
                message
            }
            other => panic!("{:?}", other.map(|(tensors, _)| tensors.len())),
        }
    }

    /// A blob read in verified ranges gives its tensors; one byte changed, a size
    /// that differs, a missing blob or bytes no tensor covers (which the hash would
    /// vouch for but no reader would see) are refused, naming the blob.
    #[test]
    fn a_blob_read_in_ranges_is_verified_on_the_way() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let store = Store::open("memory:///", Vec::<(String, String)>::new()).unwrap();
        let a = Tensor::randn([3, 700_000], (Kind::Float, Device::Cpu));
        let b = Tensor::arange(5, (Kind::Int64, Device::Cpu));
        let bytes = encode(&[("a".into(), &a), ("b".into(), &b)], HashMap::new()).unwrap();
        assert!(bytes.len() > 2 * CHUNK_BYTES, "several chunks");
        let put = |bytes: Vec<u8>| {
            runtime
                .block_on(store.put_blob(bytes::Bytes::from(bytes)))
                .unwrap()
        };
        let blob = put(bytes.clone());
        let (tensors, _) = runtime.block_on(read_blob(&store, &blob)).unwrap();
        assert!(tensors["a"].equal(&a) && tensors["b"].equal(&b));

        // The same size, one byte of `a` flipped, stored under the original's name.
        let mut altered = bytes.clone();
        let last = altered.len() - 50;
        altered[last] ^= 1;
        runtime
            .block_on(store.put_overwrite(&blob.path, altered.into()))
            .unwrap();
        assert!(refused(&store, &blob).starts_with("sha256 is "));

        let wrong_size = BlobRef {
            size: blob.size + 1,
            ..blob.clone()
        };
        assert!(refused(&store, &wrong_size).contains("expected"));
        let missing = BlobRef::of(b"never stored");
        assert!(refused(&store, &missing).contains("missing"));

        // Eight bytes after the last tensor, hashed into a valid reference.
        let mut trailing = bytes;
        trailing.extend_from_slice(b"trailing");
        let blob = put(trailing);
        assert!(refused(&store, &blob).contains("follow the last tensor"));
    }
}
