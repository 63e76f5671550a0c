//! Priority: a multi-level queue over the session's attained service.
//!
//! Lower attained service runs first (least-attained-service, non-clairvoyant:
//! no output length is ever needed). The service measure is the session's
//! critical-path service under ATLAS (the default, for programs with parallel
//! calls) or its total attained service under PLAS. The value is mapped to a
//! level by ascending thresholds: level `i` holds services in
//! `[thresholds[i-1], thresholds[i])`, level 0 being the most urgent.
//!
//! Anti-starvation: a session whose `wait / max(service, floor)` has reached
//! `session_starvation_ratio` is promoted to level 0.
//!
//! Whom it orders ([`Ordering`]): by default only *programs* — sessions that
//! the ingress has seen run calls in parallel, or that the client marks as
//! an agent (a program header). A
//! conversation's turn has a person waiting for it and is never pushed back
//! because the conversation is long: it is level 0, FIFO with the others.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PriorityMode {
    /// Critical-path service (Autellix ATLAS).
    #[default]
    Atlas,
    /// Total attained service (Autellix PLAS).
    Plas,
}

/// Which calls the levels order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Ordering {
    /// Programs by attained service; every other call level 0 (default).
    #[default]
    Programs,
    /// Every session by attained service (Autellix as published).
    All,
    /// Everything level 0: first come, first served.
    Fcfs,
}

impl Ordering {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "programs" => Ok(Self::Programs),
            "all" => Ok(Self::All),
            "fcfs" => Ok(Self::Fcfs),
            other => Err(format!("unknown ordering {other:?}: programs, all or fcfs")),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PriorityConfig {
    pub mode: PriorityMode,
    /// Which calls the levels order.
    pub ordering: Ordering,
    /// Ascending level boundaries, estimated seconds of service.
    pub thresholds: Vec<f64>,
    /// β of the session's anti-starvation: promote when the session's
    /// accumulated wait / max(service, floor) ≥ β. Non-positive disables.
    pub session_starvation_ratio: f64,
    /// The service floor in the starvation ratio, seconds.
    pub service_floor: f64,
    /// Seconds of service each prompt token of the call adds to the measure
    /// its level is taken from (0 disables). The prompt is known when the
    /// call arrives, so this stays non-clairvoyant about outputs; it orders a
    /// fresh session's long-prompt call behind its short-prompt peers.
    pub prompt_cost: f64,
}

impl Default for PriorityConfig {
    fn default() -> Self {
        Self {
            mode: PriorityMode::Atlas,
            ordering: Ordering::Programs,
            thresholds: vec![1.0, 4.0, 16.0, 64.0],
            prompt_cost: 0.0,
            session_starvation_ratio: 2.0,
            service_floor: 1.0,
        }
    }
}

/// What the policy needs to know of a session's service.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SessionService {
    /// Critical-path service, seconds.
    pub cst: f64,
    /// Total attained service, seconds.
    pub attained: f64,
    /// Total wait, seconds (including the current wait, if the caller adds it).
    pub wait: f64,
}

/// The queue level of a call with `prompt_tokens` of prompt, of a session
/// that is a program or not (the ingress tells: see the module docs). Under [`Ordering::Programs`] a
/// non-program's call is level 0; else the session's service (plus
/// `prompt_cost · prompt_tokens`) picks the level. Anti-starvation looks at
/// the session's own service only.
pub fn call_level(
    cfg: &PriorityConfig,
    s: &SessionService,
    prompt_tokens: u32,
    program: bool,
) -> u8 {
    match cfg.ordering {
        Ordering::Fcfs => return 0,
        Ordering::Programs if !program => return 0,
        _ => {}
    }
    let service = match cfg.mode {
        PriorityMode::Atlas => s.cst,
        PriorityMode::Plas => s.attained,
    };
    if starving(cfg, service, s.wait) {
        return 0;
    }
    let service = service + cfg.prompt_cost.max(0.0) * f64::from(prompt_tokens);
    let service = if service.is_finite() {
        service.max(0.0)
    } else {
        f64::MAX
    };
    let idx = cfg.thresholds.iter().take_while(|t| service >= **t).count();
    u8::try_from(idx).unwrap_or(u8::MAX)
}

/// Whether a session with this service has waited long enough to be promoted.
pub fn starving(cfg: &PriorityConfig, service: f64, wait: f64) -> bool {
    cfg.session_starvation_ratio > 0.0
        && wait.is_finite()
        && wait
            >= cfg.session_starvation_ratio * service.max(cfg.service_floor).max(f64::MIN_POSITIVE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The level of a program's call without a prompt cost.
    fn level(cfg: &PriorityConfig, s: &SessionService) -> u8 {
        call_level(cfg, s, 0, true)
    }

    fn mode() -> impl Strategy<Value = PriorityMode> {
        prop_oneof![Just(PriorityMode::Atlas), Just(PriorityMode::Plas)]
    }

    proptest! {
        /// More attained service never means a more urgent level (without
        /// starvation in play).
        #[test]
        fn priority_is_monotone_in_service(m in mode(), a in 0.0f64..1e4, b in 0.0f64..1e4) {
            let cfg = PriorityConfig { mode: m, session_starvation_ratio: 0.0, ..PriorityConfig::default() };
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            let s = |v: f64| SessionService { cst: v, attained: v, ..SessionService::default() };
            prop_assert!(level(&cfg, &s(lo)) <= level(&cfg, &s(hi)));
        }

        /// Once anti-starvation applies, the level is the top one, whatever the service.
        #[test]
        fn starvation_puts_a_session_on_top(m in mode(), service in 0.0f64..1e4, extra in 0.0f64..1e4) {
            let cfg = PriorityConfig { mode: m, ..PriorityConfig::default() };
            let wait = cfg.session_starvation_ratio * service.max(cfg.service_floor) + extra;
            let s = SessionService { cst: service, attained: service, wait };
            prop_assert_eq!(level(&cfg, &s), 0);
            // And waiting longer never lowers the level.
            let s2 = SessionService { wait: wait * 2.0, ..s };
            prop_assert!(level(&cfg, &s2) <= level(&cfg, &s));
        }
    }

    fn svc(cst: f64) -> SessionService {
        SessionService {
            cst,
            attained: cst,
            ..SessionService::default()
        }
    }

    #[test]
    fn levels_follow_thresholds() {
        let cfg = PriorityConfig::default();
        assert_eq!(level(&cfg, &svc(0.0)), 0);
        assert_eq!(level(&cfg, &svc(0.99)), 0);
        assert_eq!(level(&cfg, &svc(1.0)), 1);
        assert_eq!(level(&cfg, &svc(20.0)), 3);
        assert_eq!(level(&cfg, &svc(1e9)), 4);
        assert_eq!(level(&cfg, &svc(f64::NAN)), 4);
    }

    #[test]
    fn starving_sessions_are_promoted() {
        let cfg = PriorityConfig::default();
        let s = SessionService {
            cst: 100.0,
            attained: 100.0,
            wait: 199.0,
        };
        assert_eq!(level(&cfg, &s), 4);
        let s = SessionService { wait: 200.0, ..s };
        assert_eq!(level(&cfg, &s), 0);
    }

    #[test]
    fn the_prompt_counts_only_when_asked() {
        let off = PriorityConfig::default();
        let on = PriorityConfig {
            prompt_cost: 0.0001,
            ..PriorityConfig::default()
        };
        let fresh = SessionService::default();
        assert_eq!(call_level(&off, &fresh, 50_000, true), 0);
        assert_eq!(call_level(&on, &fresh, 5_000, true), 0);
        assert_eq!(call_level(&on, &fresh, 15_000, true), 1);
        assert_eq!(call_level(&on, &fresh, 50_000, true), 2);
        // Starvation still promotes a long-prompt call of a waiting session.
        let waited = SessionService {
            wait: 10.0,
            ..fresh
        };
        assert_eq!(call_level(&on, &waited, 50_000, true), 0);
    }

    #[test]
    fn plas_uses_the_sum() {
        let cfg = PriorityConfig {
            mode: PriorityMode::Plas,
            ..PriorityConfig::default()
        };
        let s = SessionService {
            cst: 0.5,
            attained: 30.0,
            ..SessionService::default()
        };
        assert_eq!(level(&cfg, &s), 3);
    }

    #[test]
    fn conversations_are_not_pushed_back_programs_are_ordered() {
        let cfg = PriorityConfig::default();
        // A long conversation is level 0; the same service as a program is ordered.
        let chat = svc(50.0);
        assert_eq!(call_level(&cfg, &chat, 0, false), 0);
        let agent = svc(20.0);
        assert_eq!(call_level(&cfg, &agent, 0, true), 3);
        // Ordering everyone, or no one.
        let all = PriorityConfig {
            ordering: Ordering::All,
            ..PriorityConfig::default()
        };
        assert_eq!(call_level(&all, &chat, 0, false), 3);
        let fcfs = PriorityConfig {
            ordering: Ordering::Fcfs,
            ..PriorityConfig::default()
        };
        assert_eq!(call_level(&fcfs, &agent, 0, true), 0);
    }
}
