//! Authenticating requests: GitHub's `X-Hub-Signature-256` HMAC, GitLab's
//! `X-Gitlab-Token` shared secret and the task API's bearer tokens, all
//! compared in constant time. Each refusal names the credential it is about,
//! so a caller who sent the wrong kind learns which one the route expects.

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
    /// The GitHub signature does not match the body signed with the secret.
    #[error("X-Hub-Signature-256 does not match the body signed with the webhook secret")]
    Mismatch,
    /// The GitLab token is not the configured one.
    #[error("X-Gitlab-Token does not match the webhook token")]
    TokenMismatch,
    /// `Authorization` carries another scheme (`Basic`, ...) or no token.
    #[error(
        "the task API takes `Authorization: Bearer <token>` with one of gateway.api_tokens, \
         not {0}"
    )]
    NotBearer(String),
    /// The bearer token is not one of the accepted tokens.
    #[error("the bearer token is not one of gateway.api_tokens")]
    UnknownToken,
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
        Err(SignatureError::TokenMismatch)
    }
}

/// Verifies an `Authorization: Bearer <token>` header against the accepted
/// tokens, each compared in constant time.
pub fn verify_bearer(tokens: &[String], header: Option<&str>) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing("Authorization"))?;
    // The scheme is case-insensitive (RFC 9110 §11.1).
    let (scheme, rest) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        // Name the scheme only: the credentials themselves are never echoed.
        let what = if scheme.is_empty() {
            "an empty header".to_owned()
        } else {
            format!("a {scheme:?} credential")
        };
        return Err(SignatureError::NotBearer(what));
    }
    let got = rest.trim();
    if got.is_empty() {
        return Err(SignatureError::NotBearer("an empty token".to_owned()));
    }
    // Check every token (no early exit), so timing does not tell which matched.
    let mut ok = subtle::Choice::from(0);
    for t in tokens {
        ok |= got.as_bytes().ct_eq(t.as_bytes());
    }
    if bool::from(ok) {
        Ok(())
    } else {
        Err(SignatureError::UnknownToken)
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
            Err(SignatureError::TokenMismatch)
        );
        assert_eq!(
            verify_gitlab("s3cret", Some("s3cret ")),
            Err(SignatureError::TokenMismatch)
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
        verify_bearer(&tokens, Some("bearer alpha")).unwrap();
        let unknown = verify_bearer(&tokens, Some("Bearer gamma")).unwrap_err();
        assert_eq!(unknown, SignatureError::UnknownToken);
        assert_eq!(
            unknown.to_string(),
            "the bearer token is not one of gateway.api_tokens"
        );
        let basic = verify_bearer(&tokens, Some("Basic YWxwaGE=")).unwrap_err();
        assert_eq!(
            basic,
            SignatureError::NotBearer("a \"Basic\" credential".into())
        );
        let text = basic.to_string();
        assert!(
            text.contains("Bearer <token>") && text.contains("Basic"),
            "{text}"
        );
        assert!(
            !text.contains("X-Hub-Signature-256") && !text.contains("YWxwaGE="),
            "{text}"
        );
        assert_eq!(
            verify_bearer(&[], Some("Bearer ")),
            Err(SignatureError::NotBearer("an empty token".into()))
        );
        assert_eq!(
            verify_bearer(&tokens, None),
            Err(SignatureError::Missing("Authorization"))
        );
    }
}
