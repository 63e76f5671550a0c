//! A workload, in simulated seconds: sessions, each a list of steps, each
//! step one or more calls sent together (a fan-out) whose answers are
//! awaited together (the join).

/// One call.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    /// The user message (the whole prompt for a trace call).
    pub prompt: String,
    pub max_tokens: u32,
}

/// A step: calls sent at once.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// When to send, seconds: after the previous step's answers (closed
    /// loop), or after the session's start (open loop).
    pub delay: f64,
    pub calls: Vec<Call>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Session {
    pub id: String,
    /// Start, seconds after the run's start.
    pub start: f64,
    pub steps: Vec<Step>,
    /// Whether each step's prompt carries the previous answers as history
    /// (chat and agent workloads) — a trace's prompts are complete already.
    pub carry_history: bool,
}

/// When steps are released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pacing {
    /// Step N+1 goes `delay` after step N's answers.
    Closed,
    /// Step N goes at `start + delay` regardless of answers.
    Open,
}

#[derive(Clone, Debug)]
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

impl PartialEq for Plan {
    fn eq(&self, other: &Self) -> bool {
        self.sessions == other.sessions && self.pacing == other.pacing
    }
}
