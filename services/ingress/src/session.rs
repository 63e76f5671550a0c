//! Finding a call's session key: the first configured header present, else
//! the configured body field, else the implicit key of the conversation's
//! opening (see `tether_protocol::SessionKey::implicit`).

use axum::http::HeaderMap;
use serde_json::Value;
use tether_protocol::SessionKey;

use crate::errors::ApiError;
use crate::request::CallBody;

pub fn session_key(
    headers: &HeaderMap,
    names: &[String],
    field: &str,
    body: &CallBody,
) -> Result<SessionKey, ApiError> {
    session_key_salted(headers, names, field, body, b"")
}

/// [`session_key`] with implicit keys keyed by `salt` (see
/// `tether_protocol::SessionKey::implicit_keyed`).
pub fn session_key_salted(
    headers: &HeaderMap,
    names: &[String],
    field: &str,
    body: &CallBody,
    salt: &[u8],
) -> Result<SessionKey, ApiError> {
    for name in names {
        if let Some(v) = headers.get(name.as_str()) {
            let text = v.to_str().map_err(|_| {
                ApiError::bad_request(
                    "invalid_session_key",
                    format!("header {name} is not valid text"),
                )
            })?;
            return SessionKey::explicit(text).map_err(|e| {
                ApiError::bad_request("invalid_session_key", format!("header {name}: {e}"))
            });
        }
    }
    match body.str_field(field) {
        Some(Value::String(s)) => {
            return SessionKey::explicit(s).map_err(|e| {
                ApiError::bad_request("invalid_session_key", format!("field {field}: {e}"))
            });
        }
        Some(Value::Null) | None => {}
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_session_key",
                format!("field {field} must be a string"),
            ));
        }
    }
    let (system, user) = body.opening();
    Ok(SessionKey::implicit_keyed(
        salt,
        &body.model,
        &system,
        &user,
    ))
}

/// The key of `key` in `tenant`'s namespace (`<tenant>/<key>`), as the bus
/// knows it; the key itself without a tenant.
pub fn in_namespace(tenant: Option<&str>, key: SessionKey) -> Result<SessionKey, ApiError> {
    match tenant {
        None => Ok(key),
        Some(t) => SessionKey::explicit(&format!("{t}/{}", key.as_str()))
            .map_err(|e| ApiError::bad_request("invalid_session_key", e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Endpoint;
    use bytes::Bytes;

    fn body(s: &str) -> CallBody {
        match CallBody::parse(Endpoint::Chat, Bytes::from(s.to_owned())) {
            Ok(b) => b,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn header_then_field_then_implicit() {
        let names = vec!["x-a".to_owned(), "x-session-id".to_owned()];
        let b = body(
            r#"{"model":"m","session_id":"from-body","messages":[{"role":"user","content":"hi"}]}"#,
        );
        let mut h = HeaderMap::new();
        h.insert(
            "x-session-id",
            "from-header".parse().unwrap_or_else(|_| unreachable!()),
        );
        assert_eq!(
            session_key(&h, &names, "session_id", &b)
                .ok()
                .map(|k| k.to_string()),
            Some("from-header".into())
        );
        assert_eq!(
            session_key(&HeaderMap::new(), &names, "session_id", &b)
                .ok()
                .map(|k| k.to_string()),
            Some("from-body".into())
        );
        let k = session_key(&HeaderMap::new(), &names, "", &b).ok();
        assert!(k.is_some_and(|k| k.is_implicit()));
    }

    #[test]
    fn over_long_keys_are_refused() {
        let b = body(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#);
        let mut h = HeaderMap::new();
        h.insert(
            "x-session-id",
            "k".repeat(300).parse().unwrap_or_else(|_| unreachable!()),
        );
        let e = session_key(&h, &["x-session-id".to_owned()], "", &b).err();
        assert_eq!(e.map(|e| e.code), Some("invalid_session_key"));
    }
}
