//! Who may read and who may act.
//!
//! A browser signs in with a token from `console.tokens`; the console keeps
//! a session (random id in an `HttpOnly`, `SameSite=Strict` cookie) with the
//! token's name and role and a random CSRF token that every form carries.
//! A form post is accepted only when its session is valid, its CSRF field
//! equals the session's (compared in constant time) and its `Origin` header,
//! when the browser sends one, is the console's own. Scripts may instead send
//! `Authorization: Bearer <token>`: not a cookie, so not forgeable by another
//! site, and no CSRF field is needed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sandfleet_settings::{ConsoleRole, ConsoleToken};
use subtle::ConstantTimeEq;

/// The sign-in cookie's name.
pub const COOKIE: &str = "sandfleet_console";
/// How long a sign-in lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's name.
    pub name: String,
    /// What it may do.
    pub role: ConsoleRole,
    /// The session's CSRF token (`None` for a bearer token: no cookie, no
    /// cross-site risk).
    pub csrf: Option<String>,
}

impl Principal {
    /// Whether it may requeue, purge and replay.
    pub fn is_operator(&self) -> bool {
        self.role == ConsoleRole::Operator
    }
}

#[derive(Debug)]
struct Session {
    principal: Principal,
    expires: Instant,
}

/// The tokens and the signed-in sessions.
#[derive(Debug)]
pub struct Auth {
    tokens: Vec<ConsoleToken>,
    /// Whether reading needs a sign-in.
    pub read_requires_token: bool,
    sessions: Mutex<HashMap<String, Session>>,
}

/// 32 random bytes, hex-encoded.
fn random_hex() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// Constant-time string equality (the lengths may leak, the contents not).
pub fn same(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

impl Auth {
    /// From the settings.
    pub fn new(tokens: Vec<ConsoleToken>, read_requires_token: bool) -> Auth {
        Auth {
            tokens,
            read_requires_token,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// The token's holder, if `token` is one of the configured tokens.
    pub fn check_token(&self, token: &str) -> Option<Principal> {
        // Every configured token is compared, so timing does not say which
        // one nearly matched.
        let mut found = None;
        for t in &self.tokens {
            if same(&t.token, token) && found.is_none() {
                found = Some(Principal {
                    name: t.name.clone(),
                    role: t.role,
                    csrf: None,
                });
            }
        }
        found
    }

    /// Signs in with `token`: the new session id, and who it is.
    pub fn sign_in(&self, token: &str) -> Option<(String, Principal)> {
        let mut principal = self.check_token(token)?;
        principal.csrf = Some(random_hex());
        let id = random_hex();
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        sessions.insert(
            id.clone(),
            Session {
                principal: principal.clone(),
                expires: now + SESSION_TTL,
            },
        );
        Some((id, principal))
    }

    /// Ends a session.
    pub fn sign_out(&self, id: &str) {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// The session's holder, while it lasts.
    pub fn session(&self, id: &str) -> Option<Principal> {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions
            .get(id)
            .filter(|s| s.expires > Instant::now())
            .map(|s| s.principal.clone())
    }
}

/// Why an action was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Nobody signed in (and no bearer token).
    #[error("sign in with an operator token to do this")]
    NotSignedIn,
    /// Signed in, but not as an operator.
    #[error("{0} has the viewer role; this needs a token with the operator role")]
    NotOperator(String),
    /// The form's CSRF token is missing or wrong.
    #[error(
        "the form is stale or was not sent by this console (CSRF token mismatch); reload the page and try again"
    )]
    Csrf,
    /// The `Origin` header names another site.
    #[error("cross-site request refused (Origin {0})")]
    Origin(String),
}

/// The origins a request to `host` (its `Host` header) comes from when a
/// page of this console sent it: `http://host` and `https://host` (behind a
/// TLS-terminating proxy). A cross-site request carries the other site's
/// `Origin` with our `Host`, so comparing the two is enough.
pub fn own_origins(host: Option<&str>) -> Vec<String> {
    host.map(|h| vec![format!("http://{h}"), format!("https://{h}")])
        .unwrap_or_default()
}

/// Whether an `Origin` header (when the browser sent one) is one of ours.
/// `null` (sandboxed frames, cross-site redirects) is not.
pub fn origin_ok(origin: Option<&str>, own: &[String]) -> bool {
    origin.is_none_or(|o| own.iter().any(|own| own == o))
}

/// Decides whether `who` may act with a form that carried `csrf_field`.
/// `origin` is the request's `Origin` header, `own` the origins the console
/// is reachable as (see [`own_origins`]).
pub fn authorize_action(
    who: Option<&Principal>,
    csrf_field: Option<&str>,
    origin: Option<&str>,
    own: &[String],
) -> Result<(), Refusal> {
    if let Some(o) = origin
        && !origin_ok(Some(o), own)
    {
        return Err(Refusal::Origin(o.to_owned()));
    }
    let who = who.ok_or(Refusal::NotSignedIn)?;
    if let Some(expected) = &who.csrf {
        // A cookie session: the form must carry the session's token.
        if !csrf_field.is_some_and(|f| same(f, expected)) {
            return Err(Refusal::Csrf);
        }
    }
    if !who.is_operator() {
        return Err(Refusal::NotOperator(who.name.clone()));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth::new(
            vec![
                ConsoleToken {
                    name: "alice".into(),
                    token: "operator-token-0123456789".into(),
                    role: ConsoleRole::Operator,
                },
                ConsoleToken {
                    name: "bob".into(),
                    token: "viewer-token-0123456789".into(),
                    role: ConsoleRole::Viewer,
                },
            ],
            false,
        )
    }

    #[test]
    fn sessions_carry_the_role_and_a_csrf_token_of_their_own() {
        let a = auth();
        assert!(a.sign_in("wrong-token-0123456789").is_none());
        let (id1, p1) = a.sign_in("operator-token-0123456789").unwrap();
        let (id2, p2) = a.sign_in("operator-token-0123456789").unwrap();
        assert_ne!(id1, id2);
        assert_ne!(p1.csrf, p2.csrf, "each sign-in gets its own CSRF token");
        assert_eq!(a.session(&id1).unwrap(), p1);
        a.sign_out(&id1);
        assert!(a.session(&id1).is_none());
        assert!(a.session(&id2).is_some());
    }

    #[test]
    fn actions_need_an_operator_the_session_csrf_and_our_origin() {
        let a = auth();
        let own = vec!["http://127.0.0.1:8070".to_owned()];
        let (_, op) = a.sign_in("operator-token-0123456789").unwrap();
        let (_, viewer) = a.sign_in("viewer-token-0123456789").unwrap();
        let csrf = op.csrf.clone().unwrap();
        let ok = authorize_action(Some(&op), Some(&csrf), Some("http://127.0.0.1:8070"), &own);
        assert_eq!(ok, Ok(()));
        assert_eq!(
            authorize_action(None, Some(&csrf), None, &own),
            Err(Refusal::NotSignedIn)
        );
        assert_eq!(
            authorize_action(Some(&op), None, None, &own),
            Err(Refusal::Csrf)
        );
        assert_eq!(
            authorize_action(Some(&op), Some("0000"), None, &own),
            Err(Refusal::Csrf)
        );
        assert_eq!(
            authorize_action(Some(&op), Some(&csrf), Some("https://evil.example"), &own),
            Err(Refusal::Origin("https://evil.example".into()))
        );
        let vcsrf = viewer.csrf.clone().unwrap();
        assert_eq!(
            authorize_action(Some(&viewer), Some(&vcsrf), None, &own),
            Err(Refusal::NotOperator("bob".into()))
        );
        assert_eq!(
            authorize_action(Some(&op), Some(&csrf), Some("null"), &own),
            Err(Refusal::Origin("null".into()))
        );
        // Behind a proxy with TLS: the Host names the origin.
        let proxied = own_origins(Some("console.example.com"));
        assert_eq!(
            authorize_action(
                Some(&op),
                Some(&csrf),
                Some("https://console.example.com"),
                &proxied
            ),
            Ok(())
        );
        assert!(!origin_ok(
            Some("https://console.example.com.evil.net"),
            &proxied
        ));
        assert!(
            origin_ok(None, &proxied),
            "no Origin header: the CSRF token decides"
        );
        // A bearer token has no cookie to forge: no CSRF field needed.
        let bearer = a.check_token("operator-token-0123456789").unwrap();
        assert_eq!(authorize_action(Some(&bearer), None, None, &own), Ok(()));
    }
}
