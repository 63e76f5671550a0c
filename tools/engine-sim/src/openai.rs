//! The OpenAI wire format: parsing a `/v1/chat/completions` or
//! `/v1/completions` body into what the engine needs, and building the
//! response, chunk and error JSON.
//!
//! A chat prompt is its messages in order, each rendered as
//! `<|role|> content` on its own line (content parts' texts joined by a
//! space); a completion prompt is its `prompt` string (an array of strings
//! is joined by newlines). Fields other than those read here are ignored.

use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::config::SimConfig;
use crate::engine::{AddError, Usage};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

impl Kind {
    fn object(self) -> &'static str {
        match self {
            Kind::Chat => "chat.completion",
            Kind::Completion => "text_completion",
        }
    }

    fn chunk_object(self) -> &'static str {
        match self {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        }
    }

    pub fn id_prefix(self) -> &'static str {
        match self {
            Kind::Chat => "chatcmpl",
            Kind::Completion => "cmpl",
        }
    }
}

/// An OpenAI-style error: status, `code` and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code,
            message: message.into(),
        }
    }

    pub fn body(&self) -> Value {
        let kind = if self.status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        };
        json!({"error": {"message": self.message, "type": kind, "code": self.code, "param": null}})
    }
}

impl From<AddError> for ApiError {
    fn from(e: AddError) -> Self {
        match e {
            AddError::TooLong { .. } | AddError::TooBig { .. } => {
                Self::bad_request("context_length_exceeded", e.to_string())
            }
            AddError::EmptyPrompt => Self::bad_request("invalid_value", e.to_string()),
            AddError::Stopped => Self {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "engine_stopped",
                message: e.to_string(),
            },
        }
    }
}

/// A parsed completion request (before tokenisation).
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub kind: Kind,
    pub model: String,
    pub prompt: String,
    /// `None`: not given; the default applies.
    pub max_tokens: Option<usize>,
    pub priority: i64,
    pub stream: bool,
    pub include_usage: bool,
}

impl Completion {
    pub fn parse(kind: Kind, body: &[u8], cfg: &SimConfig) -> Result<Self, ApiError> {
        let req: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid JSON: {e}")))?;
        if !req.is_object() {
            return Err(ApiError::bad_request(
                "invalid_json",
                "the body must be a JSON object",
            ));
        }
        let model = match req.get("model") {
            None | Some(Value::Null) => cfg.default_model().to_owned(),
            Some(Value::String(m)) => m.clone(),
            Some(_) => return Err(invalid("model", "a string")),
        };
        if !cfg.serves(&model) {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                code: "model_not_found",
                message: format!("the model `{model}` does not exist"),
            });
        }
        let prompt = match kind {
            Kind::Chat => chat_prompt(&req)?,
            Kind::Completion => match req.get("prompt") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(a)) if a.iter().all(Value::is_string) => a
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join("\n"),
                _ => {
                    return Err(ApiError::bad_request(
                        "missing_required_parameter",
                        "`prompt` must be a string or an array of strings",
                    ));
                }
            },
        };
        let max_tokens = match req
            .get("max_completion_tokens")
            .filter(|v| !v.is_null())
            .or_else(|| req.get("max_tokens"))
        {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(n) if n >= 1 => Some(usize::try_from(n).unwrap_or(usize::MAX)),
                _ => return Err(invalid("max_tokens", "an integer >= 1")),
            },
        };
        let priority = match req.get("priority") {
            None | Some(Value::Null) => 0,
            Some(v) => v
                .as_i64()
                .ok_or_else(|| invalid("priority", "an integer"))?,
        };
        let flag = |name: &str, v: Option<&Value>| match v {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(ApiError::bad_request(
                "invalid_type",
                format!("`{name}` must be a boolean"),
            )),
        };
        Ok(Self {
            kind,
            model,
            prompt,
            max_tokens,
            priority,
            stream: flag("stream", req.get("stream"))?,
            include_usage: flag(
                "stream_options.include_usage",
                req.pointer("/stream_options/include_usage"),
            )?,
        })
    }
}

fn invalid(field: &str, what: &str) -> ApiError {
    ApiError::bad_request("invalid_value", format!("`{field}` must be {what}"))
}

fn chat_prompt(req: &Value) -> Result<String, ApiError> {
    let Some(messages) = req.get("messages").and_then(Value::as_array) else {
        return Err(ApiError::bad_request(
            "missing_required_parameter",
            "`messages` must be an array",
        ));
    };
    if messages.is_empty() {
        return Err(invalid("messages", "a non-empty array"));
    }
    let mut text = String::new();
    for m in messages {
        let Some(role) = m.get("role").and_then(Value::as_str) else {
            return Err(invalid("messages[].role", "a string"));
        };
        let content = match m.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(" "),
            Some(_) => return Err(invalid("messages[].content", "a string or an array")),
        };
        text.push_str(&format!("<|{role}|> {content}\n"));
    }
    Ok(text)
}

/// What every response and chunk of one request repeats.
#[derive(Debug, Clone)]
pub struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub engine: String,
    pub kind: Kind,
}

pub fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

/// The whole (non-streamed) answer.
pub fn response(meta: &Meta, text: &str, usage: &Usage) -> Value {
    let choice = match meta.kind {
        Kind::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text},
            "logprobs": null, "finish_reason": "length"}),
        Kind::Completion => {
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": "length"})
        }
    };
    json!({
        "id": meta.id,
        "object": meta.kind.object(),
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": meta.engine,
        "choices": [choice],
        "usage": usage_json(usage),
    })
}

fn chunk_json(meta: &Meta, choices: Value) -> Value {
    json!({"id": meta.id, "object": meta.kind.chunk_object(), "created": meta.created,
        "model": meta.model, "system_fingerprint": meta.engine, "choices": choices})
}

/// The chunk carrying token number `index` (words after the first are
/// preceded by a space).
pub fn token_chunk(meta: &Meta, index: usize, word: &str) -> Value {
    let text = if index == 0 {
        word.to_owned()
    } else {
        format!(" {word}")
    };
    let choice = match meta.kind {
        Kind::Chat if index == 0 => json!({"index": 0,
            "delta": {"role": "assistant", "content": text}, "finish_reason": null}),
        Kind::Chat => json!({"index": 0, "delta": {"content": text}, "finish_reason": null}),
        Kind::Completion => json!({"index": 0, "text": text, "finish_reason": null}),
    };
    chunk_json(meta, json!([choice]))
}

/// The chunk after the last token: no new text, the finish reason.
pub fn finish_chunk(meta: &Meta) -> Value {
    let choice = match meta.kind {
        Kind::Chat => json!({"index": 0, "delta": {}, "finish_reason": "length"}),
        Kind::Completion => json!({"index": 0, "text": "", "finish_reason": "length"}),
    };
    chunk_json(meta, json!([choice]))
}

/// The `stream_options.include_usage` chunk: no choices, the usage.
pub fn usage_chunk(meta: &Meta, usage: &Usage) -> Value {
    let mut v = chunk_json(meta, json!([]));
    v["usage"] = usage_json(usage);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(kind: Kind, body: &str) -> Result<Completion, ApiError> {
        Completion::parse(kind, body.as_bytes(), &SimConfig::default())
    }

    #[test]
    fn chat_template_is_deterministic() {
        let c = parse(
            Kind::Chat,
            r#"{"model":"tether-sim","messages":[{"role":"system","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"hi"},{"type":"text","text":"there"}]}],
                "max_tokens":3,"priority":-2,"stream":true,"stream_options":{"include_usage":true},
                "ignore_eos":true,"temperature":0.5}"#,
        )
        .unwrap();
        assert_eq!(c.prompt, "<|system|> be brief\n<|user|> hi there\n");
        assert_eq!(c.max_tokens, Some(3));
        assert_eq!(c.priority, -2);
        assert!(c.stream && c.include_usage);
    }

    #[test]
    fn completion_defaults() {
        let c = parse(Kind::Completion, r#"{"prompt":"a b c"}"#).unwrap();
        assert_eq!(c.model, "tether-sim");
        assert_eq!(c.prompt, "a b c");
        assert_eq!(c.max_tokens, None);
        assert_eq!(c.priority, 0);
        assert!(!c.stream && !c.include_usage);
        let c = parse(
            Kind::Completion,
            r#"{"prompt":"x","max_tokens":9,"max_completion_tokens":4}"#,
        )
        .unwrap();
        assert_eq!(c.max_tokens, Some(4));
    }

    #[test]
    fn bad_requests_are_refused() {
        for (kind, body, code) in [
            (Kind::Chat, "{not json", "invalid_json"),
            (Kind::Chat, "[1]", "invalid_json"),
            (
                Kind::Chat,
                r#"{"model":"tether-sim"}"#,
                "missing_required_parameter",
            ),
            (Kind::Chat, r#"{"messages":[]}"#, "invalid_value"),
            (
                Kind::Chat,
                r#"{"messages":[{"content":"x"}]}"#,
                "invalid_value",
            ),
            (
                Kind::Completion,
                r#"{"prompt":7}"#,
                "missing_required_parameter",
            ),
            (
                Kind::Completion,
                r#"{"prompt":"x","max_tokens":0}"#,
                "invalid_value",
            ),
            (
                Kind::Completion,
                r#"{"prompt":"x","max_tokens":-3}"#,
                "invalid_value",
            ),
            (
                Kind::Completion,
                r#"{"prompt":"x","max_tokens":"5"}"#,
                "invalid_value",
            ),
            (
                Kind::Completion,
                r#"{"prompt":"x","priority":1.5}"#,
                "invalid_value",
            ),
            (
                Kind::Completion,
                r#"{"prompt":"x","stream":"yes"}"#,
                "invalid_type",
            ),
        ] {
            let e = parse(kind, body).unwrap_err();
            assert_eq!(
                (e.status, e.code),
                (StatusCode::BAD_REQUEST, code),
                "{body}"
            );
            assert_eq!(e.body()["error"]["type"], "invalid_request_error");
        }
        let e = parse(Kind::Completion, r#"{"model":"gpt-9","prompt":"x"}"#).unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::NOT_FOUND, "model_not_found")
        );
        let any = SimConfig {
            models: vec![],
            ..SimConfig::default()
        };
        assert!(
            Completion::parse(Kind::Completion, br#"{"model":"gpt-9","prompt":"x"}"#, &any).is_ok()
        );
    }
}
