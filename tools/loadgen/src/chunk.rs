//! What a streamed chat completion's events say: the first token, the
//! answer, the final usage, `[DONE]`, errors.
//!
//! The first token is the first event whose `choices[].delta` has a
//! non-empty `content` (or `reasoning_content` / `reasoning`, as reasoning
//! models stream their thoughts first); an opening chunk carrying only the
//! role does not count. Usage is the last `usage` object seen (normally the
//! final chunk, with `stream_options.include_usage`).

use serde_json::Value;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// `prompt_tokens_details.cached_tokens`: prompt tokens served from the
    /// engine's prefix cache, where reported.
    pub cached_tokens: u64,
}

impl Usage {
    fn of(u: &Value) -> Self {
        Self {
            prompt_tokens: u["prompt_tokens"].as_u64().unwrap_or(0),
            completion_tokens: u["completion_tokens"].as_u64().unwrap_or(0),
            cached_tokens: u
                .pointer("/prompt_tokens_details/cached_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(0),
        }
    }
}

/// The state of one streamed answer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StreamState {
    /// Seconds after sending when the first token arrived.
    pub first_token: Option<f64>,
    pub answer: String,
    pub usage: Option<Usage>,
    /// `data: [DONE]` seen.
    pub done: bool,
    /// An error object in the stream.
    pub error: Option<String>,
    /// Events that were neither JSON nor `[DONE]`.
    pub unparsed: usize,
}

impl StreamState {
    /// One event's data, received `at` seconds after sending.
    pub fn on_event(&mut self, data: &str, at: f64) {
        let data = data.trim();
        if data == "[DONE]" {
            self.done = true;
            return;
        }
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            self.unparsed += 1;
            return;
        };
        if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
            let msg = e
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| e.to_string(), str::to_owned);
            self.error.get_or_insert(msg);
        }
        for choice in v["choices"].as_array().into_iter().flatten() {
            let delta = &choice["delta"];
            let text = delta["content"].as_str().unwrap_or("");
            let thinking = ["reasoning_content", "reasoning"]
                .iter()
                .any(|k| delta[*k].as_str().is_some_and(|s| !s.is_empty()));
            if self.first_token.is_none() && (!text.is_empty() || thinking) {
                self.first_token = Some(at);
            }
            self.answer.push_str(text);
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(Usage::of(u));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::SseDecoder;

    /// A stream as engine-sim sends it (`include_usage`), split awkwardly.
    const CAPTURED: &[&str] = &[
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"tether-sim\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"tether-sim\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"alpha\"},\"finish_reason\":null}]}\n\ndata: {\"id\":\"chatcmpl-1\",\"object\":\"chat.co",
        "mpletion.chunk\",\"created\":1,\"model\":\"tether-sim\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" beta\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"tether-sim\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" gamma\"},\"finish_reason\":\"length\"}]}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"tether-sim\",\"choices\":[],\"usage\":{\"prompt_tokens\":120,\"completion_tokens\":3,\"total_tokens\":123,\"prompt_tokens_details\":{\"cached_tokens\":64}}}\n\ndata: [DONE]\n\n",
    ];

    #[test]
    fn a_captured_stream() {
        let mut dec = SseDecoder::new();
        let mut st = StreamState::default();
        for (i, piece) in CAPTURED.iter().enumerate() {
            for ev in dec.push(piece.as_bytes()) {
                st.on_event(&ev, i as f64);
            }
            if i == 0 {
                // The role-only opening chunk is not the first token.
                assert_eq!(st.first_token, None);
            }
        }
        assert_eq!(st.first_token, Some(1.0));
        assert_eq!(st.answer, "alpha beta gamma");
        assert_eq!(
            st.usage,
            Some(Usage {
                prompt_tokens: 120,
                completion_tokens: 3,
                cached_tokens: 64
            })
        );
        assert!(st.done);
        assert_eq!((st.error, st.unparsed), (None, 0));
    }

    #[test]
    fn errors_reasoning_and_garbage() {
        let mut st = StreamState::default();
        st.on_event("not json", 0.1);
        st.on_event(
            r#"{"choices":[{"delta":{"reasoning_content":"hmm"}}]}"#,
            0.2,
        );
        st.on_event(r#"{"choices":[{"delta":{"content":"x"}}]}"#, 0.3);
        st.on_event(
            r#"{"error":{"message":"engine stopped","type":"server_error"}}"#,
            0.4,
        );
        assert_eq!(st.unparsed, 1);
        assert_eq!(st.first_token, Some(0.2));
        assert_eq!(st.answer, "x");
        assert_eq!(st.error.as_deref(), Some("engine stopped"));
        assert!(!st.done && st.usage.is_none());
    }
}
