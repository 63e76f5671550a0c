//! Synthetic workloads, seeded and reproducible.
//!
//! - **chat**: sessions arrive as a Poisson process; each has `turns` turns,
//!   each a single call; the prompt grows with the whole history (every
//!   earlier question and answer); think time between turns.
//! - **agent**: sessions arrive the same way; each runs `steps` steps, each
//!   a fan-out of `fanout` parallel calls with different answer lengths,
//!   joined before the next step, whose prompt carries the joined answers —
//!   programs with a critical path, the case ATLAS is for.

use crate::plan::{Call, Pacing, Plan, Session, Step};
use crate::rng::Rng;

#[derive(Clone, Debug)]
pub struct SynthConfig {
    pub sessions: usize,
    /// Session arrivals per second.
    pub rate: f64,
    pub seed: u64,
    /// Words of each new user message.
    pub prompt_words: (u64, u64),
    /// Tokens of each answer.
    pub answer_tokens: (u64, u64),
    /// Seconds between a turn's answer and the next turn (chat).
    pub think: f64,
}

fn words(rng: &mut Rng, session: usize, n: u64) -> String {
    // Distinct per session so sessions do not share prefixes by accident.
    (0..n)
        .map(|_| format!("s{session}w{}", rng.range(0, 4095)))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn chat(c: &SynthConfig, turns: usize) -> Plan {
    let mut rng = Rng::new(c.seed);
    let mut t = 0.0;
    let mut sessions = Vec::with_capacity(c.sessions);
    for s in 0..c.sessions {
        t += rng.exp(1.0 / c.rate.max(1e-9));
        let mut steps = Vec::new();
        for i in 0..turns.max(1) {
            let n = rng.range(c.prompt_words.0, c.prompt_words.1);
            let prompt = words(&mut rng, s, n);
            let max_tokens =
                u32::try_from(rng.range(c.answer_tokens.0, c.answer_tokens.1)).unwrap_or(u32::MAX);
            steps.push(Step {
                delay: if i == 0 { 0.0 } else { c.think },
                calls: vec![Call { prompt, max_tokens }],
            });
        }
        sessions.push(Session {
            id: format!("chat-{s}"),
            start: t,
            steps,
            carry_history: true,
        });
    }
    Plan {
        sessions,
        pacing: Pacing::Closed,
    }
}

pub fn agent(c: &SynthConfig, steps: usize, fanout: usize) -> Plan {
    let mut rng = Rng::new(c.seed);
    let mut t = 0.0;
    let mut sessions = Vec::with_capacity(c.sessions);
    for s in 0..c.sessions {
        t += rng.exp(1.0 / c.rate.max(1e-9));
        // Program lengths are heavy-tailed: a bounded Pareto (α = 1.2) over
        // 1..=steps, so most programs are short and a few are long.
        let n_steps = bounded_pareto(&mut rng, 1.2, steps.max(1));
        let mut plan_steps = Vec::new();
        for _ in 0..n_steps {
            let mut calls = Vec::new();
            for b in 0..fanout.max(1) {
                let n = rng.range(c.prompt_words.0, c.prompt_words.1);
                let prompt = format!("branch {b}: {}", words(&mut rng, s, n));
                let max_tokens = u32::try_from(rng.range(c.answer_tokens.0, c.answer_tokens.1))
                    .unwrap_or(u32::MAX);
                calls.push(Call { prompt, max_tokens });
            }
            plan_steps.push(Step { delay: 0.0, calls });
        }
        sessions.push(Session {
            id: format!("agent-{s}"),
            start: t,
            steps: plan_steps,
            carry_history: true,
        });
    }
    Plan {
        sessions,
        pacing: Pacing::Closed,
    }
}

/// A draw from a Pareto distribution with shape `alpha` and minimum 1,
/// truncated to `1..=max`.
fn bounded_pareto(rng: &mut Rng, alpha: f64, max: usize) -> usize {
    let u = 1.0 - rng.unit();
    let x = u.powf(-1.0 / alpha).floor();
    (x as usize).clamp(1, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SynthConfig {
        SynthConfig {
            sessions: 3,
            rate: 2.0,
            seed: 9,
            prompt_words: (5, 10),
            answer_tokens: (4, 8),
            think: 1.0,
        }
    }

    #[test]
    fn reproducible_shapes() {
        let a = agent(&cfg(), 2, 3);
        assert_eq!(a, agent(&cfg(), 2, 3));
        assert_eq!(a.sessions.len(), 3);
        assert!(
            a.sessions.iter().all(|s| (1..=2).contains(&s.steps.len())
                && s.steps.iter().all(|st| st.calls.len() == 3))
        );
        let mut rng = Rng::new(3);
        let draws: Vec<usize> = (0..10_000)
            .map(|_| bounded_pareto(&mut rng, 1.2, 12))
            .collect();
        assert!(draws.iter().all(|d| (1..=12).contains(d)));
        let short = draws.iter().filter(|d| **d <= 2).count();
        assert!(short > 5_000 && draws.contains(&12), "short {short}");
        let c = chat(&cfg(), 4);
        assert_eq!(c.calls(), 12);
        assert!(c.sessions.windows(2).all(|w| w[0].start <= w[1].start));
    }
}
