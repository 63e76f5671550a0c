//! The engines that recently served each session, remembered by this
//! ingress so that its local fallback route (scheduler or NATS unavailable)
//! keeps a session where its cache is. Bounded: two generations of at most
//! `capacity / 2` entries each; when the young one fills, the old one is
//! dropped, so a session seen within the last `capacity / 2` sessions is
//! always remembered.

use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Debug, Default)]
struct Generations {
    young: HashMap<u64, usize>,
    old: HashMap<u64, usize>,
}

#[derive(Debug)]
pub struct RecentAffinity {
    inner: Mutex<Generations>,
    half: usize,
}

impl RecentAffinity {
    /// Remembers up to `capacity` sessions (0 disables).
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Generations::default()),
            half: capacity / 2,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Generations> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The engine that last served `session`, if remembered.
    pub fn get(&self, session: u64) -> Option<usize> {
        if self.half == 0 {
            return None;
        }
        let g = self.lock();
        g.young
            .get(&session)
            .or_else(|| g.old.get(&session))
            .copied()
    }

    /// `engine` served a call of `session`.
    pub fn set(&self, session: u64, engine: usize) {
        if self.half == 0 {
            return;
        }
        let mut g = self.lock();
        if g.young.len() >= self.half && !g.young.contains_key(&session) {
            g.old = std::mem::take(&mut g.young);
        }
        g.young.insert(session, engine);
    }

    /// Sessions remembered now.
    pub fn len(&self) -> usize {
        let g = self.lock();
        g.young.len() + g.old.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_recent_sessions_within_its_bound() {
        let a = RecentAffinity::new(4);
        for s in 0..10u64 {
            a.set(s, s as usize);
            assert!(a.len() <= 4);
            assert_eq!(a.get(s), Some(s as usize));
        }
        // The last two generations' worth survive, older ones are gone.
        assert_eq!(a.get(9), Some(9));
        assert_eq!(a.get(8), Some(8));
        assert_eq!(a.get(0), None);
        // Overwrites keep the latest engine.
        a.set(9, 1);
        assert_eq!(a.get(9), Some(1));
        assert_eq!(RecentAffinity::new(0).get(1), None);
    }
}
