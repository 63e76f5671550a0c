//! A workload, in simulated seconds: sessions, each a list of steps, each
//! step one or more calls sent together (a fan-out) whose answers are
//! awaited together (the join).

use std::sync::Arc;

use crate::prompt::block_text;

/// The text of a call's new user message, made when the call is sent (a
/// whole trace held as text would take gigabytes).
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    Text(String),
    /// A trace prompt: 512-word blocks from hash ids ([`block_text`]).
    Blocks {
        hash_ids: Vec<u64>,
        words: u64,
    },
}

impl Prompt {
    pub fn render(&self) -> String {
        match self {
            Self::Text(t) => t.clone(),
            Self::Blocks { hash_ids, words } => block_text(hash_ids, *words),
        }
    }
}

/// One call.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    /// The new user message (the whole prompt for a trace call).
    pub prompt: Prompt,
    pub max_tokens: u32,
    /// The request's line in the trace (sorted by timestamp), if any.
    pub trace_index: Option<usize>,
}

/// A step: calls sent at once.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// When to send, simulated seconds: after the previous step's answers
    /// (closed loop), or after the session's start (open loop).
    pub delay: f64,
    pub calls: Vec<Call>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Session {
    pub id: String,
    /// Start, simulated seconds after the run's start.
    pub start: f64,
    pub steps: Vec<Step>,
    /// Whether each step's request carries the earlier steps' messages and
    /// answers (chat, agent); a trace's prompts are complete already.
    pub carry_history: bool,
    /// A system message that opens every request of the session (shared
    /// by the sessions that hold the same `Arc`).
    pub system: Option<Arc<str>>,
}

/// When steps are released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pacing {
    /// Step N+1 goes `delay` after step N's answers.
    Closed,
    /// Step N goes at `start + delay` regardless of answers.
    Open,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub sessions: Vec<Session>,
    pub pacing: Pacing,
}

impl Plan {
    pub fn calls(&self) -> usize {
        self.sessions
            .iter()
            .flat_map(|s| &s.steps)
            .map(|s| s.calls.len())
            .sum()
    }
}
