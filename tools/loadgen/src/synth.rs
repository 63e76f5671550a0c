//! Synthetic workloads, seeded and reproducible.
//!
//! - **chat**: sessions arrive as a Poisson process; each has `turns` turns,
//!   each a single call; every request re-sends the whole history (every
//!   earlier question and answer) plus a new message; think time between
//!   an answer and the next turn.
//! - **agent**: sessions arrive the same way; each runs a number of steps,
//!   each a fan-out of `fanout` parallel calls with different prompt and
//!   answer lengths, joined before the next step, whose requests carry the
//!   joined calls and answers — programs with a critical path.
//!
//! Message words are `s<session>w<n>` (n < 4096, random), so no two sessions
//! share a prefix by accident.

use crate::config::{AgentArgs, ChatArgs, StepDist, SynthArgs};
use crate::plan::{Call, Pacing, Plan, Prompt, Session, Step};
use crate::rng::Rng;
use std::sync::Arc;

fn words(rng: &mut Rng, session: usize, n: u64) -> String {
    (0..n)
        .map(|_| format!("s{session}w{}", rng.range(0, 4095)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn answer_tokens(rng: &mut Rng, a: &SynthArgs) -> u32 {
    u32::try_from(rng.range(a.answer_min, a.answer_max).max(1)).unwrap_or(u32::MAX)
}

fn mean_gap(a: &SynthArgs) -> f64 {
    1.0 / a.rate.max(1e-9)
}

pub fn chat(c: &ChatArgs) -> Plan {
    let a = &c.synth;
    let mut rng = Rng::new(a.seed);
    let mut t = 0.0;
    let mut sessions = Vec::with_capacity(a.sessions);
    for s in 0..a.sessions {
        t += rng.exp(mean_gap(a));
        let mut steps = Vec::new();
        for i in 0..c.turns.max(1) {
            let n = rng.range(a.prompt_min, a.prompt_max);
            let prompt = Prompt::Text(words(&mut rng, s, n));
            let max_tokens = answer_tokens(&mut rng, a);
            steps.push(Step {
                delay: if i == 0 { 0.0 } else { c.think_secs.max(0.0) },
                calls: vec![Call {
                    prompt,
                    max_tokens,
                    trace_index: None,
                }],
            });
        }
        sessions.push(Session {
            id: format!("chat-{s}"),
            start: t,
            steps,
            carry_history: true,
            system: None,
        });
    }
    Plan {
        sessions,
        pacing: Pacing::Closed,
    }
}

pub fn agent(c: &AgentArgs) -> Plan {
    let a = &c.synth;
    let mut rng = Rng::new(a.seed);
    // The draws of the optional features (shared system prompts, tool
    // pauses, variable fan-out) come from a second stream, so that with
    // them off the workload is the same as without them.
    let mut extra = Rng::new(a.seed ^ 0x5eed_a9e7_0000_0001);
    let pool: Vec<Arc<str>> = (0..c.system_prompts)
        .map(|k| Arc::from(system_prompt(&mut extra, k, c.system_prompt_words)))
        .collect();
    let fanout_max = c.fanout.max(1);
    let fanout_min = if c.fanout_min == 0 {
        fanout_max
    } else {
        c.fanout_min.min(fanout_max)
    };
    let mut t = 0.0;
    let mut sessions = Vec::with_capacity(a.sessions);
    for s in 0..a.sessions {
        t += rng.exp(mean_gap(a));
        // Drawn in both modes, so that the rest of the workload is the same.
        let pareto = bounded_pareto(&mut rng, c.step_alpha, c.steps.max(1));
        let n_steps = match c.step_dist {
            StepDist::Pareto => pareto,
            StepDist::Fixed => c.steps.max(1),
        };
        let system = if pool.is_empty() {
            None
        } else {
            let k = extra.range(0, pool.len() as u64 - 1) as usize;
            Some(pool[k].clone())
        };
        let mut steps = Vec::new();
        for i in 0..n_steps {
            let fanout = if fanout_min == fanout_max {
                fanout_max
            } else {
                extra.range(fanout_min as u64, fanout_max as u64) as usize
            };
            let mut calls = Vec::new();
            for b in 0..fanout {
                let n = rng.range(a.prompt_min, a.prompt_max);
                let prompt = Prompt::Text(format!("branch {b}: {}", words(&mut rng, s, n)));
                let max_tokens = answer_tokens(&mut rng, a);
                calls.push(Call {
                    prompt,
                    max_tokens,
                    trace_index: None,
                });
            }
            let delay = if i == 0 {
                0.0
            } else {
                c.think_secs.max(0.0) + tool_pause(&mut extra, c)
            };
            steps.push(Step { delay, calls });
        }
        sessions.push(Session {
            id: format!("agent-{s}"),
            start: t,
            steps,
            carry_history: true,
            system,
        });
    }
    Plan {
        sessions,
        pacing: Pacing::Closed,
    }
}

/// A tool call's duration: exponential with mean `--tool-pause-secs`,
/// capped at `--tool-pause-max-secs` (none when the mean is 0).
fn tool_pause(rng: &mut Rng, c: &AgentArgs) -> f64 {
    if c.tool_pause_secs > 0.0 {
        rng.exp(c.tool_pause_secs)
            .min(c.tool_pause_max_secs.max(0.0))
    } else {
        0.0
    }
}

/// Shared system prompt `k`: words `p<k>w<n>` (n < 4096, random), so
/// prompts of the pool differ from each other and from any session's words.
fn system_prompt(rng: &mut Rng, k: usize, n: u64) -> String {
    let mut text = format!("system prompt {k}:");
    for _ in 0..n {
        text.push_str(&format!(" p{k}w{}", rng.range(0, 4095)));
    }
    text
}

/// A draw from a Pareto distribution with shape `alpha` and minimum 1,
/// floored and truncated to `1..=max`.
fn bounded_pareto(rng: &mut Rng, alpha: f64, max: usize) -> usize {
    let u = 1.0 - rng.unit();
    let x = u.powf(-1.0 / alpha.max(1e-3)).floor();
    (x as usize).clamp(1, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synth() -> SynthArgs {
        SynthArgs {
            sessions: 3,
            rate: 2.0,
            seed: 9,
            prompt_min: 5,
            prompt_max: 10,
            answer_min: 4,
            answer_max: 8,
        }
    }

    fn agent_args(step_dist: StepDist) -> AgentArgs {
        AgentArgs {
            synth: synth(),
            steps: 2,
            fanout: 3,
            step_dist,
            ..AgentArgs::default()
        }
    }

    #[test]
    fn agent_shapes_are_reproducible() {
        let a = agent(&agent_args(StepDist::Pareto));
        assert_eq!(a, agent(&agent_args(StepDist::Pareto)));
        assert_eq!(a.sessions.len(), 3);
        assert!(
            a.sessions.iter().all(|s| (1..=2).contains(&s.steps.len())
                && s.steps.iter().all(|st| st.calls.len() == 3))
        );
        let f = agent(&agent_args(StepDist::Fixed));
        assert!(f.sessions.iter().all(|s| s.steps.len() == 2));
        // One random stream: the first session starts the same in both modes.
        assert_eq!(a.sessions[0].start, f.sessions[0].start);
        assert_eq!(a.sessions[0].steps[0], f.sessions[0].steps[0]);
        // Another seed, another workload.
        let mut other = agent_args(StepDist::Fixed);
        other.synth.seed = 10;
        assert_ne!(agent(&other), f);
    }

    #[test]
    fn shared_system_prompts_pauses_and_variable_fanout() {
        let base = agent_args(StepDist::Pareto);
        let plain = agent(&base);
        assert!(plain.sessions.iter().all(|s| s.system.is_none()));
        let mut c = base.clone();
        c.synth.sessions = 40;
        c.steps = 6;
        c.fanout = 4;
        c.fanout_min = 1;
        c.think_secs = 0.5;
        c.tool_pause_secs = 2.0;
        c.tool_pause_max_secs = 5.0;
        c.system_prompts = 3;
        c.system_prompt_words = 50;
        let p = agent(&c);
        assert_eq!(p, agent(&c));
        // A handful of prompts, each shared by many programs, the same text.
        let mut distinct: Vec<&str> = p
            .sessions
            .iter()
            .map(|s| s.system.as_deref().expect("a system prompt"))
            .collect();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 3);
        assert!(distinct.iter().all(|t| t.split_whitespace().count() == 53));
        // Pauses: think time plus a random pause within the cap, varied.
        let delays: Vec<f64> = p
            .sessions
            .iter()
            .flat_map(|s| s.steps.iter().skip(1).map(|st| st.delay))
            .collect();
        assert!(!delays.is_empty());
        assert!(delays.iter().all(|d| (0.5..=5.5).contains(d)));
        assert!(delays.iter().any(|d| *d > 1.0) && delays.iter().any(|d| *d < 5.5));
        assert!(p.sessions.iter().all(|s| s.steps[0].delay == 0.0));
        // Fan-out varies within the bounds.
        let widths: Vec<usize> = p
            .sessions
            .iter()
            .flat_map(|s| s.steps.iter().map(|st| st.calls.len()))
            .collect();
        assert!(widths.iter().all(|w| (1..=4).contains(w)));
        assert!(widths.contains(&1) && widths.contains(&4));
        // The main stream is untouched by the options: same arrivals and
        // the same first call as without them.
        assert_eq!(
            p.sessions[0].start,
            agent(&AgentArgs {
                synth: c.synth.clone(),
                ..base.clone()
            })
            .sessions[0]
                .start
        );
    }

    #[test]
    fn pareto_is_bounded_and_heavy_tailed() {
        let mut rng = Rng::new(3);
        let draws: Vec<usize> = (0..10_000)
            .map(|_| bounded_pareto(&mut rng, 1.2, 12))
            .collect();
        assert!(draws.iter().all(|d| (1..=12).contains(d)));
        let short = draws.iter().filter(|d| **d <= 2).count();
        assert!(short > 5_000 && draws.contains(&12), "short {short}");
    }

    #[test]
    fn chat_shapes() {
        let c = chat(&ChatArgs {
            synth: synth(),
            turns: 4,
            think_secs: 1.5,
        });
        assert_eq!(c.calls(), 12);
        assert!(c.sessions.windows(2).all(|w| w[0].start <= w[1].start));
        for s in &c.sessions {
            assert!(s.carry_history);
            let delays: Vec<f64> = s.steps.iter().map(|st| st.delay).collect();
            assert_eq!(delays, vec![0.0, 1.5, 1.5, 1.5]);
            for st in &s.steps {
                let Prompt::Text(t) = &st.calls[0].prompt else {
                    panic!("text")
                };
                assert!((5..=10).contains(&t.split_whitespace().count()));
                assert!((4..=8).contains(&st.calls[0].max_tokens));
            }
        }
    }
}
