//! The service a call received, in estimated seconds of engine work.
//!
//! A router cannot see the engine's own execution time, and the wall time of
//! a call includes queueing behind *other* sessions, so charging wall time
//! would punish a session for the fleet's load. The ingress therefore
//! measures work done: prompt tokens actually prefilled (minus those the
//! engine reports as served from its prefix cache) and tokens generated,
//! each weighted by a per-token cost:
//!
//! `service = prefill_cost · (prompt − cached) + decode_cost · completion`
//!
//! Token counts come from the engine's `usage`; for a stream without usage
//! the prompt is estimated at 4 bytes a token and each SSE event counts as
//! one generated token. When neither is known (a non-streamed answer without
//! usage), the wall time from dispatch to last byte is the fallback.

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CostModel {
    /// Seconds of engine work per prefilled (uncached) prompt token
    /// (default 0.0001: ≈ 10,000 prefill tokens/s, Llama-3-8B on one H100).
    pub prefill_per_token: f64,
    /// Seconds per generated token (default 0.01: ≈ 100 tokens/s per sequence).
    pub decode_per_token: f64,
}

impl Default for CostModel {
    fn default() -> Self {
        Self {
            prefill_per_token: 0.0001,
            decode_per_token: 0.01,
        }
    }
}

/// What was learned of a call's work.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Work {
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
    pub completion_tokens: u32,
    /// Whether the counts are known (from usage or estimates).
    pub known: bool,
}

impl CostModel {
    /// Prefill seconds that `cached_tokens` of prompt served from cache save.
    pub fn prefill_saving(&self, cached_tokens: f64) -> f64 {
        (self.prefill_per_token * cached_tokens.max(0.0)).max(0.0)
    }

    pub fn service(&self, work: &Work, wall_secs: f64) -> f64 {
        if !work.known {
            return wall_secs.max(0.0);
        }
        let prefilled = f64::from(work.prompt_tokens.saturating_sub(work.cached_tokens));
        self.prefill_per_token * prefilled
            + self.decode_per_token * f64::from(work.completion_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_work_not_waiting() {
        let m = CostModel {
            prefill_per_token: 0.001,
            decode_per_token: 0.01,
        };
        let w = Work {
            prompt_tokens: 1000,
            cached_tokens: 800,
            completion_tokens: 10,
            known: true,
        };
        assert!((m.service(&w, 99.0) - 0.3).abs() < 1e-12);
        assert_eq!(m.service(&Work::default(), 2.5), 2.5);
    }
}
