//! Job ids and request ids. A job id names the job's folder in the store and becomes
//! the version of the concept the job writes, so it follows the concept-version rules
//! (1–64 characters of `a-z 0-9 . _ -`, starting with a letter or digit, no `..`): a
//! hostile id such as `../x` is refused, never turned into a path.

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

const MAX_REQUEST_ID_LEN: usize = 64;

/// Checks a job id given by a caller (or read back from a listing).
pub(super) fn validate_job_id(id: &str) -> coreg::Result<()> {
    coreg::artifact::validate_concept_version(id)
        .map_err(|e| coreg::Error::InvalidInput(format!("job id: {e}")))
}

/// Checks an idempotency key: 1–64 characters of `A-Z a-z 0-9 . _ -` (a UUID fits).
pub(super) fn validate_request_id(request_id: &str) -> coreg::Result<()> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
    if !request_id.is_empty()
        && request_id.len() <= MAX_REQUEST_ID_LEN
        && request_id.chars().all(allowed)
    {
        return Ok(());
    }
    let shown: String = request_id.chars().take(MAX_REQUEST_ID_LEN).collect();
    Err(coreg::Error::InvalidInput(format!(
        "request id {shown:?} ({} characters) is not allowed: use 1–{MAX_REQUEST_ID_LEN} \
         characters of A-Z, a-z, 0-9, '.', '_' and '-'",
        request_id.chars().count()
    )))
}

/// The job id a request id always maps to, so that a retried submission finds the job
/// the first one created: `r` and the first 24 hex digits (96 bits) of the request
/// id's SHA-256.
pub fn job_id_for_request(request_id: &str) -> coreg::Result<String> {
    validate_request_id(request_id)?;
    let digest = hex::encode(Sha256::digest(request_id.as_bytes()));
    Ok(format!("r{}", &digest[..24]))
}

/// A fresh id for a submission without a request id: the UTC second it was made and 64
/// random bits. It starts with a digit, so it never equals an id from
/// [`job_id_for_request`], which starts with `r`.
pub fn new_job_id(now: DateTime<Utc>) -> String {
    format!(
        "{}-{:016x}",
        now.format("%Y%m%dt%H%M%S"),
        rand::random::<u64>()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_map_to_fixed_job_ids() {
        // hashlib.sha256(b"req-1").hexdigest()[:24]
        assert_eq!(
            job_id_for_request("req-1").unwrap(),
            "r9456bdfa12ea76959c94a357"
        );
        let uuid = "3f2b8c1e-9d4a-4e7b-8a6f-1c2d3e4f5a6b";
        let id = job_id_for_request(uuid).unwrap();
        assert_eq!(id, job_id_for_request(uuid).unwrap());
        assert_ne!(id, job_id_for_request("req-2").unwrap());
        validate_job_id(&id).unwrap();
    }

    #[test]
    fn bad_request_ids_are_refused() {
        let long = "a".repeat(65);
        for bad in ["", "a b", "../x", "a/b", "ü", long.as_str()] {
            let err = job_id_for_request(bad).unwrap_err();
            assert!(
                matches!(err, coreg::Error::InvalidInput(_)),
                "{bad:?}: {err}"
            );
        }
        job_id_for_request(&"A".repeat(64)).unwrap();
    }

    #[test]
    fn new_ids_are_valid_distinct_and_dated() {
        let now = DateTime::parse_from_rfc3339("2025-03-14T15:09:26.5Z")
            .unwrap()
            .with_timezone(&Utc);
        let a = new_job_id(now);
        let b = new_job_id(now);
        assert_ne!(a, b);
        for id in [&a, &b] {
            validate_job_id(id).unwrap();
            assert!(id.starts_with("20250314t150926-"), "{id}");
            assert_eq!(id.len(), 16 + 16, "{id}");
        }
    }

    #[test]
    fn hostile_job_ids_are_refused() {
        let long = "a".repeat(65);
        for bad in [
            "",
            "../x",
            "a/b",
            "x..y",
            "A",
            "-a",
            ".a",
            "a b",
            long.as_str(),
        ] {
            let err = validate_job_id(bad).unwrap_err();
            assert!(
                matches!(err, coreg::Error::InvalidInput(_)),
                "{bad:?}: {err}"
            );
            assert!(err.to_string().starts_with("job id: "), "{err}");
        }
    }
}
