//! Which repositories' events may become tasks.

/// Repository allowlist: exact `owner/name` entries and `owner/*` wildcards
/// (for GitLab, `group/subgroup/*` matches that group's direct projects and
/// `group/**` anything below). Matching ignores ASCII case, as both providers
/// do for paths. An empty list allows nothing.
#[derive(Debug, Clone, Default)]
pub struct Allowlist {
    entries: Vec<String>,
}

impl Allowlist {
    /// Builds the allowlist from the configured entries.
    pub fn new(entries: &[String]) -> Allowlist {
        Allowlist {
            entries: entries
                .iter()
                .map(|e| e.trim().to_ascii_lowercase())
                .collect(),
        }
    }

    /// True when `repository` matches an entry.
    pub fn allows(&self, repository: &str) -> bool {
        let repo = repository.to_ascii_lowercase();
        self.entries.iter().any(|e| {
            if let Some(prefix) = e.strip_suffix("/**") {
                repo.strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with('/') && rest.len() > 1)
            } else if let Some(prefix) = e.strip_suffix("/*") {
                repo.strip_prefix(prefix)
                    .and_then(|rest| rest.strip_prefix('/'))
                    .is_some_and(|name| !name.is_empty() && !name.contains('/'))
            } else {
                *e == repo
            }
        })
    }

    /// True when nothing is allowed (the gateway warns at start-up).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_wildcard_entries() {
        let a = Allowlist::new(&[
            "octo-org/*".to_owned(),
            "Codertocat/Hello-World".to_owned(),
            "gl/**".to_owned(),
        ]);
        assert!(a.allows("octo-org/octo-repo"));
        assert!(a.allows("codertocat/hello-world"));
        assert!(!a.allows("Codertocat/Other"));
        assert!(!a.allows("octo-org"));
        assert!(!a.allows("octo-org/"));
        assert!(!a.allows("octo-org/sub/repo"), "one level only for /*");
        assert!(!a.allows("octo-organisation/repo"));
        assert!(a.allows("gl/sub/deeper/proj"));
        assert!(!a.allows("gl"));
        assert!(!Allowlist::new(&[]).allows("any/thing"));
    }
}
