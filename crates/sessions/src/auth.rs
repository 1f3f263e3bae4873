//! Bearer tokens. The service holds only SHA-256 hashes of the accepted
//! tokens, compares in constant time, and labels a session's Job with a
//! prefix of its owner's hash (the full hash in an annotation).

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Label on a session's Job: the first 40 hex digits of the owner's token hash
/// (labels hold at most 63 characters; 160 bits do not collide by chance).
pub const LABEL_OWNER: &str = "sandfleet.dev/owner";
/// Annotation on a session's Job: the owner's full token hash.
pub const ANNOTATION_OWNER: &str = "sandfleet.dev/owner-sha256";

/// The owner of a request: its token's hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// Hex SHA-256 of the token.
    pub hash: String,
}

impl Owner {
    /// The label value: a prefix of the hash.
    pub fn label(&self) -> &str {
        &self.hash[..40]
    }

    /// The label selector of this owner's sessions.
    pub fn selector(&self) -> String {
        format!("{LABEL_OWNER}={}", self.label())
    }
}

/// Hex SHA-256 of a token.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The accepted tokens, as hashes.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    hashes: Vec<[u8; 32]>,
}

impl Tokens {
    /// From the tokens themselves (read from a mounted Secret at start-up).
    pub fn from_tokens<'a>(tokens: impl IntoIterator<Item = &'a str>) -> Tokens {
        Tokens {
            hashes: tokens
                .into_iter()
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(|t| Sha256::digest(t.as_bytes()).into())
                .collect(),
        }
    }

    /// How many tokens are accepted.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// True when no token is accepted (every request is refused).
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// The owner of an `Authorization` header value, if its token is accepted.
    pub fn authenticate(&self, header: Option<&str>) -> Option<Owner> {
        let token = header?.strip_prefix("Bearer ")?.trim();
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Every candidate is compared, so timing says nothing about which matched.
        let mut found = subtle::Choice::from(0);
        for h in &self.hashes {
            found |= h.ct_eq(&digest);
        }
        bool::from(found).then(|| Owner {
            hash: hex::encode(digest),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_accepted_bearer_tokens_authenticate() {
        let tokens = Tokens::from_tokens(["alpha", " beta \n", ""]);
        assert_eq!(tokens.len(), 2);
        let a = tokens.authenticate(Some("Bearer alpha")).unwrap();
        assert_eq!(a.hash, hash_token("alpha"));
        assert!(tokens.authenticate(Some("Bearer beta")).is_some());
        assert!(tokens.authenticate(Some("Bearer gamma")).is_none());
        assert!(tokens.authenticate(Some("alpha")).is_none());
        assert!(tokens.authenticate(None).is_none());
        assert_eq!(a.label().len(), 40);
        assert!(
            !a.selector().contains("alpha"),
            "the token never leaves the process"
        );
    }
}
