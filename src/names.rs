//! Validated names: apps, config keys, hosts, git refs.
//!
//! Hostile input stops here. A value of one of these types has been
//! checked once, so code holding an `AppName` may put it in a path or a
//! command line without looking again.

use std::fmt;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("invalid app name {0:?}: use 1-63 lowercase letters, digits and dashes, starting with a letter")]
    App(String),
    #[error("invalid config key {0:?}: use letters, digits and underscores, not starting with a digit")]
    ConfigKey(String),
    #[error("invalid host name {0:?}")]
    Host(String),
    #[error("invalid name {0:?}: use 1-63 lowercase letters, digits, - and _")]
    Label(String),
    #[error("invalid ref name {0:?}")]
    Ref(String),
}

/// An app name matching `^[a-z][a-z0-9-]{0,62}$`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AppName(String);

impl AppName {
    pub fn parse(s: &str) -> Result<AppName, NameError> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 63
            && b[0].is_ascii_lowercase()
            && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
        if ok {
            Ok(AppName(s.to_string()))
        } else {
            Err(NameError::App(truncate(s)))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AppName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A label for a token or key: 1-63 of lowercase letters, digits, `-`
/// and `_`, starting with a letter or digit.
pub fn check_label(s: &str) -> Result<(), NameError> {
    let b = s.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_');
    if ok {
        Ok(())
    } else {
        Err(NameError::Label(truncate(s)))
    }
}

/// A config key matching `^[A-Za-z_][A-Za-z0-9_]*$`, at most 255 bytes.
pub fn check_config_key(s: &str) -> Result<(), NameError> {
    let b = s.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 255
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_');
    if ok {
        Ok(())
    } else {
        Err(NameError::ConfigKey(truncate(s)))
    }
}

/// A host name per RFC 1123: dot-separated labels of letters, digits and
/// inner dashes, 1-63 bytes each, 253 in all. Returned lowercased, as the
/// proxy compares hosts.
pub fn parse_host(s: &str) -> Result<String, NameError> {
    let lower = s.to_ascii_lowercase();
    let ok = !lower.is_empty()
        && lower.len() <= 253
        && lower.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
                && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        });
    if ok {
        Ok(lower)
    } else {
        Err(NameError::Host(truncate(s)))
    }
}

/// A full ref name as `git check-ref-format` allows, limited to the
/// namespaces a push may touch (`refs/heads/`, `refs/tags/`).
pub fn check_ref(s: &str) -> Result<(), NameError> {
    let bad = || NameError::Ref(truncate(s));
    let rest = s
        .strip_prefix("refs/heads/")
        .or_else(|| s.strip_prefix("refs/tags/"))
        .ok_or_else(bad)?;
    let ok = !rest.is_empty()
        && s.len() <= 255
        && !rest.ends_with('/')
        && !rest.ends_with(".lock")
        && !rest.ends_with('.')
        && !rest.contains("..")
        && !rest.contains("@{")
        && !rest.contains("//")
        && rest.split('/').all(|c| !c.starts_with('.'))
        && rest.bytes().all(|c| c > 0x20 && c != 0x7f && !b"~^:?*[\\".contains(&c));
    if ok {
        Ok(())
    } else {
        Err(bad())
    }
}

/// Keep error messages one line and bounded, whatever was sent.
fn truncate(s: &str) -> String {
    let mut out: String = s.chars().filter(|c| !c.is_control()).take(80).collect();
    if s.chars().count() > 80 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_names() {
        for good in ["a", "web", "my-app-2", &"a".repeat(63)] {
            assert!(AppName::parse(good).is_ok(), "{good}");
        }
        for bad in ["", "A", "1app", "-app", "app_x", "../etc", "a/b", "a%2fb", "app.git", &"a".repeat(64), "a\n", "ä"] {
            assert!(AppName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn config_keys() {
        for good in ["A", "_x", "DATABASE_URL", "a1"] {
            assert!(check_config_key(good).is_ok(), "{good}");
        }
        for bad in ["", "1A", "A-B", "A=B", "A B", "PATH\n", "ключ"] {
            assert!(check_config_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hosts() {
        assert_eq!(parse_host("Example.COM").as_deref(), Ok("example.com"));
        for bad in ["", "-a.com", "a-.com", "a..com", "a_b.com", "a.com/x", &"a".repeat(64), "a b"] {
            assert!(parse_host(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn refs() {
        for good in ["refs/heads/main", "refs/tags/release-1.2", "refs/heads/feature/x"] {
            assert!(check_ref(good).is_ok(), "{good}");
        }
        for bad in ["main", "refs/heads/", "refs/heads/a..b", "refs/heads/.x", "refs/heads/a.lock", "refs/notes/x", "refs/heads/a b", "refs/heads/a~1", "refs/heads/x@{0}"] {
            assert!(check_ref(bad).is_err(), "{bad:?}");
        }
    }
}
