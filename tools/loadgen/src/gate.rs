//! When to stop sending: the request budget (`--max-requests`), and a stop
//! signal raised by the deadline (`--duration-secs`), by the caller (Ctrl-C),
//! or by the budget running out. Stopping ends sleeps at once; calls in
//! flight are not cut.

use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::watch;
use tokio::time::Instant;

#[derive(Debug)]
pub struct Gate {
    /// Calls that may still be sent; `None`: no limit.
    remaining: Option<AtomicUsize>,
    stop: watch::Sender<bool>,
}

impl Gate {
    /// `max_requests` 0: no limit.
    pub fn new(max_requests: usize) -> Self {
        Self {
            remaining: (max_requests > 0).then(|| AtomicUsize::new(max_requests)),
            stop: watch::Sender::new(false),
        }
    }

    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    pub fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    pub async fn until_stopped(&self) {
        let mut rx = self.stop.subscribe();
        // The sender lives in `self`, so this only returns once stopped.
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Takes permission for up to `n` calls; returns how many may be sent.
    /// Taking the last of the budget stops the gate.
    pub fn take(&self, n: usize) -> usize {
        if self.stopped() {
            return 0;
        }
        let Some(remaining) = &self.remaining else {
            return n;
        };
        let prev = remaining
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                Some(r.saturating_sub(n))
            })
            .unwrap_or(0);
        if prev <= n {
            self.stop();
        }
        n.min(prev)
    }

    /// Sleeps until `at`; `false` if stopped before (or by then).
    pub async fn sleep_until(&self, at: Instant) -> bool {
        tokio::select! {
            () = tokio::time::sleep_until(at) => !self.stopped(),
            () = self.until_stopped() => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn budget() {
        let g = Gate::new(5);
        assert_eq!(g.take(2), 2);
        assert!(!g.stopped());
        assert_eq!(g.take(4), 3);
        assert!(g.stopped());
        assert_eq!(g.take(1), 0);
        let unlimited = Gate::new(0);
        assert_eq!(unlimited.take(1000), 1000);
        unlimited.stop();
        assert_eq!(unlimited.take(1), 0);
    }

    #[tokio::test]
    async fn stopping_ends_sleeps() {
        let g = std::sync::Arc::new(Gate::new(0));
        let far = Instant::now() + Duration::from_secs(3600);
        let sleeper = tokio::spawn({
            let g = g.clone();
            async move { g.sleep_until(far).await }
        });
        tokio::task::yield_now().await;
        g.stop();
        assert!(!sleeper.await.unwrap());
        assert!(!g.sleep_until(Instant::now()).await);
    }
}
