//! Optional bearer-token authentication for a service's API (health and reflection
//! are separate services and stay open, so probes work without the token).

use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::service::Interceptor;
use tonic::{Request, Status};

#[derive(Clone)]
pub struct BearerAuth {
    expected: Option<Arc<[u8]>>,
}

impl BearerAuth {
    /// `None`: every request passes.
    pub fn new(token: Option<String>) -> Self {
        BearerAuth {
            expected: token.map(|t| Arc::from(format!("Bearer {t}").into_bytes())),
        }
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        // Constant time in the token's content, so timing does not reveal how much of
        // a guess was right.
        if bool::from(given.ct_eq(expected)) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "missing or wrong bearer token (send `authorization: Bearer <token>`)",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(header: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(value) = header {
            request
                .metadata_mut()
                .insert("authorization", value.parse().unwrap());
        }
        request
    }

    #[test]
    fn only_the_exact_token_passes() {
        let mut auth = BearerAuth::new(Some("0123456789abcdef".into()));
        assert!(auth.call(with(Some("Bearer 0123456789abcdef"))).is_ok());
        for header in [
            None,
            Some("Bearer 0123456789abcdeF"),
            Some("Bearer 0123456789abcde"),
            Some("bearer 0123456789abcdef"),
            Some("0123456789abcdef"),
        ] {
            let err = auth.call(with(header)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{header:?}");
        }
        let mut open = BearerAuth::new(None);
        assert!(open.call(with(None)).is_ok());
    }
}
