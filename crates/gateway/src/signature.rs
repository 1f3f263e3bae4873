//! Authenticating webhook deliveries: GitHub's `X-Hub-Signature-256` HMAC and
//! GitLab's `X-Gitlab-Token` shared secret, both compared in constant time.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Why a delivery's credentials were refused. Every variant answers 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The signature or token header is absent.
    #[error("missing {0} header")]
    Missing(&'static str),
    /// The header is not `sha256=<64 hex digits>`.
    #[error("malformed X-Hub-Signature-256 header (expected sha256=<hex>)")]
    Malformed,
    /// The signature or token does not match the configured secret.
    #[error("signature does not match")]
    Mismatch,
}

/// The `X-Hub-Signature-256` value GitHub sends for `body` signed with `secret`:
/// `sha256=<hex HMAC-SHA256(secret, body)>`. Used by tests and by anyone
/// re-signing a payload.
pub fn github_signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    let mut mac = match HmacSha256::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC-SHA256 takes keys of any length"),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Verifies GitHub's `X-Hub-Signature-256` header over the raw request body.
///
/// The comparison runs in constant time (`Mac::verify_slice`), so the time it
/// takes says nothing about how many bytes of a forged signature were right.
pub fn verify_github(
    secret: &[u8],
    body: &[u8],
    header: Option<&str>,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing("X-Hub-Signature-256"))?;
    let hex_sig = header
        .trim()
        .strip_prefix("sha256=")
        .ok_or(SignatureError::Malformed)?;
    let sig = hex::decode(hex_sig).map_err(|_| SignatureError::Malformed)?;
    if sig.len() != 32 {
        return Err(SignatureError::Malformed);
    }
    let mut mac = match HmacSha256::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC-SHA256 takes keys of any length"),
    };
    mac.update(body);
    mac.verify_slice(&sig).map_err(|_| SignatureError::Mismatch)
}

/// Verifies GitLab's `X-Gitlab-Token` header: the configured token, sent
/// verbatim. Compared in constant time; lengths are compared first, which
/// reveals only the token's length.
pub fn verify_gitlab(token: &str, header: Option<&str>) -> Result<(), SignatureError> {
    let got = header.ok_or(SignatureError::Missing("X-Gitlab-Token"))?;
    if bool::from(got.as_bytes().ct_eq(token.as_bytes())) {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// Verifies an `Authorization: Bearer <token>` header against the accepted
/// tokens, each compared in constant time.
pub fn verify_bearer(tokens: &[String], header: Option<&str>) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing("Authorization"))?;
    let got = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .ok_or(SignatureError::Malformed)?
        .trim();
    // Check every token (no early exit), so timing does not tell which matched.
    let mut ok = subtle::Choice::from(0);
    for t in tokens {
        ok |= got.as_bytes().ct_eq(t.as_bytes());
    }
    if bool::from(ok) && !got.is_empty() {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    // GitHub's documented test vector (docs "Validating webhook deliveries").
    const SECRET: &str = "It's a Secret to Everybody";
    const PAYLOAD: &str = "Hello, World!";
    const SIGNATURE: &str =
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    #[test]
    fn github_documented_vector_signs_and_verifies() {
        assert_eq!(
            github_signature(SECRET.as_bytes(), PAYLOAD.as_bytes()),
            SIGNATURE
        );
        verify_github(SECRET.as_bytes(), PAYLOAD.as_bytes(), Some(SIGNATURE)).unwrap();
    }

    #[test]
    fn github_rejects_tampered_body_wrong_secret_and_garbage() {
        assert_eq!(
            verify_github(SECRET.as_bytes(), b"Hello, World?", Some(SIGNATURE)),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_github(b"another secret", PAYLOAD.as_bytes(), Some(SIGNATURE)),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_github(SECRET.as_bytes(), PAYLOAD.as_bytes(), None),
            Err(SignatureError::Missing("X-Hub-Signature-256"))
        );
        for bad in [
            "sha1=757107ea",
            "sha256=zz",
            "sha256=757107ea",
            "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
        ] {
            assert_eq!(
                verify_github(SECRET.as_bytes(), PAYLOAD.as_bytes(), Some(bad)),
                Err(SignatureError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn gitlab_token_must_match_exactly() {
        verify_gitlab("s3cret", Some("s3cret")).unwrap();
        assert_eq!(
            verify_gitlab("s3cret", Some("s3cre")),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_gitlab("s3cret", Some("s3cret ")),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_gitlab("s3cret", None),
            Err(SignatureError::Missing("X-Gitlab-Token"))
        );
    }

    #[test]
    fn bearer_accepts_any_configured_token_only() {
        let tokens = vec!["alpha".to_owned(), "beta".to_owned()];
        verify_bearer(&tokens, Some("Bearer beta")).unwrap();
        assert_eq!(
            verify_bearer(&tokens, Some("Bearer gamma")),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_bearer(&tokens, Some("Basic YWxwaGE=")),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            verify_bearer(&[], Some("Bearer ")),
            Err(SignatureError::Mismatch)
        );
    }
}
