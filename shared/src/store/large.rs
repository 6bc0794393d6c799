//! Large objects: written from a reader in parts, read back in ranges, never held whole
//! in memory.
//!
//! A stage-2 checkpoint of SD 2.1 (the U-Net and two AdamW moments) is about 10.4 GB
//! and its exact U-Net delta 3.4 GB. One PUT cannot carry them (S3 refuses single
//! PUTs over 5 GiB, Azure about 5000 MiB) and building them in memory first costs
//! the object's size again, twice over with copies. Here an object is produced by a
//! [`Read`]er (a [`crate::artifact::tensor_file::TensorFile`] lays tensors out
//! without copying them) and sent in [`PART_BYTES`] parts, at most
//! [`PARTS_IN_FLIGHT`] at a time: host memory grows by a few parts, whatever the size.
//!
//! Retries: the cloud backends retry each request on transient errors (object_store's
//! retry policy: up to 10 times with backoff, within 3 minutes), so a failing part is
//! sent again on its own; a part that still fails aborts the upload, which leaves no
//! object behind (a multipart upload is visible only once completed).
//!
//! Content-addressed blobs are hashed in a first pass over the reader (nothing is
//! kept), so the path is known before the upload, and hashed again while streaming:
//! content that changed between the passes is refused rather than stored under the
//! wrong address.

use std::io::Read;
use std::ops::Range;

use bytes::Bytes;
use futures::stream::{FuturesOrdered, StreamExt};
use object_store::{ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};

use super::{corrupt, not_found_or, store_error, BlobRef, Store, BLOB_PREFIX};
use crate::{Error, Result};

/// The size of each part of a multipart upload: at least S3's 5 MiB minimum, and
/// 10 000 parts (S3's maximum) of it hold 160 GiB.
pub const PART_BYTES: usize = 16 << 20;
/// Parts uploading at once: enough to keep a link busy, few enough to bound memory.
pub const PARTS_IN_FLIGHT: usize = 2;

/// An object written by [`Store::put_streamed`]: its size and SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Streamed {
    pub size: u64,
    pub sha256: String,
}

/// Reads up to one part from `reader`; an empty result is the end.
fn next_part(reader: &mut dyn Read, path: &str) -> Result<Vec<u8>> {
    let mut part = Vec::with_capacity(PART_BYTES);
    let mut limited = reader.take(PART_BYTES as u64);
    limited
        .read_to_end(&mut part)
        .map_err(|e| producing_failed(path, e))?;
    Ok(part)
}

fn producing_failed(path: &str, e: std::io::Error) -> Error {
    // Readers over tensors report the library's errors through io::Error.
    match e.into_inner().map(|inner| inner.downcast::<Error>()) {
        Some(Ok(error)) => *error,
        Some(Err(other)) => Error::InvalidInput(format!("producing `{path}`: {other}")),
        None => Error::InvalidInput(format!("producing `{path}` failed")),
    }
}

/// SHA-256 and size of everything `reader` yields, one part at a time.
pub fn digest(reader: &mut (dyn Read + Send)) -> Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    loop {
        let part = next_part(reader, "a blob")?;
        if part.is_empty() {
            return Ok((hex::encode(hasher.finalize()), size));
        }
        size += part.len() as u64;
        hasher.update(&part);
    }
}

impl Store {
    /// Writes what `reader` yields at `path`, replacing any object there, in parts
    /// (see the module doc). An object that fits in one part is one PUT. Nothing is
    /// visible at `path` until the whole object is.
    pub async fn put_streamed(
        &self,
        path: &str,
        reader: &mut (dyn Read + Send),
    ) -> Result<Streamed> {
        let location = self.location(path)?;
        let mut hasher = Sha256::new();
        let first = next_part(reader, path)?;
        hasher.update(&first);
        if first.len() < PART_BYTES {
            let size = first.len() as u64;
            self.inner
                .put(&location, PutPayload::from(first))
                .await
                .map_err(|e| store_error(path, "write", e))?;
            return Ok(Streamed {
                size,
                sha256: hex::encode(hasher.finalize()),
            });
        }
        let mut upload = self
            .inner
            .put_multipart(&location)
            .await
            .map_err(|e| store_error(path, "starting a multipart upload", e))?;
        let mut size = first.len() as u64;
        let mut in_flight = FuturesOrdered::new();
        in_flight.push_back(upload.put_part(PutPayload::from(first)));
        let sent = async {
            loop {
                let part = next_part(reader, path)?;
                if part.is_empty() {
                    break;
                }
                hasher.update(&part);
                size += part.len() as u64;
                while in_flight.len() >= PARTS_IN_FLIGHT {
                    if let Some(result) = in_flight.next().await {
                        result.map_err(|e| store_error(path, "uploading a part", e))?;
                    }
                }
                in_flight.push_back(upload.put_part(PutPayload::from(part)));
            }
            while let Some(result) = in_flight.next().await {
                result.map_err(|e| store_error(path, "uploading a part", e))?;
            }
            Ok::<(), Error>(())
        }
        .await;
        if let Err(e) = sent {
            // Best effort: an abandoned upload costs storage until the bucket's
            // lifecycle rule for incomplete uploads removes it.
            if let Err(abort) = upload.abort().await {
                tracing::warn!(path, "aborting a failed multipart upload: {abort}");
            }
            return Err(e);
        }
        upload
            .complete()
            .await
            .map_err(|e| store_error(path, "completing a multipart upload", e))?;
        Ok(Streamed {
            size,
            sha256: hex::encode(hasher.finalize()),
        })
    }

    /// Stores what `open` reads as a content-addressed blob, streaming: a first pass
    /// hashes it, then it is uploaded in parts unless a blob with that address is
    /// already stored (then verified, as [`Store::put_blob`] does). `open` is called
    /// once per pass and must yield the same bytes each time.
    pub async fn put_blob_streamed<'r, F>(&self, mut open: F) -> Result<BlobRef>
    where
        F: FnMut() -> Result<Box<dyn Read + Send + 'r>>,
    {
        let (sha256, size) = digest(&mut *open()?)?;
        let blob = BlobRef {
            path: format!("{BLOB_PREFIX}/{sha256}"),
            sha256,
            size,
        };
        if self.exists(&blob.path).await? {
            self.verify_stored_blob(&blob).await?;
            return Ok(blob);
        }
        let written = self.put_streamed(&blob.path, &mut *open()?).await?;
        if written.sha256 != blob.sha256 || written.size != blob.size {
            // Not what the address promises: remove it rather than leave it.
            self.delete(&blob.path).await?;
            return Err(corrupt(
                &blob.path,
                "the content changed between hashing and uploading",
            ));
        }
        Ok(blob)
    }

    /// Bytes `range` of the object at `path`; [`Error::NotFound`] if there is none.
    pub async fn get_range(&self, path: &str, range: Range<u64>) -> Result<Bytes> {
        let location = self.location(path)?;
        self.inner
            .get_range(&location, range)
            .await
            .map_err(|e| not_found_or(path, "ranged read", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader of `len` deterministic bytes, handed out in odd-sized reads.
    struct Pattern {
        at: usize,
        len: usize,
    }

    impl Read for Pattern {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.len - self.at).min(1 << 20 | 7);
            for (i, byte) in buf[..n].iter_mut().enumerate() {
                *byte = ((self.at + i) % 251) as u8;
            }
            self.at += n;
            Ok(n)
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[tokio::test]
    async fn objects_of_several_parts_round_trip_and_hash_as_their_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        for store in [
            Store::open("memory:///", Vec::<(String, String)>::new()).unwrap(),
            Store::open(&url, Vec::<(String, String)>::new()).unwrap(),
        ] {
            for len in [0, 10, PART_BYTES, 2 * PART_BYTES + 12_345] {
                let path = format!("large/{len}");
                let written = store
                    .put_streamed(&path, &mut Pattern { at: 0, len })
                    .await
                    .unwrap();
                let expected = pattern(len);
                assert_eq!(written.size, len as u64);
                assert_eq!(written.sha256, BlobRef::of(&expected).sha256);
                assert_eq!(store.get(&path).await.unwrap(), expected);
                if len > 20 {
                    let middle = store.get_range(&path, 5..20).await.unwrap();
                    assert_eq!(middle, expected[5..20]);
                }
            }
            let blob = store
                .put_blob_streamed(|| {
                    Ok(Box::new(Pattern {
                        at: 0,
                        len: PART_BYTES + 1,
                    }))
                })
                .await
                .unwrap();
            assert_eq!(blob, BlobRef::of(&pattern(PART_BYTES + 1)));
            assert_eq!(store.get_blob(&blob).await.unwrap().len(), PART_BYTES + 1);
        }
    }

    #[tokio::test]
    async fn a_blob_whose_content_changes_between_passes_is_refused() {
        let store = Store::open("memory:///", Vec::<(String, String)>::new()).unwrap();
        let mut pass = 0;
        let err = store
            .put_blob_streamed(|| {
                pass += 1;
                Ok(Box::new(Pattern {
                    at: 0,
                    len: 100 + pass,
                }))
            })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::CorruptArtifact { .. }), "{err}");
        assert!(store.list(BLOB_PREFIX).await.unwrap().is_empty());
    }
}
