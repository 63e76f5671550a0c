//! Measuring a call while its answer streams through, and reporting its end.
//!
//! [`TrackedBody`] wraps the engine's response body: frames pass through
//! untouched as they arrive (never buffered whole); on the way it counts SSE
//! events and keeps the last few KiB, where the engine's `usage` sits. When
//! the body ends — or is dropped because the client went away — the
//! [`Tracker`] publishes the call's `Finished` event exactly once.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use serde_json::Value;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tether_protocol::{CallId, EventKind, Finished, Outcome, RequestEvent, now_ms};

use crate::service::App;
use tether_policy::Work;

const TAIL_BYTES: usize = 16 * 1024;

/// What is known of a call once it is routed.
pub struct CallInfo {
    pub call_id: CallId,
    pub session_hash: u64,
    pub session_key: String,
    pub engine: usize,
    pub inherited_cst: f64,
    pub level: u8,
    /// When the call reached the ingress.
    pub arrived: Instant,
    pub stream: bool,
    pub prompt_estimate: u32,
    pub span: tracing::Span,
    /// The API key's tenant, when keys are configured.
    pub tenant: Option<std::sync::Arc<str>>,
}

/// Follows one call from its routing decision to its end. A call that ends
/// before it is dispatched (refused by a full queue, or its client gone while
/// it waited) still reports its end, so that nobody counts it in flight.
pub struct Tracker {
    app: Arc<App>,
    info: Option<CallInfo>,
    /// Set once the call holds an engine slot and was sent.
    dispatched: Option<Instant>,
    /// Time from arrival to dispatch, seconds.
    waited: f64,
    /// The engine slot this call holds; freed when the call ends.
    permit: Option<crate::admission::Permit>,
    tail: Vec<u8>,
    sse_events: u32,
}

impl Tracker {
    /// Starts tracking a routed call.
    pub fn new(app: Arc<App>, info: CallInfo) -> Self {
        Self {
            app,
            info: Some(info),
            dispatched: None,
            waited: 0.0,
            permit: None,
            tail: Vec::new(),
            sse_events: 0,
        }
    }

    /// The call got its engine slot and is sent now: counts it in flight and
    /// publishes its `Dispatched` event.
    ///
    /// Called again when the call is retried on another engine (nothing of
    /// the first attempt reached the client): the new `Dispatched` event, same
    /// call id, moves the session's affinity to the engine that serves it; the
    /// wall time still counts from the first dispatch.
    pub fn dispatch(&mut self, permit: crate::admission::Permit) {
        let Some(info) = &mut self.info else { return };
        let now = Instant::now();
        if self.dispatched.is_some() {
            // A retry: the previous attempt's slot and in-flight count go.
            self.app.in_flight_gauge(info.engine).dec();
        } else {
            self.waited = now.duration_since(info.arrived).as_secs_f64();
            self.dispatched = Some(now);
            self.app
                .metrics
                .queue_wait
                .get_or_create(&crate::metrics::label(
                    "engine",
                    &self.app.fleet.engines[permit.engine()].name,
                ))
                .observe(self.waited);
        }
        // Late binding (or a retry) may have moved the call off the scheduler's engine.
        info.engine = permit.engine();
        let info = &*info;
        self.permit = Some(permit);
        self.app.in_flight_gauge(info.engine).inc();
        let event = RequestEvent {
            call_id: info.call_id,
            session_hash: info.session_hash,
            session_key: info.session_key.clone(),
            at_ms: now_ms(),
            engine: self.app.fleet.engines[info.engine].name.clone(),
            kind: EventKind::Dispatched {
                inherited_cst: info.inherited_cst,
                level: info.level,
            },
        };
        self.app.events.emit(event, info.span.clone());
    }

    /// Gives the engine slot back (the attempt failed; the call will wait
    /// for a slot elsewhere). The call stays counted in flight until it is
    /// dispatched again or ends.
    pub fn release_slot(&mut self) {
        self.permit = None;
    }

    pub fn observe(&mut self, chunk: &[u8]) {
        if self.info.as_ref().is_some_and(|i| i.stream) {
            let before = self.sse_events;
            self.sse_events += count(chunk, b"data: {");
            if let Some(info) = self
                .info
                .as_ref()
                .filter(|_| before == 0 && self.sse_events > 0)
            {
                let ttft = info.arrived.elapsed().as_secs_f64();
                self.app.metrics.time_to_first_token.observe(ttft);
                // The engine runs the call: it is no longer staged there.
                if let Some(p) = self.permit.as_mut() {
                    p.started();
                }
            }
        }
        self.tail.extend_from_slice(chunk);
        if self.tail.len() > 2 * TAIL_BYTES {
            self.tail.drain(..self.tail.len() - TAIL_BYTES);
        }
    }

    /// Reports the call's end (once; later calls do nothing).
    pub fn finish(&mut self, outcome: Outcome) {
        let Some(info) = self.info.take() else { return };
        self.app.programs.leave(info.session_hash);
        self.permit = None;
        let (wall, waited, work) = match self.dispatched {
            Some(at) => {
                self.app.in_flight_gauge(info.engine).dec();
                (at.elapsed().as_secs_f64(), self.waited, self.work(&info))
            }
            // Never sent: all of its time was waiting.
            None => (0.0, info.arrived.elapsed().as_secs_f64(), Work::default()),
        };
        let executed = if self.dispatched.is_some() && (outcome == Outcome::Ok || work.known) {
            self.app.cost.service(&work, wall)
        } else {
            0.0
        };
        let outcome_label = match outcome {
            Outcome::Ok => "ok",
            Outcome::EngineError => "engine_error",
            Outcome::Cancelled => "cancelled",
            Outcome::Refused => "refused",
        };
        self.app
            .metrics
            .calls
            .get_or_create(&crate::metrics::call_labels(
                outcome_label,
                info.tenant.as_deref(),
            ))
            .inc();
        self.app
            .metrics
            .call_seconds
            .observe(info.arrived.elapsed().as_secs_f64());
        if work.known {
            // GenAI semantic conventions, on the ingress's server span.
            use tracing_opentelemetry::OpenTelemetrySpanExt as _;
            let (input, output) = (work.prompt_tokens, work.completion_tokens);
            info.span
                .set_attribute("gen_ai.usage.input_tokens", i64::from(input));
            info.span
                .set_attribute("gen_ai.usage.output_tokens", i64::from(output));
        }
        let event = RequestEvent {
            call_id: info.call_id,
            session_hash: info.session_hash,
            session_key: info.session_key,
            at_ms: now_ms(),
            engine: self.app.fleet.engines[info.engine].name.clone(),
            kind: EventKind::Finished(Finished {
                inherited_cst: info.inherited_cst,
                executed,
                waited,
                wall,
                prompt_tokens: work.prompt_tokens,
                cached_tokens: work.cached_tokens,
                completion_tokens: work.completion_tokens,
                outcome,
            }),
        };
        self.app.events.emit(event, info.span);
    }

    /// The name of the engine the call is on now.
    pub fn engine_name(&self) -> String {
        self.info
            .as_ref()
            .map(|i| self.app.fleet.engines[i.engine].name.clone())
            .unwrap_or_default()
    }

    fn work(&self, info: &CallInfo) -> Work {
        if let Some(w) = usage_in(&self.tail) {
            return w;
        }
        if info.stream && self.sse_events > 0 {
            return Work {
                prompt_tokens: info.prompt_estimate,
                cached_tokens: 0,
                completion_tokens: self.sse_events,
                known: true,
            };
        }
        Work::default()
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        // Dropped before the end: the client went away (or the server stopped).
        self.finish(Outcome::Cancelled);
    }
}

fn count(hay: &[u8], needle: &[u8]) -> u32 {
    if hay.len() < needle.len() {
        return 0;
    }
    let n = hay.windows(needle.len()).filter(|w| *w == needle).count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Finds the last `"usage": {...}` object in `tail` with token counts.
pub fn usage_in(tail: &[u8]) -> Option<Work> {
    let key = b"\"usage\"";
    let mut end = tail.len();
    while let Some(pos) = tail[..end].windows(key.len()).rposition(|w| w == key) {
        end = pos;
        let rest = &tail[pos + key.len()..];
        let rest = rest
            .iter()
            .position(|b| *b == b':')
            .map(|i| &rest[i + 1..])?;
        let mut values = serde_json::Deserializer::from_slice(rest).into_iter::<Value>();
        if let Some(Ok(Value::Object(u))) = values.next() {
            let get = |k: &str| {
                u.get(k)
                    .and_then(Value::as_u64)
                    .and_then(|v| u32::try_from(v).ok())
            };
            if let (Some(p), Some(c)) = (get("prompt_tokens"), get("completion_tokens")) {
                let cached = u
                    .get("prompt_tokens_details")
                    .and_then(|d| d.get("cached_tokens"))
                    .and_then(Value::as_u64)
                    .and_then(|v| u32::try_from(v).ok())
                    .unwrap_or(0);
                return Some(Work {
                    prompt_tokens: p,
                    cached_tokens: cached.min(p),
                    completion_tokens: c,
                    known: true,
                });
            }
        }
    }
    None
}

/// The engine's body with a tracker riding along.
pub struct TrackedBody<B> {
    inner: B,
    tracker: Tracker,
    /// A streamed (SSE) answer: a break is reported in-band.
    stream: bool,
    /// The body has ended (normally, or with the SSE error event).
    done: bool,
}

impl<B> TrackedBody<B> {
    pub fn new(inner: B, tracker: Tracker) -> Self {
        let stream = tracker.info.as_ref().is_some_and(|i| i.stream);
        Self {
            inner,
            tracker,
            stream,
            done: false,
        }
    }
}

/// The SSE event that ends a stream the engine broke off after its first
/// byte: an OpenAI-style error object (no `[DONE]` follows, so clients know
/// the answer is incomplete).
pub fn sse_error_event(engine: &str, err: &str) -> Bytes {
    let body = serde_json::json!({
        "error": {
            "message": format!("engine {engine} broke off the stream: {err}"),
            "type": "engine_error",
            "code": "stream_interrupted",
            "param": null,
        }
    });
    Bytes::from(format!("data: {body}\n\n"))
}

impl<B> Body for TrackedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.tracker.observe(data);
                }
                // A body of known length ends with its last frame: hyper
                // does not poll again, so the end is recorded here.
                if this.inner.is_end_stream() {
                    this.done = true;
                    this.tracker.finish(Outcome::Ok);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let engine = this.tracker.engine_name();
                this.tracker.finish(Outcome::EngineError);
                if this.stream {
                    // The client already has a 200 and part of the answer:
                    // say in-band that it broke, then end cleanly.
                    this.done = true;
                    let event = sse_error_event(&engine, &e.to_string());
                    return Poll::Ready(Some(Ok(Frame::data(event))));
                }
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.tracker.finish(Outcome::Ok);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        // Not the inner body's word: an empty body must still be polled
        // once, so that its end is recorded.
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_usage_in_a_stream_tail() {
        let tail = br#"data: {"choices":[{"delta":{"content":"x"}}],"usage":null}

data: {"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":8}}}

data: [DONE]

"#;
        assert_eq!(
            usage_in(tail),
            Some(Work {
                prompt_tokens: 12,
                cached_tokens: 8,
                completion_tokens: 3,
                known: true
            })
        );
        assert_eq!(usage_in(b"data: {\"usage\":null}"), None);
        assert_eq!(usage_in(b"no usage here"), None);
        assert_eq!(
            count(b"data: {a}\n\ndata: {b}\n\ndata: [DONE]", b"data: {"),
            2
        );
    }
}
