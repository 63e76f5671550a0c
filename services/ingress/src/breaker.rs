//! The circuit breaker: an engine whose calls fail several times in a row
//! (connect error, 5xx, or no response headers within the time-to-first-byte
//! timeout) is ejected — taken out of the candidates of new calls — for a
//! cool-down. Once the cool-down has passed the engine is half-open: calls
//! may go to it again, and the first one decides: a success readmits it, a
//! failure ejects it for another cool-down. This catches what the `/health`
//! probe cannot: an engine that answers `/health` but hangs on calls.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Default, Clone, Copy)]
struct State {
    consecutive: u32,
    /// Ejected until then (None: admitted).
    open_until: Option<Instant>,
}

#[derive(Debug)]
pub struct Breaker {
    engines: Vec<Mutex<State>>,
    threshold: u32,
    cooldown: Duration,
}

/// What a recorded failure did to the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Admitted,
    /// The failure ejected the engine (first time, or again after a failed probe).
    Ejected,
}

impl Breaker {
    /// `threshold` consecutive failures eject an engine (0 disables the breaker).
    pub fn new(engines: usize, threshold: u32, cooldown: Duration) -> Self {
        Self {
            engines: (0..engines).map(|_| Mutex::new(State::default())).collect(),
            threshold,
            cooldown,
        }
    }

    fn with<R>(&self, engine: usize, f: impl FnOnce(&mut State) -> R) -> Option<R> {
        let cell = self.engines.get(engine)?;
        let mut s = match cell.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        Some(f(&mut s))
    }

    /// Whether new calls may go to `engine` (admitted, or half-open after its cool-down).
    pub fn allows(&self, engine: usize) -> bool {
        self.allows_at(engine, Instant::now())
    }

    fn allows_at(&self, engine: usize, now: Instant) -> bool {
        self.with(engine, |s| s.open_until.is_none_or(|until| now >= until))
            .unwrap_or(false)
    }

    /// Whether `engine` is ejected (its cool-down not over yet).
    pub fn is_ejected(&self, engine: usize) -> bool {
        !self.allows(engine)
    }

    /// A call on `engine` got its response headers: the engine is admitted.
    pub fn success(&self, engine: usize) {
        self.with(engine, |s| *s = State::default());
    }

    /// A call on `engine` failed before its response headers.
    pub fn failure(&self, engine: usize) -> Verdict {
        self.failure_at(engine, Instant::now())
    }

    fn failure_at(&self, engine: usize, now: Instant) -> Verdict {
        if self.threshold == 0 {
            return Verdict::Admitted;
        }
        let (threshold, cooldown) = (self.threshold, self.cooldown);
        self.with(engine, |s| {
            s.consecutive = s.consecutive.saturating_add(1);
            let half_open = s.open_until.is_some_and(|until| now >= until);
            if s.consecutive >= threshold && (s.open_until.is_none() || half_open) {
                s.open_until = Some(now + cooldown);
                Verdict::Ejected
            } else {
                Verdict::Admitted
            }
        })
        .unwrap_or(Verdict::Admitted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejects_after_consecutive_failures_and_readmits_after_a_good_probe() {
        let b = Breaker::new(2, 3, Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(b.failure_at(0, t0), Verdict::Admitted);
        assert_eq!(b.failure_at(0, t0), Verdict::Admitted);
        // A success in between resets the count.
        b.success(0);
        for _ in 0..2 {
            assert_eq!(b.failure_at(0, t0), Verdict::Admitted);
        }
        assert_eq!(b.failure_at(0, t0), Verdict::Ejected);
        assert!(!b.allows_at(0, t0));
        assert!(b.allows_at(1, t0), "the other engine is untouched");
        // Failures of calls already under way do not extend the ejection.
        assert_eq!(b.failure_at(0, t0), Verdict::Admitted);
        // Half-open after the cool-down: a failed probe ejects again...
        let later = t0 + Duration::from_secs(11);
        assert!(b.allows_at(0, later));
        assert_eq!(b.failure_at(0, later), Verdict::Ejected);
        assert!(!b.allows_at(0, later + Duration::from_secs(1)));
        // ...a good one readmits.
        b.success(0);
        assert!(b.allows_at(0, later));
    }

    #[test]
    fn threshold_zero_disables() {
        let b = Breaker::new(1, 0, Duration::from_secs(10));
        for _ in 0..10 {
            assert_eq!(b.failure(0), Verdict::Admitted);
        }
        assert!(b.allows(0));
        assert!(!b.allows(5), "unknown engines are never allowed");
    }
}
