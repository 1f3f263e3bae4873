//! A parser for container image references, without regular expressions.
//!
//! Grammar (after the Docker distribution `reference` package, restricted to
//! `sha256` digests):
//!
//! ```text
//! reference      := name [ ":" tag ] [ "@" digest ]
//! name           := [ domain "/" ] path-component ( "/" path-component )*
//! domain         := host [ ":" port ]          host: DNS labels joined by "." or "localhost"
//! path-component := [a-z0-9]+ ( separator [a-z0-9]+ )*
//! separator      := "." | "_" | "__" | "-"+
//! tag            := [A-Za-z0-9_] [A-Za-z0-9_.-]{0,127}
//! digest         := "sha256:" 64 lowercase hex digits
//! ```
//!
//! The first `/`-separated component is a registry when it contains `.` or
//! `:` or is `localhost`, as Docker decides it. The name is at most 255 bytes.

use std::fmt;

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Registry host, with its port when one was given (`ghcr.io`, `localhost:5000`).
    pub registry: Option<String>,
    /// Repository path (`library/node`).
    pub path: String,
    /// Tag, when given.
    pub tag: Option<String>,
    /// The 64 hex digits of a `sha256` digest, when given.
    pub digest: Option<String>,
}

/// Why an image reference does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ImageRefError(String);

impl ImageRef {
    /// Parses `[registry[:port]/]path[:tag][@sha256:<64 hex>]`.
    pub fn parse(s: &str) -> Result<ImageRef, ImageRefError> {
        let err = |m: String| Err(ImageRefError(m));
        if s.is_empty() {
            return err("is empty".into());
        }
        let (rest, digest) = match s.split_once('@') {
            Some((rest, digest)) => (rest, Some(parse_digest(digest)?)),
            None => (s, None),
        };
        // A tag follows the last ':' only if no '/' comes after it; otherwise
        // that ':' belongs to a registry port.
        let (name, tag) = match rest.rfind(':') {
            Some(i) if !rest[i + 1..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
            _ => (rest, None),
        };
        if let Some(tag) = tag {
            check_tag(tag)?;
        }
        if name.is_empty() {
            return err("has no repository name".into());
        }
        if name.len() > 255 {
            return err(format!("name is {} bytes; at most 255 allowed", name.len()));
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, path)) if first.contains(['.', ':']) || first == "localhost" => {
                check_domain(first)?;
                (Some(first.to_owned()), path)
            }
            _ => (None, name),
        };
        for component in path.split('/') {
            check_path_component(component)?;
        }
        Ok(ImageRef {
            registry,
            path: path.to_owned(),
            tag: tag.map(str::to_owned),
            digest,
        })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(r) = &self.registry {
            write!(f, "{r}/")?;
        }
        f.write_str(&self.path)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@sha256:{d}")?;
        }
        Ok(())
    }
}

fn parse_digest(d: &str) -> Result<String, ImageRefError> {
    let Some(hex) = d.strip_prefix("sha256:") else {
        return Err(ImageRefError(format!(
            "digest {d:?} must be sha256:<64 lowercase hex digits>"
        )));
    };
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(ImageRefError(format!(
            "digest {d:?} must be sha256:<64 lowercase hex digits>"
        )));
    }
    Ok(hex.to_owned())
}

fn check_tag(tag: &str) -> Result<(), ImageRefError> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = tag.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 128
        && word(bytes[0])
        && bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ImageRefError(format!(
            "tag {tag:?} must be 1-128 of [A-Za-z0-9_.-], not starting with '.' or '-'"
        )))
    }
}

fn check_domain(domain: &str) -> Result<(), ImageRefError> {
    let (host, port) = match domain.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (domain, None),
    };
    let label_ok = |l: &str| {
        let b = l.as_bytes();
        !b.is_empty()
            && b.len() <= 63
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-')
    };
    if host.is_empty() || !host.split('.').all(label_ok) {
        return Err(ImageRefError(format!(
            "registry host {host:?} is not a valid host name"
        )));
    }
    if let Some(port) = port {
        let valid = !port.is_empty()
            && port.len() <= 5
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p));
        if !valid {
            return Err(ImageRefError(format!(
                "registry port {port:?} is not a port number"
            )));
        }
    }
    Ok(())
}

fn check_path_component(c: &str) -> Result<(), ImageRefError> {
    let bad = || {
        Err(ImageRefError(format!(
            "path component {c:?} must be lowercase [a-z0-9] runs joined by '.', '_', '__' or '-'"
        )))
    };
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let b = c.as_bytes();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return bad();
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__", or any number of "-".
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return bad();
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn accepts_common_references() {
        for s in [
            "alpine",
            "node:20-alpine",
            "library/python:3.12-slim",
            "docker.io/library/node:20",
            "ghcr.io/acme/ci-images/node-build:v1.2.3",
            "localhost:5000/sandbox",
            "registry.example.com:8443/team/img:latest",
            "my_org/my__img-x--y.z",
            "python@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "ghcr.io/a/b:1.0@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            let r = ImageRef::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(r.to_string(), s);
        }
    }

    #[test]
    fn splits_registry_port_path_tag() {
        let r = ImageRef::parse("localhost:5000/team/app:1.2").unwrap();
        assert_eq!(r.registry.as_deref(), Some("localhost:5000"));
        assert_eq!(r.path, "team/app");
        assert_eq!(r.tag.as_deref(), Some("1.2"));
        let r = ImageRef::parse("acme/app").unwrap();
        assert_eq!(r.registry, None);
        assert_eq!(r.path, "acme/app");
    }

    #[test]
    fn rejects_malformed_references() {
        for s in [
            "",
            "Node:20",
            "node:",
            "node:-x",
            ":tag",
            "a//b",
            "/node",
            "node/",
            "node@sha256:abc",
            "node@md5:0123456789abcdef0123456789abcdef",
            "node@sha256:0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef",
            "ex ample.com/node",
            "example.com:99999/node",
            "example.com:/node",
            "-bad.com/node",
            "node..js",
            "a___b",
            "node;rm -rf /",
            "node:$(id)",
        ] {
            assert!(ImageRef::parse(s).is_err(), "{s:?} should be rejected");
        }
        let long = format!("acme/{}", "a".repeat(260));
        assert!(
            ImageRef::parse(&long)
                .unwrap_err()
                .to_string()
                .contains("255")
        );
    }
}
