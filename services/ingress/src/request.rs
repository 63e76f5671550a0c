//! The request body, parsed once into a JSON object. The ingress reads what
//! it needs (model, stream, the conversation's opening, the session field)
//! and changes only what it must (the engine-side `priority`); when nothing
//! changes, the client's original bytes are forwarded untouched.

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::errors::ApiError;

/// Which OpenAI endpoint a call came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Self::Chat => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
        }
    }
}

#[derive(Debug)]
pub struct CallBody {
    pub endpoint: Endpoint,
    raw: Bytes,
    json: Map<String, Value>,
    pub model: String,
    pub stream: bool,
}

impl CallBody {
    /// Parses and checks a body. Errors are the client's (400).
    pub fn parse(endpoint: Endpoint, raw: Bytes) -> Result<Self, ApiError> {
        let json: Map<String, Value> = match serde_json::from_slice::<Value>(&raw) {
            Ok(Value::Object(map)) => map,
            Ok(_) => {
                return Err(ApiError::bad_request(
                    "invalid_json",
                    "request body must be a JSON object",
                ));
            }
            Err(e) => {
                return Err(ApiError::bad_request(
                    "invalid_json",
                    format!("request body is not valid JSON: {e}"),
                ));
            }
        };
        let model = match json.get("model") {
            Some(Value::String(m)) if !m.is_empty() => m.clone(),
            Some(_) => {
                return Err(ApiError::bad_request(
                    "invalid_value",
                    "`model` must be a non-empty string",
                ));
            }
            None => {
                return Err(ApiError::bad_request(
                    "missing_required_parameter",
                    "`model` is required",
                ));
            }
        };
        match endpoint {
            Endpoint::Chat => match json.get("messages") {
                Some(Value::Array(m)) if !m.is_empty() => {}
                Some(_) => {
                    return Err(ApiError::bad_request(
                        "invalid_value",
                        "`messages` must be a non-empty array",
                    ));
                }
                None => {
                    return Err(ApiError::bad_request(
                        "missing_required_parameter",
                        "`messages` is required",
                    ));
                }
            },
            Endpoint::Completions => match json.get("prompt") {
                Some(Value::String(_)) | Some(Value::Array(_)) => {}
                Some(_) => {
                    return Err(ApiError::bad_request(
                        "invalid_value",
                        "`prompt` must be a string or an array",
                    ));
                }
                None => {
                    return Err(ApiError::bad_request(
                        "missing_required_parameter",
                        "`prompt` is required",
                    ));
                }
            },
        }
        let stream = matches!(json.get("stream"), Some(Value::Bool(true)));
        Ok(Self {
            endpoint,
            raw,
            json,
            model,
            stream,
        })
    }

    pub fn raw_len(&self) -> usize {
        self.raw.len()
    }

    /// A string field of the body (for the session-key field).
    pub fn str_field(&self, name: &str) -> Option<&Value> {
        if name.is_empty() {
            None
        } else {
            self.json.get(name)
        }
    }

    /// The conversation's opening: (system prompt, first user message). For
    /// `/v1/completions`, the first 1,024 bytes of the prompt stand for the
    /// first user message.
    pub fn opening(&self) -> (String, String) {
        match self.endpoint {
            Endpoint::Chat => {
                let mut system = String::new();
                let mut user = String::new();
                if let Some(Value::Array(messages)) = self.json.get("messages") {
                    for m in messages {
                        let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
                        if role == "system" && system.is_empty() {
                            system = content_text(m.get("content"));
                        } else if role == "user" {
                            user = content_text(m.get("content"));
                            break;
                        }
                    }
                }
                (system, user)
            }
            Endpoint::Completions => {
                let p = self.prompt_text();
                let mut end = p.len().min(1024);
                while !p.is_char_boundary(end) {
                    end -= 1;
                }
                (String::new(), p[..end].to_owned())
            }
        }
    }

    /// The prompt as one text, in order (for block hashes and token estimates).
    pub fn prompt_text(&self) -> String {
        match self.endpoint {
            Endpoint::Chat => {
                let mut out = String::new();
                if let Some(Value::Array(messages)) = self.json.get("messages") {
                    for m in messages {
                        out.push_str(m.get("role").and_then(Value::as_str).unwrap_or_default());
                        out.push('\n');
                        out.push_str(&content_text(m.get("content")));
                        out.push('\n');
                    }
                }
                out
            }
            Endpoint::Completions => match self.json.get("prompt") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join("\n"),
                _ => String::new(),
            },
        }
    }

    /// The prompt as engine-sim renders it (`<|role|> content` per chat
    /// message; a completion's prompt as is): for its token-block hashes.
    pub fn sim_prompt_text(&self) -> String {
        match self.endpoint {
            Endpoint::Chat => {
                let mut out = String::new();
                if let Some(Value::Array(messages)) = self.json.get("messages") {
                    for m in messages {
                        let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
                        out.push_str(&format!("<|{role}|> "));
                        out.push_str(&content_text(m.get("content")));
                        out.push('\n');
                    }
                }
                out
            }
            Endpoint::Completions => self.prompt_text(),
        }
    }

    /// The body to send to the engine: the original bytes, or — when the
    /// engine schedules by priority — the body with `priority` set.
    pub fn engine_body(&self, priority: Option<i64>) -> Result<Bytes, ApiError> {
        let Some(p) = priority else {
            return Ok(self.raw.clone());
        };
        let mut json = self.json.clone();
        json.insert("priority".into(), Value::from(p));
        serde_json::to_vec(&json)
            .map(Bytes::from)
            .map_err(|e| ApiError::engine_failed(format!("cannot re-encode the request: {e}")))
    }
}

/// The text of a message's `content`: a string, or the `text` parts of an array.
fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<CallBody, ApiError> {
        CallBody::parse(Endpoint::Chat, Bytes::from(body.to_owned()))
    }

    #[test]
    fn checks_the_body() {
        assert_eq!(
            chat("{").map(|_| ()).map_err(|e| e.code).err(),
            Some("invalid_json")
        );
        assert_eq!(
            chat("[]").map(|_| ()).map_err(|e| e.code).err(),
            Some("invalid_json")
        );
        assert_eq!(
            chat(r#"{"messages":[{"role":"user","content":"x"}]}"#)
                .err()
                .map(|e| e.code),
            Some("missing_required_parameter")
        );
        assert_eq!(
            chat(r#"{"model":"m"}"#).err().map(|e| e.code),
            Some("missing_required_parameter")
        );
        assert_eq!(
            chat(r#"{"model":"m","messages":[]}"#).err().map(|e| e.code),
            Some("invalid_value")
        );
    }

    #[test]
    fn reads_the_opening() {
        let b = chat(
            r#"{"model":"m","stream":true,"messages":[{"role":"system","content":"sys"},{"role":"user","content":[{"type":"text","text":"hi"}]},{"role":"assistant","content":"a"},{"role":"user","content":"more"}]}"#,
        );
        let b = match b {
            Ok(b) => b,
            Err(e) => panic!("{e}"),
        };
        assert!(b.stream);
        assert_eq!(b.opening(), ("sys".to_owned(), "hi".to_owned()));
    }

    #[test]
    fn forwards_untouched_unless_priority() {
        let raw = r#"{"model":"m",  "messages":[{"role":"user","content":"x"}]}"#;
        let b = match chat(raw) {
            Ok(b) => b,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(b.engine_body(None).ok(), Some(Bytes::from(raw)));
        let with = b.engine_body(Some(3)).ok().unwrap_or_default();
        let v: Value = serde_json::from_slice(&with).unwrap_or_default();
        assert_eq!(v["priority"], 3);
        assert_eq!(v["model"], "m");
    }
}
