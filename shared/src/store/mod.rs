//! The object store: the one source of truth the trainer and the sampler share.
//!
//! One URL picks the backend (`file:///abs/dir`, `memory:///`, `s3://bucket/prefix`,
//! `gs://bucket/prefix`, `az://container/prefix`) and the path prefix every object of
//! this product lives under. Paths given to [`Store`] are relative to that prefix.
//!
//! Consistency primitives:
//! - [`Store::put_create_only`] is the portable one: the local file system (hard link
//!   of a staged file), S3 (`If-None-Match: *`), GCS (generation 0) and Azure
//!   (`If-None-Match: *`) all refuse to replace an existing object atomically.
//! - [`Store::put_if_version_matches`] is compare-and-swap on an object's version
//!   (ETag/generation). The local file system has **no** compare-and-swap: there it
//!   only works as create-if-absent (`expected = None`) and fails otherwise, so
//!   anything that must run on `file://` builds on create-only writes.
//!
//! Blobs are content-addressed (`blobs/sha256/<hex>`), so two writers of the same
//! bytes race harmlessly: the loser verifies that what is stored is what it meant to
//! write.
//!
//! The API is async (object_store's); callers that own tensors on a dedicated thread
//! drive it with a tokio runtime handle's `block_on`.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{
    GetOptions, ObjectStore, ObjectStoreExt, ObjectStoreScheme, PutMode, PutOptions, PutPayload,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use url::Url;

pub use object_store::UpdateVersion;

use crate::{Error, Result};

mod large;

pub use large::{Streamed, PARTS_IN_FLIGHT, PART_BYTES};

/// Where content-addressed blobs live, relative to the store's prefix.
pub const BLOB_PREFIX: &str = "blobs/sha256";

/// The backend a store URL selected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    LocalFileSystem,
    Memory,
    AmazonS3,
    GoogleCloudStorage,
    MicrosoftAzure,
}

impl Backend {
    /// Whether [`Store::put_if_version_matches`] can compare against an existing
    /// object's version. S3 can unless `aws_conditional_put` is set to `disabled`.
    pub fn supports_compare_and_swap(self) -> bool {
        !matches!(self, Backend::LocalFileSystem)
    }
}

/// The outcome of a create-only write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateOutcome {
    Created,
    /// Something was already stored at the path; it was left untouched.
    AlreadyExists,
}

/// The outcome of a conditional write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConditionalPut {
    /// Written; the new version to pass to the next conditional write.
    Written(UpdateVersion),
    /// The object's version was not the expected one (or, for a create, the object
    /// existed): nothing was written.
    Conflict,
}

/// A content-addressed object: where it is, how big, and its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlobRef {
    /// Relative to the store's prefix, e.g. `blobs/sha256/<hex>`.
    pub path: String,
    /// Lower-case hex SHA-256 of the content.
    pub sha256: String,
    pub size: u64,
}

impl BlobRef {
    /// The reference `bytes` would get from [`Store::put_blob`].
    pub fn of(bytes: &[u8]) -> BlobRef {
        let sha256 = hex::encode(Sha256::digest(bytes));
        BlobRef {
            path: format!("{BLOB_PREFIX}/{sha256}"),
            sha256,
            size: bytes.len() as u64,
        }
    }
}

/// An object found by [`Store::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Relative to the store's prefix.
    pub path: String,
    pub size: u64,
}

/// An object store opened from a URL, scoped to the URL's path prefix. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    backend: Backend,
    url: String,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("url", &self.url)
            .field("backend", &self.backend)
            .finish()
    }
}

impl Store {
    /// Opens the store `url` names, passing `options` (credentials, region, endpoint…)
    /// to its backend. Option keys are checked first: one the backend would not
    /// understand is an error naming it, where object_store itself would silently
    /// drop it. A `file://` directory is created if missing; `memory:///` is a fresh,
    /// empty store each time it is opened (clones of the [`Store`] share it).
    ///
    /// The cloud backends also take their options from the process environment the
    /// way their SDKs do (`AWS_…` for s3://, `GOOGLE_…` for gs://, `AZURE_…` for
    /// az://, see [`Store::open_with_environment`]), so the variables a Kubernetes
    /// identity webhook injects (`AWS_ROLE_ARN`, `AWS_WEB_IDENTITY_TOKEN_FILE`,
    /// `AZURE_CLIENT_ID`, …) work without being copied into the configuration.
    pub fn open<I, K, V>(url: &str, options: I) -> Result<Store>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: Into<String>,
    {
        // `vars_os`: `vars` panics on a variable that is not UTF-8, which is no
        // reason for a store not to open; such a variable cannot be an option.
        let environment = std::env::vars_os().filter_map(|(name, value)| {
            Some((name.into_string().ok()?, value.into_string().ok()?))
        });
        Store::open_with_environment(url, options, environment)
    }

    /// [`Store::open`] with the environment given rather than read from the process.
    ///
    /// A variable is taken when it has the backend's SDK prefix and, lower-cased, is
    /// one of the backend's option keys; others (`AWS_PROFILE`, a `GOOGLE_…` variable
    /// for an s3:// store) are ignored, never an error, since the environment is not
    /// ours to police. An explicit option wins over the environment's value for the
    /// same key, aliases included (`access_key_id` and `AWS_ACCESS_KEY_ID`).
    pub fn open_with_environment<I, K, V, E>(url: &str, options: I, environment: E) -> Result<Store>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: Into<String>,
        E: IntoIterator<Item = (String, String)>,
    {
        let parsed = Url::parse(url)
            .map_err(|e| Error::InvalidInput(format!("store URL `{url}` is not a URL: {e}")))?;
        let (scheme, _) = ObjectStoreScheme::parse(&parsed).map_err(|e| {
            Error::InvalidInput(format!("store URL `{url}` names no known backend: {e}"))
        })?;
        let backend = match scheme {
            ObjectStoreScheme::Local => Backend::LocalFileSystem,
            ObjectStoreScheme::Memory => Backend::Memory,
            ObjectStoreScheme::AmazonS3 => Backend::AmazonS3,
            ObjectStoreScheme::GoogleCloudStorage => Backend::GoogleCloudStorage,
            ObjectStoreScheme::MicrosoftAzure => Backend::MicrosoftAzure,
            other => {
                return Err(Error::InvalidInput(format!(
                    "store URL `{url}`: backend {other:?} is not supported \
                     (use file://, memory://, s3://, gs:// or az://)"
                )))
            }
        };
        let options: Vec<(String, String)> = options
            .into_iter()
            .map(|(k, v)| (k.as_ref().to_owned(), v.into()))
            .collect();
        let mut explicit = std::collections::HashSet::new();
        for (key, _) in &options {
            check_option_key(backend, key)?;
            explicit.extend(canonical_option_key(backend, key));
        }
        let mut options = options;
        let mut from_environment = Vec::new();
        for (name, value) in environment {
            let Some(key) = environment_option_key(backend, &name) else {
                continue;
            };
            if explicit.insert(key) {
                from_environment.push(name.clone());
                options.push((name.to_ascii_lowercase(), value));
            }
        }
        if !from_environment.is_empty() {
            // Names only: values are credentials.
            tracing::info!(store = url, variables = ?from_environment, "store options taken from the environment");
        }
        if backend == Backend::LocalFileSystem {
            let dir = parsed.to_file_path().map_err(|()| {
                Error::InvalidInput(format!("store URL `{url}` is not an absolute local path"))
            })?;
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        let (inner, prefix) = object_store::parse_url_opts(&parsed, options)
            .map_err(|e| store_error(url, "opening the store", e))?;
        Ok(Store {
            inner: Arc::from(inner),
            prefix,
            backend,
            url: url.to_owned(),
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The URL the store was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Writes `bytes` at `path` unless an object is already there, atomically: a
    /// reader sees either nothing or the whole object.
    pub async fn put_create_only(&self, path: &str, bytes: Bytes) -> Result<CreateOutcome> {
        let location = self.location(path)?;
        let options = PutOptions::from(PutMode::Create);
        match self
            .inner
            .put_opts(&location, PutPayload::from(bytes), options)
            .await
        {
            Ok(_) => Ok(CreateOutcome::Created),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(CreateOutcome::AlreadyExists),
            Err(e) => Err(store_error(path, "create-only write", e)),
        }
    }

    /// Writes `bytes` at `path`, replacing whatever is there, atomically.
    pub async fn put_overwrite(&self, path: &str, bytes: Bytes) -> Result<()> {
        let location = self.location(path)?;
        self.inner
            .put(&location, PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| store_error(path, "write", e))
    }

    /// Compare-and-swap: writes `bytes` at `path` only if the stored object is at
    /// version `expected` (as returned by [`Store::get_versioned`] or a previous
    /// write), or, with `expected = None`, only if there is no object yet.
    ///
    /// The local file system has no compare-and-swap: `Some(version)` fails there
    /// (create-only writes are the portable primitive); `None` works everywhere.
    pub async fn put_if_version_matches(
        &self,
        path: &str,
        bytes: Bytes,
        expected: Option<UpdateVersion>,
    ) -> Result<ConditionalPut> {
        let location = self.location(path)?;
        let mode = match expected {
            None => PutMode::Create,
            Some(version) => PutMode::Update(version),
        };
        match self
            .inner
            .put_opts(&location, PutPayload::from(bytes), PutOptions::from(mode))
            .await
        {
            Ok(result) => Ok(ConditionalPut::Written(UpdateVersion::from(result))),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(ConditionalPut::Conflict),
            Err(e @ object_store::Error::NotImplemented { .. }) => Err(Error::Store {
                path: path.to_owned(),
                message: format!(
                    "{e}; the {:?} backend has no compare-and-swap, use create-only writes",
                    self.backend
                ),
            }),
            Err(e) => Err(store_error(path, "conditional write", e)),
        }
    }

    /// The object at `path`; [`Error::NotFound`] if there is none.
    pub async fn get(&self, path: &str) -> Result<Bytes> {
        Ok(self.get_versioned(path).await?.0)
    }

    /// The object at `path` with the version a conditional write must name to
    /// replace it.
    pub async fn get_versioned(&self, path: &str) -> Result<(Bytes, UpdateVersion)> {
        let location = self.location(path)?;
        let result = self
            .inner
            .get_opts(&location, GetOptions::default())
            .await
            .map_err(|e| not_found_or(path, "read", e))?;
        let version = UpdateVersion {
            e_tag: result.meta.e_tag.clone(),
            version: result.meta.version.clone(),
        };
        let bytes = result
            .bytes()
            .await
            .map_err(|e| not_found_or(path, "read", e))?;
        Ok((bytes, version))
    }

    /// Whether an object exists at `path`.
    pub async fn exists(&self, path: &str) -> Result<bool> {
        let location = self.location(path)?;
        match self.inner.head(&location).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(store_error(path, "head", e)),
        }
    }

    /// The size of the object at `path`, from its metadata alone (nothing is
    /// downloaded); [`Error::NotFound`] if there is none.
    pub async fn size(&self, path: &str) -> Result<u64> {
        let location = self.location(path)?;
        match self.inner.head(&location).await {
            Ok(meta) => Ok(meta.size),
            Err(e) => Err(not_found_or(path, "head", e)),
        }
    }

    /// Every object under `prefix` (a folder path relative to the store's prefix; `""`
    /// for all), sorted by path.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let location = self.location(prefix)?;
        let metas: Vec<_> = self
            .inner
            .list(Some(&location))
            .try_collect()
            .await
            .map_err(|e| store_error(prefix, "list", e))?;
        let mut objects: Vec<ObjectInfo> = metas
            .into_iter()
            .filter_map(|meta| {
                let parts = meta.location.prefix_match(&self.prefix)?;
                let path = parts
                    .map(|part| part.as_ref().to_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                Some(ObjectInfo {
                    path,
                    size: meta.size,
                })
            })
            .collect();
        objects.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(objects)
    }

    /// Deletes the object at `path`. Deleting an absent object succeeds, as it does on
    /// S3, so that a retried cleanup is harmless on every backend.
    pub async fn delete(&self, path: &str) -> Result<()> {
        let location = self.location(path)?;
        match self.inner.delete(&location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_error(path, "delete", e)),
        }
    }

    /// Stores `bytes` content-addressed under `blobs/sha256/<hex>`, create-only.
    ///
    /// If the blob already exists (written earlier, or by a concurrent writer of the
    /// same content) its size and digest are verified, streaming, and a stored object
    /// that differs is a [`Error::CorruptArtifact`], never silently accepted.
    pub async fn put_blob(&self, bytes: Bytes) -> Result<BlobRef> {
        let blob = BlobRef::of(&bytes);
        // A blob already stored (a retried publication) is verified, not sent again:
        // reading it back costs no more than the upload it saves.
        if self.exists(&blob.path).await? {
            self.verify_stored_blob(&blob).await?;
            return Ok(blob);
        }
        match self.put_create_only(&blob.path, bytes).await? {
            CreateOutcome::Created => Ok(blob),
            CreateOutcome::AlreadyExists => {
                self.verify_stored_blob(&blob).await?;
                Ok(blob)
            }
        }
    }

    /// The content of `blob`, after checking its size and SHA-256. A missing or
    /// altered blob is an [`Error::CorruptArtifact`]: whoever handed out the reference
    /// (a manifest) promised it exists.
    pub async fn get_blob(&self, blob: &BlobRef) -> Result<Bytes> {
        check_blob_path(blob)?;
        let bytes = match self.get(&blob.path).await {
            Ok(bytes) => bytes,
            Err(Error::NotFound { .. }) => {
                return Err(corrupt(&blob.path, "the blob is missing from the store"))
            }
            Err(e) => return Err(e),
        };
        if bytes.len() as u64 != blob.size {
            return Err(corrupt(
                &blob.path,
                format!("size is {} bytes, expected {}", bytes.len(), blob.size),
            ));
        }
        let digest = hex::encode(Sha256::digest(&bytes));
        if digest != blob.sha256 {
            return Err(corrupt(
                &blob.path,
                format!("sha256 is {digest}, expected {}", blob.sha256),
            ));
        }
        Ok(bytes)
    }

    /// Streams the stored blob through SHA-256 without holding it in memory.
    async fn verify_stored_blob(&self, blob: &BlobRef) -> Result<()> {
        let location = self.location(&blob.path)?;
        let result = self
            .inner
            .get_opts(&location, GetOptions::default())
            .await
            .map_err(|e| store_error(&blob.path, "read", e))?;
        if result.meta.size != blob.size {
            return Err(corrupt(
                &blob.path,
                format!(
                    "an object of {} bytes already holds this content address, expected {}",
                    result.meta.size, blob.size
                ),
            ));
        }
        let mut hasher = Sha256::new();
        let mut chunks = result.into_stream();
        while let Some(chunk) = chunks
            .try_next()
            .await
            .map_err(|e| store_error(&blob.path, "read", e))?
        {
            hasher.update(&chunk);
        }
        let digest = hex::encode(hasher.finalize());
        if digest != blob.sha256 {
            return Err(corrupt(
                &blob.path,
                format!("the object at this content address has sha256 {digest}"),
            ));
        }
        Ok(())
    }

    fn location(&self, path: &str) -> Result<ObjectPath> {
        let relative = ObjectPath::parse(path)
            .map_err(|e| Error::InvalidInput(format!("object path `{path}`: {e}")))?;
        Ok(self.prefix.parts().chain(relative.parts()).collect())
    }
}

/// A blob reference must point where its digest says: a tampered manifest must not
/// make a reader fetch (and trust) some other object.
pub(crate) fn check_blob_path(blob: &BlobRef) -> Result<()> {
    let well_formed = blob.sha256.len() == 64
        && blob
            .sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !well_formed || blob.path != format!("{BLOB_PREFIX}/{}", blob.sha256) {
        return Err(corrupt(
            &blob.path,
            format!(
                "not a content address (sha256 `{}`, path `{}`)",
                blob.sha256, blob.path
            ),
        ));
    }
    Ok(())
}

/// Rejects an option key the backend would not understand. object_store's builders
/// ignore unknown keys, which turns a typo in a credential or endpoint option into a
/// confusing failure far from its cause.
/// The backend's own name for an option key (aliases resolved), or `None` when the
/// backend has no such option.
fn canonical_option_key(backend: Backend, key: &str) -> Option<String> {
    let lowered = key.to_ascii_lowercase();
    match backend {
        Backend::LocalFileSystem | Backend::Memory => None,
        Backend::AmazonS3 => object_store::aws::AmazonS3ConfigKey::from_str(&lowered)
            .ok()
            .map(|k| k.as_ref().to_owned()),
        Backend::GoogleCloudStorage => object_store::gcp::GoogleConfigKey::from_str(&lowered)
            .ok()
            .map(|k| k.as_ref().to_owned()),
        Backend::MicrosoftAzure => object_store::azure::AzureConfigKey::from_str(&lowered)
            .ok()
            .map(|k| k.as_ref().to_owned()),
    }
}

/// The option key an environment variable sets for `backend`, if any: the SDK's
/// prefix (`AWS_`, `GOOGLE_`, `AZURE_`) and a known key once lower-cased.
fn environment_option_key(backend: Backend, variable: &str) -> Option<String> {
    let prefix = match backend {
        Backend::LocalFileSystem | Backend::Memory => return None,
        Backend::AmazonS3 => "AWS_",
        Backend::GoogleCloudStorage => "GOOGLE_",
        Backend::MicrosoftAzure => "AZURE_",
    };
    if !variable.starts_with(prefix) {
        return None;
    }
    canonical_option_key(backend, variable)
}

fn check_option_key(backend: Backend, key: &str) -> Result<()> {
    if canonical_option_key(backend, key).is_some() {
        return Ok(());
    }
    let why = match backend {
        Backend::LocalFileSystem | Backend::Memory => "it takes no options",
        _ => "see object_store's configuration keys for it",
    };
    Err(Error::InvalidInput(format!(
        "store option `{key}` is not understood by the {backend:?} backend ({why})"
    )))
}

fn corrupt(path: &str, message: impl Into<String>) -> Error {
    Error::CorruptArtifact {
        path: path.to_owned(),
        message: message.into(),
    }
}

fn store_error(path: &str, operation: &str, e: object_store::Error) -> Error {
    Error::Store {
        path: path.to_owned(),
        message: format!("{operation} failed: {e}"),
    }
}

fn not_found_or(path: &str, operation: &str, e: object_store::Error) -> Error {
    match e {
        object_store::Error::NotFound { .. } => Error::NotFound {
            what: format!("object `{path}`"),
        },
        e => store_error(path, operation, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> Store {
        Store::open("memory:///", Vec::<(String, String)>::new()).unwrap()
    }

    #[tokio::test]
    async fn create_only_keeps_the_first_object() {
        let store = memory();
        let first = store
            .put_create_only("a/b.txt", Bytes::from_static(b"first"))
            .await
            .unwrap();
        let second = store
            .put_create_only("a/b.txt", Bytes::from_static(b"second"))
            .await
            .unwrap();
        assert_eq!(
            (first, second),
            (CreateOutcome::Created, CreateOutcome::AlreadyExists)
        );
        assert_eq!(store.get("a/b.txt").await.unwrap(), &b"first"[..]);
        store
            .put_overwrite("a/b.txt", Bytes::from_static(b"third"))
            .await
            .unwrap();
        assert_eq!(store.get("a/b.txt").await.unwrap(), &b"third"[..]);
    }

    #[tokio::test]
    async fn missing_objects_are_not_found_and_deletes_are_idempotent() {
        let store = memory();
        let err = store.get("nothing/here").await.unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
        store.delete("nothing/here").await.unwrap();
        assert!(!store.exists("nothing/here").await.unwrap());
    }

    #[tokio::test]
    async fn compare_and_swap_on_memory() {
        let store = memory();
        let ConditionalPut::Written(v1) = store
            .put_if_version_matches("state", Bytes::from_static(b"1"), None)
            .await
            .unwrap()
        else {
            panic!("the first create must succeed");
        };
        assert_eq!(
            store
                .put_if_version_matches("state", Bytes::from_static(b"x"), None)
                .await
                .unwrap(),
            ConditionalPut::Conflict
        );
        let ConditionalPut::Written(v2) = store
            .put_if_version_matches("state", Bytes::from_static(b"2"), Some(v1.clone()))
            .await
            .unwrap()
        else {
            panic!("the update at the current version must succeed");
        };
        // A stale version loses.
        assert_eq!(
            store
                .put_if_version_matches("state", Bytes::from_static(b"3"), Some(v1))
                .await
                .unwrap(),
            ConditionalPut::Conflict
        );
        let (bytes, current) = store.get_versioned("state").await.unwrap();
        assert_eq!((bytes, current), (Bytes::from_static(b"2"), v2));
    }

    #[test]
    fn option_keys_are_checked_per_backend() {
        let err = Store::open("s3://bucket/prefix", [("aws_regoin", "eu-west-1")]).unwrap_err();
        assert!(err.to_string().contains("`aws_regoin`"), "{err}");
        Store::open(
            "s3://bucket/prefix",
            [
                ("AWS_REGION", "eu-west-1"),
                ("aws_endpoint", "http://localhost:9000"),
                ("allow_http", "true"),
            ],
        )
        .unwrap();
        let err = Store::open("gs://bucket", [("service_acount", "x")]).unwrap_err();
        assert!(err.to_string().contains("`service_acount`"), "{err}");
        let err = Store::open("az://container", [("account_nmae", "x")]).unwrap_err();
        assert!(err.to_string().contains("`account_nmae`"), "{err}");
        let err = Store::open("memory:///", [("region", "x")]).unwrap_err();
        assert!(err.to_string().contains("`region`"), "{err}");
        let err = Store::open("ftp://host/x", Vec::<(String, String)>::new()).unwrap_err();
        assert!(err.to_string().contains("ftp://host/x"), "{err}");
    }

    #[test]
    fn hostile_relative_paths_are_rejected() {
        let store = memory();
        for path in ["../x", "a/../b", "a//b"] {
            assert!(
                matches!(store.location(path), Err(Error::InvalidInput(_))),
                "{path}"
            );
        }
    }

    #[test]
    fn blob_references_must_be_content_addresses() {
        let good = BlobRef::of(b"hello");
        assert_eq!(
            good.sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        check_blob_path(&good).unwrap();
        let moved = BlobRef {
            path: "concepts/x/1/manifest.json".into(),
            ..good.clone()
        };
        assert!(matches!(
            check_blob_path(&moved),
            Err(Error::CorruptArtifact { .. })
        ));
    }
}
