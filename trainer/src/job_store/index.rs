//! Listing jobs newest first. Each job has an empty marker `index/<key>-<id>` whose key
//! is `u64::MAX` minus its creation time in milliseconds, zero-padded to 20 digits: the
//! store lists paths in lexicographic order, which these keys make newest first (jobs
//! created in the same millisecond follow in id order).
//!
//! A page token is the hex of the last marker a page returned; the next page starts
//! after it, so jobs created while a client pages through appear on no later page
//! (they sort before the token) and none is repeated or skipped.
//!
//! Limit: each page lists the whole index (the store offers no listing from an
//! offset), so a page costs time in proportion to the number of jobs ever stored.

use chrono::{DateTime, Utc};

use super::ids::validate_job_id;
use super::JobStore;

const INDEX_PREFIX: &str = "index/";
const KEY_DIGITS: usize = 20;

/// One page of [`JobStore::list_jobs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobPage {
    /// Newest first.
    pub job_ids: Vec<String>,
    /// Pass it to get the next page; empty on the last page.
    pub next_page_token: String,
}

/// The index marker of a job created at `create_time`.
pub(super) fn index_key(create_time: DateTime<Utc>, id: &str) -> String {
    // A service clock never reads before 1970; clamping keeps the key well-formed.
    let millis = u64::try_from(create_time.timestamp_millis()).unwrap_or(0);
    format!("{INDEX_PREFIX}{:0KEY_DIGITS$}-{id}", u64::MAX - millis)
}

/// The job id of an index marker; `None` if `path` is not one.
fn parse_index_key(path: &str) -> Option<&str> {
    let rest = path.strip_prefix(INDEX_PREFIX)?;
    let (key, id) = (rest.get(..KEY_DIGITS)?, rest.get(KEY_DIGITS..)?);
    let id = id.strip_prefix('-')?;
    (key.bytes().all(|b| b.is_ascii_digit()) && validate_job_id(id).is_ok()).then_some(id)
}

fn encode_page_token(path: &str) -> String {
    hex::encode(path)
}

fn decode_page_token(token: &str) -> coreg::Result<String> {
    hex::decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .filter(|path| parse_index_key(path).is_some())
        .ok_or_else(|| {
            let shown: String = token.chars().take(64).collect();
            coreg::Error::InvalidInput(format!(
                "page token {shown:?} is not one this service issued; pass a previous \
                 response's next_page_token, or an empty token for the first page"
            ))
        })
}

impl JobStore {
    /// Up to `page_size` (at least 1) job ids, newest first, from after `page_token`
    /// (empty for the first page).
    pub async fn list_jobs(&self, page_size: usize, page_token: &str) -> coreg::Result<JobPage> {
        if page_size == 0 {
            return Err(coreg::Error::InvalidInput(
                "page size must be at least 1".into(),
            ));
        }
        let after = match page_token {
            "" => None,
            token => Some(decode_page_token(token)?),
        };
        let markers = self.store.list(INDEX_PREFIX).await?;
        let mut job_ids = Vec::new();
        let mut last_path = None;
        let mut more = false;
        for marker in markers.iter().filter(|marker| {
            after
                .as_deref()
                .is_none_or(|after| marker.path.as_str() > after)
        }) {
            let Some(id) = parse_index_key(&marker.path) else {
                tracing::warn!(marker = %marker.path, "ignoring an object that is not an index marker");
                continue;
            };
            if job_ids.len() == page_size {
                more = true;
                break;
            }
            job_ids.push(id.to_owned());
            last_path = Some(marker.path.as_str());
        }
        let next_page_token = match (more, last_path) {
            (true, Some(path)) => encode_page_token(path),
            _ => String::new(),
        };
        Ok(JobPage {
            job_ids,
            next_page_token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(millis: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(millis).unwrap()
    }

    #[test]
    fn newer_jobs_sort_first() {
        let older = index_key(at(1_700_000_000_000), "b");
        let newer = index_key(at(1_700_000_000_001), "a");
        assert_eq!(older, "index/18446742373709551615-b");
        assert!(newer < older);
        assert_eq!(parse_index_key(&older), Some("b"));
        assert_eq!(index_key(at(-5), "x"), format!("index/{}-x", u64::MAX));
    }

    #[test]
    fn only_issued_tokens_decode() {
        let key = index_key(at(1_700_000_000_000), "job-1");
        assert_eq!(decode_page_token(&encode_page_token(&key)).unwrap(), key);
        let not_keys = [
            "zz".to_owned(),
            "abc".to_owned(),
            hex::encode("index/"),
            hex::encode("index/1234-job"),
            hex::encode("queue/18446742373709551615-job"),
            hex::encode("index/18446742373709551615-../x"),
            hex::encode("index/1844674237370955161x-job"),
            hex::encode([0xff, 0xfe]),
        ];
        for token in &not_keys {
            let err = decode_page_token(token).unwrap_err();
            assert!(
                matches!(err, coreg::Error::InvalidInput(_)),
                "{token}: {err}"
            );
        }
    }
}
