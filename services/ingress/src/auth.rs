//! Optional API keys. When keys are configured, every `/v1/...` call needs
//! `Authorization: Bearer <key>`; each key belongs to a tenant. Keys are
//! stored hashed: the configuration lists `tenant:<sha256 of the key, hex>`
//! (`printf %s "$KEY" | sha256sum`), so a leaked file or environment does not
//! leak the keys.
//!
//! A tenant's sessions live in their own namespace: the session key used on
//! the bus is `<tenant>/<key>`, so two tenants never share (or can read) a
//! session, the lifecycle events carry the tenant in their `session_key`,
//! and the session view shows a tenant only its own sessions.

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::errors::ApiError;

/// Why the key configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("API key entry {0:?}: expected tenant:<64 hex digits of the key's SHA-256>")]
    Entry(String),
    #[error(
        "API key entry {0:?}: a tenant name is 1 to 64 of A-Z a-z 0-9 . _ - (no '/' or spaces)"
    )]
    Tenant(String),
}

/// The configured keys: SHA-256 of the key → tenant.
#[derive(Debug, Default)]
pub struct ApiKeys {
    by_hash: HashMap<[u8; 32], Arc<str>>,
}

fn valid_tenant(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn parse_hex(h: &str) -> Option<[u8; 32]> {
    if h.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(h.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl ApiKeys {
    /// Reads the keys from `file` (one entry a line; blank lines and `#`
    /// comments ignored) and `list`. None when neither holds any: the
    /// ingress is then open.
    pub fn load(file: Option<&Path>, list: &[String]) -> Result<Option<Self>, KeysError> {
        let mut entries: Vec<String> = list
            .iter()
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| KeysError::Read {
                path: path.display().to_string(),
                source,
            })?;
            entries.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_owned),
            );
        }
        if entries.is_empty() {
            return Ok(None);
        }
        let mut keys = Self::default();
        for entry in entries {
            let (tenant, hex) = entry
                .split_once(':')
                .ok_or_else(|| KeysError::Entry(redact(&entry)))?;
            let (tenant, hex) = (tenant.trim(), hex.trim().to_ascii_lowercase());
            if !valid_tenant(tenant) {
                return Err(KeysError::Tenant(tenant.to_owned()));
            }
            let hash = parse_hex(&hex).ok_or_else(|| KeysError::Entry(redact(&entry)))?;
            keys.by_hash.insert(hash, Arc::from(tenant));
        }
        Ok(Some(keys))
    }

    /// The tenant of the request's bearer key.
    pub fn tenant(&self, headers: &HeaderMap) -> Result<Arc<str>, ApiError> {
        let key = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                ApiError::unauthorized("an API key is required: Authorization: Bearer <key>")
            })?;
        let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        self.by_hash
            .get(&hash)
            .cloned()
            .ok_or_else(|| ApiError::unauthorized("invalid API key"))
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

/// An entry with its hash cut short, for error messages.
fn redact(entry: &str) -> String {
    entry.chars().take(16).chain("…".chars()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(k: &str) -> String {
        Sha256::digest(k.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn bearer(k: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Ok(v) = format!("Bearer {k}").parse() {
            h.insert(http::header::AUTHORIZATION, v);
        }
        h
    }

    #[test]
    fn keys_map_to_tenants_by_their_hash() {
        let list = vec![
            format!("acme:{}", sha("k1")),
            format!("globex:{}", sha("k2")),
        ];
        let keys = ApiKeys::load(None, &list).ok().flatten();
        let Some(keys) = keys else { panic!("no keys") };
        assert_eq!(keys.tenant(&bearer("k1")).ok().as_deref(), Some("acme"));
        assert_eq!(keys.tenant(&bearer("k2")).ok().as_deref(), Some("globex"));
        assert_eq!(
            keys.tenant(&bearer("k3")).err().map(|e| e.status.as_u16()),
            Some(401)
        );
        assert!(keys.tenant(&HeaderMap::new()).is_err());
        // The hash itself is not a key.
        assert!(keys.tenant(&bearer(&sha("k1"))).is_err());
    }

    #[test]
    fn bad_entries_and_no_entries() {
        assert!(matches!(ApiKeys::load(None, &[]), Ok(None)));
        assert!(ApiKeys::load(None, &["acme:abc".into()]).is_err());
        assert!(ApiKeys::load(None, &[format!("a/b:{}", sha("k"))]).is_err());
        assert!(ApiKeys::load(None, &["no-colon".into()]).is_err());
    }
}
