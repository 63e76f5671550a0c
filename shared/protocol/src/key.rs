//! Session keys.
//!
//! A key comes from a request header, a body field or, when the client sends
//! neither, is derived from the conversation's opening (see [`SessionKey::implicit`]).
//! Keys are bounded in length and may not hold control characters, so they are
//! safe to log, to put in NATS headers and to echo in HTTP headers.

use crate::hash::{fmix64, fnv_start, fnv1a64_update};
use std::fmt;

/// Longest accepted session key, in bytes.
pub const MAX_KEY_LEN: usize = 256;

/// Why a key was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("session key is empty")]
    Empty,
    #[error("session key is {0} bytes long; the limit is {MAX_KEY_LEN}")]
    TooLong(usize),
    #[error("session key contains a control character")]
    ControlCharacter,
}

/// A validated session key and its stable hash.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKey {
    text: String,
    hash: u64,
    implicit: bool,
}

impl SessionKey {
    /// Validates an explicit key sent by the client.
    pub fn explicit(text: &str) -> Result<Self, KeyError> {
        if text.is_empty() {
            return Err(KeyError::Empty);
        }
        if text.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong(text.len()));
        }
        if text.chars().any(char::is_control) {
            return Err(KeyError::ControlCharacter);
        }
        Ok(Self {
            hash: crate::stable_hash(text.as_bytes()),
            text: text.to_owned(),
            implicit: false,
        })
    }

    /// Derives the implicit key of a conversation from its opening: the model,
    /// the system prompt (empty if none) and the first user message. Every turn
    /// of a chat re-sends its history, so every turn derives the same key. Two
    /// conversations with the same opening share a key — and a prompt prefix, so
    /// keeping them on one engine helps its cache.
    ///
    /// The parts are hashed with a 0xFF separator (a byte that never occurs in
    /// UTF-8), and the key reads `implicit-<16 hex digits>`.
    pub fn implicit(model: &str, system: &str, first_user: &str) -> Self {
        let mut h = fnv_start();
        for part in [model, system, first_user] {
            h = fnv1a64_update(h, part.as_bytes());
            h = fnv1a64_update(h, &[0xff]);
        }
        let text = format!("implicit-{:016x}", fmix64(h));
        Self {
            hash: crate::stable_hash(text.as_bytes()),
            text,
            implicit: true,
        }
    }

    /// [`SessionKey::implicit`] keyed with a secret `salt`: the hex digits
    /// are the first 8 bytes of HMAC-SHA-256(salt, model ‖ 0xFF ‖ system ‖
    /// 0xFF ‖ first user message ‖ 0xFF), so nobody without the salt can
    /// compute a conversation's key and probe the session view with it. No
    /// salt (or an empty one): the unkeyed [`SessionKey::implicit`].
    pub fn implicit_keyed(salt: &[u8], model: &str, system: &str, first_user: &str) -> Self {
        if salt.is_empty() {
            return Self::implicit(model, system, first_user);
        }
        let mut msg = Vec::with_capacity(model.len() + system.len() + first_user.len() + 3);
        for part in [model, system, first_user] {
            msg.extend_from_slice(part.as_bytes());
            msg.push(0xff);
        }
        let mac = hmac_sha256(salt, &msg);
        let mut first = [0u8; 8];
        first.copy_from_slice(&mac[..8]);
        let text = format!("implicit-{:016x}", u64::from_be_bytes(first));
        Self {
            hash: crate::stable_hash(text.as_bytes()),
            text,
            implicit: true,
        }
    }

    /// Rebuilds a key from its text without the client-facing checks (for keys
    /// read back from the bus, already validated by their publisher).
    pub fn from_trusted(text: String) -> Self {
        let implicit = text.starts_with("implicit-");
        Self {
            hash: crate::stable_hash(text.as_bytes()),
            text,
            implicit,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn hash(&self) -> u64 {
        self.hash
    }

    pub fn is_implicit(&self) -> bool {
        self.implicit
    }
}

/// SHA-256 of `data`, in lower-case hex (as `sha256sum` prints it).
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// HMAC-SHA-256 (RFC 2104).
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| -> [u8; BLOCK] {
        let mut p = k;
        for b in &mut p {
            *b ^= byte;
        }
        p
    };
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionKey({:?})", self.text)
    }
}

impl fmt::Display for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2 of RFC 4231.
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn keyed_implicit_keys_depend_on_the_salt() {
        let plain = SessionKey::implicit("m", "sys", "hi");
        assert_eq!(SessionKey::implicit_keyed(b"", "m", "sys", "hi"), plain);
        let a = SessionKey::implicit_keyed(b"secret-a", "m", "sys", "hi");
        let b = SessionKey::implicit_keyed(b"secret-b", "m", "sys", "hi");
        assert!(a.is_implicit() && a.as_str().starts_with("implicit-"));
        assert_eq!(a.as_str().len(), plain.as_str().len());
        assert_ne!(a, plain);
        assert_ne!(a, b);
        assert_eq!(a, SessionKey::implicit_keyed(b"secret-a", "m", "sys", "hi"));
        assert_ne!(a, SessionKey::implicit_keyed(b"secret-a", "m", "sys", "ho"));
    }

    #[test]
    fn explicit_keys_are_validated() {
        assert!(SessionKey::explicit("abc").is_ok());
        assert_eq!(SessionKey::explicit(""), Err(KeyError::Empty));
        assert_eq!(
            SessionKey::explicit(&"x".repeat(257)),
            Err(KeyError::TooLong(257))
        );
        assert!(SessionKey::explicit(&"x".repeat(256)).is_ok());
        assert_eq!(
            SessionKey::explicit("a\r\nb"),
            Err(KeyError::ControlCharacter)
        );
        assert_eq!(
            SessionKey::explicit("a\u{7f}"),
            Err(KeyError::ControlCharacter)
        );
    }

    #[test]
    fn implicit_keys_depend_on_the_opening_only() {
        let a = SessionKey::implicit("m", "sys", "hello");
        let b = SessionKey::implicit("m", "sys", "hello");
        assert_eq!(a, b);
        assert!(a.is_implicit());
        assert!(a.as_str().starts_with("implicit-"));
        assert_ne!(a, SessionKey::implicit("m", "sys", "hello!"));
        assert_ne!(a, SessionKey::implicit("m2", "sys", "hello"));
        // The separator keeps part boundaries apart.
        assert_ne!(
            SessionKey::implicit("m", "ab", "c"),
            SessionKey::implicit("m", "a", "bc")
        );
    }
}
