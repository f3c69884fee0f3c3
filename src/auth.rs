//! Credentials: API tokens (stored only as hashes) and what a caller may
//! touch. A [`Principal`] is who a request acts as; admin principals reach
//! every app, scoped ones only their own.

use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::names::AppName;

#[derive(Debug, Clone)]
pub struct Principal {
    /// The token's name (or `local` for the owner-only socket).
    pub name: String,
    /// `None`: admin. `Some(app)`: may act on that app only.
    pub scope: Option<String>,
}

impl Principal {
    pub fn local() -> Principal {
        Principal { name: "local".into(), scope: None }
    }
    pub fn is_admin(&self) -> bool {
        self.scope.is_none()
    }
    pub fn may_access(&self, app: &AppName) -> bool {
        self.scope.as_deref().is_none_or(|s| s == app.as_str())
    }
}

/// A new random token: `slw_` and 64 hex digits (256 bits).
pub fn generate_token() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("slw_{}", hex::encode(bytes))
}

/// Tokens are stored and looked up by their SHA-256; a leaked database
/// does not leak working credentials.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}
