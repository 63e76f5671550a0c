//! The gateway queue with late binding: calls wait here, not in the engines'
//! own queues, and the engine is chosen when capacity frees.
//!
//! Each engine has a limit (see [`crate::capacity`]) of calls the gateway
//! lets run on it at once. A call arrives with the engine the scheduler
//! prefers (the one holding its prefix or its session) and a *bind delay*:
//! the prefill time its cache would save there. It runs at once if its
//! engine has room; else it waits. It is *eligible* for an engine when that
//! engine is its preferred one, or when it has waited its bind delay and the
//! engine is one of its candidates — delay scheduling (Zaharia et al.,
//! EuroSys 2010): a call waits for its cache only as long as the cache is
//! worth. A call without a bind delay goes to any candidate with room at
//! once.
//!
//! Order among the calls eligible for a freed slot: level, then due time,
//! then arrival. A call that has waited `β · max(service, floor)` counts as
//! level 0 (anti-starvation), so it waits at most that long plus the time to
//! drain the level-0 calls due before it.
//!
//! The due time is `arrival + γ · size`, where `size` is the engine work the
//! call brings that is known on arrival (its uncached prefill, seconds) and
//! γ is `size_ratio`. With γ = 0 (the default) calls of a level go in
//! arrival order. With γ > 0 a short call may pass a longer one that
//! arrived less than `γ · (difference in size)` before it: earliest due
//! date first, which favours short calls (mean time to first token) while
//! bounding how far any call can be passed — a call is only ever passed by
//! calls due before it.
//!
//! **Staging.** An engine has room only while it has few calls *staged*:
//! sent and not yet answered with a first token. A call the engine has
//! admitted produces its first token within a step or two of prefill; a
//! call that produces none is waiting in the engine's own queue (seats or
//! KV blocks are full) or behind other prefills. So while an engine has
//! `stage_calls` staged calls, or `stage_tokens` of prefill staged, the
//! gateway sends it nothing more: the engine's queue stays a call or two
//! deep, and the rest wait here, in Tether's order, free to bind late. The
//! signal is the engine's own first token, exact and without a scrape's
//! lag. A call that streams nothing until its end (non-streamed) is not
//! counted as staged: its first byte is its last.
//!
//! **Decode balance** (`decode_balance` > 0). A call's prefill stalls every
//! call decoding on its engine: a step carrying a chunk of prefill takes
//! far longer than a decode-only step. Staging keeps every engine
//! prefilling while anything waits, so the fleet's decode-only steps come
//! only when the whole queue is empty, when few calls are decoding to use
//! them. So an engine holds back a call that fills at least one prefill
//! step (`step_tokens`, the engine's step budget) while another engine that is
//! still prefilling (has staged calls, so it has room again within a step
//! or two) has more than `decode_balance` fewer calls decoding (relative to
//! the engines' limits, when those differ): the call
//! waits for that engine, and the held engine's decoders get decode-only
//! steps. A call is never held once it is starving (the queue's bound), nor
//! by an engine when no other engine is prefilling.
//!
//! Invariant, kept by every operation: no engine with room has an eligible
//! waiter it does not hold. Eligibility grows with time (bind delays run out), so the owner
//! calls [`GateQueue::expire`] when a waiter's bind deadline passes
//! ([`GateQueue::next_deadline`] tells when).
//!
//! Pure: time is an input (`now`, seconds on any monotonic clock); grants
//! are returned, the caller delivers them.

use std::collections::BTreeMap;

/// The queue's knobs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GateConfig {
    /// Most calls waiting per preferred engine; beyond, a call is refused.
    pub max_queue: usize,
    /// β of the queue's anti-starvation: a call waiting
    /// `β · max(service, floor)` is served as level 0 (0 disables).
    pub queue_starvation_ratio: f64,
    /// The service floor of that bound, seconds.
    pub service_floor: f64,
    /// γ of the due time `arrival + γ · size` that orders a level (0: arrival order).
    pub size_ratio: f64,
    /// Most staged calls (sent, no first token yet) per engine before the
    /// gateway holds further calls back (0: no staging bound).
    pub stage_calls: usize,
    /// Most prefill tokens staged per engine (≤ 0: no token bound). An
    /// engine with nothing staged always takes one call, however large.
    pub stage_tokens: f64,
    /// Decoding calls an engine may have beyond a prefilling engine's before
    /// it holds back calls of a step or more of prefill (0: off). See the
    /// module docs.
    pub decode_balance: usize,
    /// The engine's prefill budget per step, tokens: under decode balance,
    /// only calls of at least this much uncached prefill are held.
    pub step_tokens: f64,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            max_queue: 1024,
            queue_starvation_ratio: 2.0,
            service_floor: 1.0,
            size_ratio: 0.0,
            stage_calls: 8,
            stage_tokens: 16384.0,
            decode_balance: 1,
            step_tokens: 8192.0,
        }
    }
}

/// A call asking for a slot.
#[derive(Clone, Debug, PartialEq)]
pub struct Ask {
    /// Queue level, 0 most urgent.
    pub level: u8,
    /// The service behind the level, seconds (for the starvation bound).
    pub service: f64,
    /// Engine work the call brings, known on arrival (its uncached prefill),
    /// seconds: with [`GateConfig::size_ratio`], when it is due.
    pub size: f64,
    /// The engine the scheduler chose.
    pub preferred: usize,
    /// Seconds the call waits for `preferred` before any candidate will do
    /// (`f64::INFINITY`: never moves).
    pub bind_delay: f64,
    /// Engines the call may run on (healthy, serving its model); `preferred`
    /// is always allowed.
    pub candidates: Vec<usize>,
    /// The prefill tokens it stages on its engine until its first token
    /// (its uncached prompt); `None` for a call whose first byte is its last
    /// (not streamed), which is never counted as staged.
    pub stage: Option<f64>,
}

/// The answer to [`GateQueue::offer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// Run now on this engine (its slot is taken).
    Run(usize),
    /// Wait; a later grant names the engine.
    Queued,
    /// The preferred engine's queue is full.
    Full,
}

/// A slot handed to a waiting call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Grant {
    pub id: u64,
    pub engine: usize,
    /// What the call stages there (its ask's `stage`).
    pub stage: Option<f64>,
}

#[derive(Clone, Debug)]
struct Waiter {
    ask: Ask,
    arrived: f64,
    seq: u64,
    /// `arrived + size_ratio · size`: the order within a level.
    due: f64,
    starving_at: f64,
    bind_at: f64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Engine {
    limit: usize,
    in_use: usize,
    waiting: usize,
    staged_calls: usize,
    staged_tokens: f64,
}

/// The queue. See the module docs.
#[derive(Clone, Debug)]
pub struct GateQueue {
    cfg: GateConfig,
    engines: Vec<Engine>,
    waiters: BTreeMap<u64, Waiter>,
    seq: u64,
}

impl GateQueue {
    /// One limit per engine (at least 1 each).
    pub fn new(limits: &[usize], cfg: GateConfig) -> Self {
        Self {
            cfg,
            engines: limits
                .iter()
                .map(|l| Engine {
                    limit: (*l).max(1),
                    ..Engine::default()
                })
                .collect(),
            waiters: BTreeMap::new(),
            seq: 0,
        }
    }

    pub fn engines(&self) -> usize {
        self.engines.len()
    }

    /// (in use, limit, waiting with this engine preferred).
    pub fn usage(&self, engine: usize) -> (usize, usize, usize) {
        self.engines
            .get(engine)
            .map_or((0, 0, 0), |e| (e.in_use, e.limit, e.waiting))
    }

    pub fn waiting(&self) -> usize {
        self.waiters.len()
    }

    pub fn is_waiting(&self, id: u64) -> bool {
        self.waiters.contains_key(&id)
    }

    fn has_room(&self, engine: usize) -> bool {
        self.engines.get(engine).is_some_and(|e| {
            e.in_use < e.limit
                && (self.cfg.stage_calls == 0
                    || e.staged_calls == 0
                    || (e.staged_calls < self.cfg.stage_calls
                        && (self.cfg.stage_tokens <= 0.0
                            || e.staged_tokens < self.cfg.stage_tokens)))
        })
    }

    /// Calls of `engine` past their first token (decoding), as far as the
    /// gateway knows: granted, not ended, no longer staged.
    fn decoding(&self, engine: usize) -> usize {
        self.engines
            .get(engine)
            .map_or(0, |e| e.in_use.saturating_sub(e.staged_calls))
    }

    /// True if `engine` holds back a call staging `stage` tokens (decode
    /// balance; see the module docs).
    fn holds(&self, engine: usize, stage: Option<f64>, starving: bool) -> bool {
        if self.cfg.decode_balance == 0 || starving {
            return false;
        }
        if !stage.is_some_and(|t| t >= self.cfg.step_tokens) {
            return false;
        }
        let Some(me) = self.engines.get(engine) else {
            return false;
        };
        let Some(over) = self.decoding(engine).checked_sub(self.cfg.decode_balance) else {
            return false;
        };
        // Counts are compared relative to each engine's limit, so a larger
        // engine may decode more: `d_i / L_i < (d − B) / L`, which is
        // `d_i + B < d` when limits are equal.
        self.engines.iter().enumerate().any(|(i, e)| {
            i != engine
                && e.staged_calls > 0
                && (self.decoding(i) as u64).saturating_mul(me.limit as u64)
                    < (over as u64).saturating_mul(e.limit as u64)
        })
    }

    /// True if `engine` has room for the waiter `w` and it may go there.
    fn fits(&self, w: &Waiter, engine: usize, now: f64) -> bool {
        Self::eligible(w, engine, now)
            && self.has_room(engine)
            && !self.holds(engine, w.ask.stage, now >= w.starving_at)
    }

    /// (staged calls, staged prefill tokens) of one engine.
    pub fn staged(&self, engine: usize) -> (usize, f64) {
        self.engines
            .get(engine)
            .map_or((0, 0.0), |e| (e.staged_calls, e.staged_tokens))
    }

    /// Takes a slot on `engine` for a call staging `stage`.
    fn occupy(&mut self, engine: usize, stage: Option<f64>) {
        let e = &mut self.engines[engine];
        e.in_use += 1;
        if let Some(t) = stage {
            e.staged_calls += 1;
            e.staged_tokens += if t.is_finite() { t.max(0.0) } else { 0.0 };
        }
    }

    /// Ends the staging of one call of `engine` that staged `stage` tokens.
    fn unstage(&mut self, engine: usize, stage: f64) {
        if let Some(e) = self.engines.get_mut(engine) {
            e.staged_calls = e.staged_calls.saturating_sub(1);
            e.staged_tokens = if e.staged_calls == 0 {
                0.0
            } else {
                (e.staged_tokens
                    - if stage.is_finite() {
                        stage.max(0.0)
                    } else {
                        0.0
                    })
                .max(0.0)
            };
        }
    }

    /// A staged call on `engine` produced its first token (it staged
    /// `stage` tokens): the engine may have room for more.
    pub fn started(&mut self, engine: usize, stage: f64, now: f64) -> Vec<Grant> {
        self.unstage(engine, stage);
        self.refill(engine, now)
    }

    /// After `engine`'s counts changed: fills it, or every engine when decode
    /// balance makes one engine's room depend on the others' counts.
    fn refill(&mut self, engine: usize, now: f64) -> Vec<Grant> {
        if self.cfg.decode_balance > 0 {
            self.expire(now)
        } else {
            self.fill_all(engine, now)
        }
    }

    /// A call arrives: runs now, waits, or is refused. `id` must be unique
    /// among waiting calls. Call [`Self::expire`] first, so that waiters
    /// whose bind delay ran out are served before a newcomer takes a slot.
    pub fn offer(&mut self, id: u64, ask: Ask, now: f64) -> Offer {
        let Some(pref) = self.engines.get(ask.preferred).copied() else {
            return Offer::Full;
        };
        if self.has_room(ask.preferred) && !self.holds(ask.preferred, ask.stage, false) {
            self.occupy(ask.preferred, ask.stage);
            return Offer::Run(ask.preferred);
        }
        if ask.bind_delay <= 0.0
            && let Some(e) = self.roomiest(&ask.candidates, ask.stage)
        {
            self.occupy(e, ask.stage);
            return Offer::Run(e);
        }
        if pref.waiting >= self.cfg.max_queue {
            return Offer::Full;
        }
        self.seq += 1;
        let starving_at = if self.cfg.queue_starvation_ratio > 0.0 {
            now + self.cfg.queue_starvation_ratio * ask.service.max(self.cfg.service_floor)
        } else {
            f64::INFINITY
        };
        let bind_at = now + ask.bind_delay.max(0.0);
        let due = now + self.cfg.size_ratio.max(0.0) * ask.size.max(0.0);
        self.engines[ask.preferred].waiting += 1;
        self.waiters.insert(
            id,
            Waiter {
                arrived: now,
                seq: self.seq,
                // A NaN or infinite size counts as none: arrival order.
                due: if due.is_finite() { due } else { now },
                starving_at: if starving_at.is_nan() {
                    f64::INFINITY
                } else {
                    starving_at
                },
                bind_at: if bind_at.is_nan() {
                    f64::INFINITY
                } else {
                    bind_at
                },
                ask,
            },
        );
        Offer::Queued
    }

    /// The candidate with room (that does not hold a call staging `stage`)
    /// and the fewest staged calls, then the most free slots (ties: lowest
    /// index).
    fn roomiest(&self, candidates: &[usize], stage: Option<f64>) -> Option<usize> {
        candidates
            .iter()
            .copied()
            .filter(|e| self.has_room(*e) && !self.holds(*e, stage, false))
            .max_by_key(|e| {
                let x = self.engines[*e];
                (
                    std::cmp::Reverse(x.staged_calls),
                    x.limit - x.in_use,
                    std::cmp::Reverse(*e),
                )
            })
    }

    /// A waiting call leaves (its client went away). True if it was waiting.
    pub fn cancel(&mut self, id: u64) -> bool {
        match self.waiters.remove(&id) {
            Some(w) => {
                if let Some(e) = self.engines.get_mut(w.ask.preferred) {
                    e.waiting = e.waiting.saturating_sub(1);
                }
                true
            }
            None => false,
        }
    }

    /// A call on `engine` ended: its slot (and its staging, if it was still
    /// staged: `stage` its tokens) goes to the best eligible waiters.
    pub fn release(&mut self, engine: usize, stage: Option<f64>, now: f64) -> Vec<Grant> {
        let Some(e) = self.engines.get_mut(engine) else {
            return Vec::new();
        };
        e.in_use = e.in_use.saturating_sub(1);
        if let Some(t) = stage {
            self.unstage(engine, t);
        }
        self.refill(engine, now)
    }

    /// Fills `engine` while it has room and eligible waiters.
    fn fill_all(&mut self, engine: usize, now: f64) -> Vec<Grant> {
        let mut grants = Vec::new();
        while let Some(g) = self.fill(engine, now) {
            grants.push(g);
        }
        grants
    }

    /// Hands a free slot of `engine` to its best eligible waiter, if any.
    fn fill(&mut self, engine: usize, now: f64) -> Option<Grant> {
        if !self.has_room(engine) {
            return None;
        }
        let id = self
            .waiters
            .iter()
            .filter(|(_, w)| self.fits(w, engine, now))
            .min_by(|(_, a), (_, b)| Self::before(a, b, engine, now))
            .map(|(id, _)| *id)?;
        self.take(id, engine)
    }

    fn take(&mut self, id: u64, engine: usize) -> Option<Grant> {
        let w = self.waiters.remove(&id)?;
        if let Some(p) = self.engines.get_mut(w.ask.preferred) {
            p.waiting = p.waiting.saturating_sub(1);
        }
        self.occupy(engine, w.ask.stage);
        Some(Grant {
            id,
            engine,
            stage: w.ask.stage,
        })
    }

    fn eligible(w: &Waiter, engine: usize, now: f64) -> bool {
        w.ask.preferred == engine || (now >= w.bind_at && w.ask.candidates.contains(&engine))
    }

    /// (effective level, not its preferred engine, due time, arrival
    /// order): lower goes first. Within a level a slot goes to a call that
    /// wants this very engine before one that moves here (its bind delay ran
    /// out elsewhere): a move costs the call its cache, so it takes only a
    /// slot no local call wants — delay scheduling's rule.
    fn before(a: &Waiter, b: &Waiter, engine: usize, now: f64) -> std::cmp::Ordering {
        let key = |w: &Waiter| {
            let level = if now >= w.starving_at { 0 } else { w.ask.level };
            (level, w.ask.preferred != engine)
        };
        key(a)
            .cmp(&key(b))
            .then(a.due.total_cmp(&b.due))
            .then(a.seq.cmp(&b.seq))
    }

    /// Waiters whose bind delay has run out take free slots on any candidate.
    /// Every engine is filled; under decode balance the engines with the
    /// fewest calls decoding choose first.
    pub fn expire(&mut self, now: f64) -> Vec<Grant> {
        let mut order: Vec<usize> = (0..self.engines.len()).collect();
        if self.cfg.decode_balance > 0 {
            order.sort_by_key(|e| self.decoding(*e));
        }
        let mut grants = Vec::new();
        for engine in order {
            grants.extend(self.fill_all(engine, now));
        }
        grants
    }

    /// The earliest future deadline of a waiter, if any: its bind delay
    /// running out, or (with decode balance, which never holds a starving
    /// call) its starving.
    pub fn next_deadline(&self, now: f64) -> Option<f64> {
        let balance = self.cfg.decode_balance > 0;
        self.waiters
            .values()
            .flat_map(|w| {
                [
                    w.bind_at,
                    if balance {
                        w.starving_at
                    } else {
                        f64::INFINITY
                    },
                ]
            })
            .filter(|t| *t > now && t.is_finite())
            .min_by(f64::total_cmp)
    }

    /// Changes an engine's limit; a raised limit hands slots to waiters.
    pub fn set_limit(&mut self, engine: usize, limit: usize, now: f64) -> Vec<Grant> {
        let Some(e) = self.engines.get_mut(engine) else {
            return Vec::new();
        };
        e.limit = limit.max(1);
        self.refill(engine, now)
    }

    /// How long the call `id` has waited, seconds.
    pub fn waited(&self, id: u64, now: f64) -> Option<f64> {
        self.waiters.get(&id).map(|w| now - w.arrived)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn ask(level: u8, preferred: usize, bind_delay: f64, n: usize) -> Ask {
        Ask {
            level,
            service: 0.0,
            size: 0.0,
            preferred,
            bind_delay,
            candidates: (0..n).collect(),
            stage: None,
        }
    }

    /// Releases one call of `engine` that is no longer staged.
    fn rel(q: &mut GateQueue, engine: usize, now: f64) -> Option<Grant> {
        q.release(engine, None, now).into_iter().next()
    }

    fn no_starvation() -> GateConfig {
        GateConfig {
            queue_starvation_ratio: 0.0,
            ..GateConfig::default()
        }
    }

    #[test]
    fn runs_on_its_engine_while_it_has_room() {
        let mut q = GateQueue::new(&[1, 1], no_starvation());
        assert_eq!(q.offer(1, ask(0, 0, 1.0, 2), 0.0), Offer::Run(0));
        // Engine 0 is full; engine 1 has room, but the cache is worth 1 s.
        assert_eq!(q.offer(2, ask(0, 0, 1.0, 2), 0.0), Offer::Queued);
        // Without a cache to wait for, it goes where there is room.
        assert_eq!(q.offer(3, ask(0, 0, 0.0, 2), 0.0), Offer::Run(1));
    }

    #[test]
    fn a_waiting_call_moves_after_its_bind_delay() {
        let mut q = GateQueue::new(&[1, 1], no_starvation());
        assert_eq!(q.offer(1, ask(0, 0, 1.0, 2), 0.0), Offer::Run(0));
        assert_eq!(q.offer(2, ask(0, 0, 1.0, 2), 0.0), Offer::Queued);
        assert_eq!(q.expire(0.5), vec![]);
        assert_eq!(q.next_deadline(0.5), Some(1.0));
        assert_eq!(
            q.expire(1.0),
            vec![Grant {
                id: 2,
                engine: 1,
                stage: None
            }]
        );
        assert_eq!(q.usage(1), (1, 1, 0));
    }

    #[test]
    fn a_freed_slot_goes_to_a_local_call_before_a_moving_one() {
        let mut q = GateQueue::new(&[1, 1], no_starvation());
        assert_eq!(q.offer(1, ask(0, 0, 1.0, 2), 0.0), Offer::Run(0));
        assert_eq!(q.offer(2, ask(0, 1, 1.0, 2), 0.0), Offer::Run(1));
        // A call for engine 0 waits past its delay; then one for engine 1 arrives.
        assert_eq!(q.offer(3, ask(0, 0, 1.0, 2), 0.0), Offer::Queued);
        assert_eq!(q.offer(4, ask(0, 1, 1.0, 2), 1.5), Offer::Queued);
        // Engine 1 frees: its own caller goes first, though it came later.
        assert_eq!(
            rel(&mut q, 1, 2.0),
            Some(Grant {
                id: 4,
                engine: 1,
                stage: None
            })
        );
    }

    #[test]
    fn a_call_whose_engine_frees_in_time_stays() {
        let mut q = GateQueue::new(&[1, 1], no_starvation());
        assert_eq!(q.offer(1, ask(0, 0, 1.0, 2), 0.0), Offer::Run(0));
        assert_eq!(q.offer(2, ask(0, 0, 1.0, 2), 0.0), Offer::Queued);
        assert_eq!(
            rel(&mut q, 0, 0.4),
            Some(Grant {
                id: 2,
                engine: 0,
                stage: None
            })
        );
        assert_eq!(q.expire(2.0), vec![]);
    }

    #[test]
    fn lower_levels_first_then_arrival() {
        let mut q = GateQueue::new(&[1], no_starvation());
        assert_eq!(q.offer(1, ask(0, 0, 1.0, 1), 0.0), Offer::Run(0));
        for (id, level) in [(10, 4u8), (11, 0), (12, 0), (13, 2)] {
            assert_eq!(q.offer(id, ask(level, 0, 1.0, 1), 0.0), Offer::Queued);
        }
        let mut order = Vec::new();
        while let Some(g) = rel(&mut q, 0, 0.0) {
            order.push(g.id);
        }
        assert_eq!(order, vec![11, 12, 13, 10]);
    }

    #[test]
    fn a_starving_call_is_served_as_level_zero() {
        let cfg = GateConfig {
            queue_starvation_ratio: 2.0,
            service_floor: 1.0,
            max_queue: 8,
            size_ratio: 0.0,
            stage_calls: 0,
            stage_tokens: 0.0,
            decode_balance: 0,
            step_tokens: 8192.0,
        };
        let mut q = GateQueue::new(&[1], cfg);
        assert_eq!(q.offer(1, ask(0, 0, 1.0, 1), 0.0), Offer::Run(0));
        let heavy = Ask {
            service: 1.0,
            ..ask(4, 0, 1.0, 1)
        };
        assert_eq!(q.offer(2, heavy, 0.0), Offer::Queued);
        assert_eq!(q.offer(3, ask(1, 0, 1.0, 1), 2.5), Offer::Queued);
        // At 3 s the heavy call has waited 3 ≥ 2·max(1, 1): it goes first.
        assert_eq!(
            rel(&mut q, 0, 3.0),
            Some(Grant {
                id: 2,
                engine: 0,
                stage: None
            })
        );
    }

    #[test]
    fn short_calls_pass_long_ones_only_until_those_are_due() {
        let cfg = GateConfig {
            size_ratio: 4.0,
            ..no_starvation()
        };
        let sized = |size| Ask {
            size,
            ..ask(0, 0, f64::INFINITY, 1)
        };
        let mut q = GateQueue::new(&[1], cfg);
        assert_eq!(q.offer(1, sized(0.0), 0.0), Offer::Run(0));
        // Long: due at 0 + 4·1 = 4. Short at 1: due 1.4, passes it. Short
        // at 3.9: due 4.3, does not.
        assert_eq!(q.offer(2, sized(1.0), 0.0), Offer::Queued);
        assert_eq!(q.offer(3, sized(0.1), 1.0), Offer::Queued);
        assert_eq!(q.offer(4, sized(0.1), 3.9), Offer::Queued);
        let order: Vec<u64> = (0..3)
            .filter_map(|_| rel(&mut q, 0, 5.0).map(|g| g.id))
            .collect();
        assert_eq!(order, vec![3, 2, 4]);
    }

    #[test]
    fn full_queues_refuse_and_cancelled_calls_leave() {
        let cfg = GateConfig {
            max_queue: 1,
            ..no_starvation()
        };
        let mut q = GateQueue::new(&[1], cfg);
        assert_eq!(q.offer(1, ask(0, 0, 1.0, 1), 0.0), Offer::Run(0));
        assert_eq!(q.offer(2, ask(0, 0, 1.0, 1), 0.0), Offer::Queued);
        assert_eq!(q.offer(3, ask(0, 0, 1.0, 1), 0.0), Offer::Full);
        assert!(q.cancel(2));
        assert!(!q.cancel(2));
        assert_eq!(rel(&mut q, 0, 1.0), None);
        assert_eq!(q.usage(0), (0, 1, 0));
    }

    #[test]
    fn raising_a_limit_hands_out_slots() {
        let mut q = GateQueue::new(&[1], no_starvation());
        assert_eq!(q.offer(1, ask(0, 0, 1.0, 1), 0.0), Offer::Run(0));
        assert_eq!(q.offer(2, ask(0, 0, 1.0, 1), 0.0), Offer::Queued);
        assert_eq!(q.offer(3, ask(0, 0, 1.0, 1), 0.0), Offer::Queued);
        assert_eq!(q.set_limit(0, 3, 0.0).len(), 2);
        assert_eq!(q.usage(0), (3, 3, 0));
        // Lowering it takes nothing back; releases stop handing out slots.
        assert!(q.set_limit(0, 1, 0.0).is_empty());
        assert_eq!(rel(&mut q, 0, 0.0), None);
        assert_eq!(q.usage(0), (2, 1, 0));
    }

    #[test]
    fn staged_calls_hold_the_rest_at_the_gateway_until_a_first_token() {
        let cfg = GateConfig {
            stage_calls: 2,
            stage_tokens: 1000.0,
            ..no_starvation()
        };
        let staged = |t: f64| Ask {
            stage: Some(t),
            ..ask(0, 0, f64::INFINITY, 1)
        };
        let mut q = GateQueue::new(&[256], cfg);
        assert_eq!(q.offer(1, staged(100.0), 0.0), Offer::Run(0));
        assert_eq!(q.offer(2, staged(100.0), 0.0), Offer::Run(0));
        // Two staged: the third waits though 254 seats are free.
        assert_eq!(q.offer(3, staged(100.0), 0.0), Offer::Queued);
        assert_eq!(q.staged(0), (2, 200.0));
        // A first token frees staging room: the waiter goes.
        assert_eq!(
            q.started(0, 100.0, 0.1),
            vec![Grant {
                id: 3,
                engine: 0,
                stage: Some(100.0)
            }]
        );
        // Non-streamed calls are never staged, but wait while the engine is.
        let plain = ask(0, 0, f64::INFINITY, 1);
        assert_eq!(q.offer(4, plain.clone(), 0.1), Offer::Queued);
        assert_eq!(
            q.release(0, Some(100.0), 0.2),
            vec![Grant {
                id: 4,
                engine: 0,
                stage: None
            }]
        );
        assert_eq!(q.staged(0), (1, 100.0));
        assert_eq!(q.offer(5, plain, 0.2), Offer::Run(0));
    }

    #[test]
    fn a_large_prefill_stages_alone() {
        let cfg = GateConfig {
            stage_calls: 8,
            stage_tokens: 1000.0,
            ..no_starvation()
        };
        let staged = |t: f64| Ask {
            stage: Some(t),
            ..ask(0, 0, f64::INFINITY, 1)
        };
        let mut q = GateQueue::new(&[256], cfg);
        // An engine with nothing staged takes any call.
        assert_eq!(q.offer(1, staged(5000.0), 0.0), Offer::Run(0));
        assert_eq!(q.offer(2, staged(10.0), 0.0), Offer::Queued);
        assert_eq!(q.started(0, 5000.0, 1.0).len(), 1);
    }

    #[test]
    fn a_call_without_a_cache_to_wait_for_goes_where_least_is_staged() {
        let cfg = GateConfig {
            stage_calls: 4,
            stage_tokens: 0.0,
            decode_balance: 0,
            ..no_starvation()
        };
        let staged = |delay: f64| Ask {
            stage: Some(10.0),
            ..ask(0, 0, delay, 2)
        };
        let mut q = GateQueue::new(&[256, 256], cfg);
        for id in 0..4 {
            assert_eq!(q.offer(id, staged(1.0), 0.0), Offer::Run(0));
        }
        // Engine 0 stages 4: a call with a cache there waits; one without goes to 1.
        assert_eq!(q.offer(10, staged(1.0), 0.0), Offer::Queued);
        assert_eq!(q.offer(11, staged(0.0), 0.0), Offer::Run(1));
        // Its bind delay out, the waiter moves to engine 1.
        assert_eq!(
            q.expire(1.0),
            vec![Grant {
                id: 10,
                engine: 1,
                stage: Some(10.0)
            }]
        );
    }

    fn balanced() -> GateConfig {
        GateConfig {
            stage_calls: 1,
            decode_balance: 2,
            ..no_starvation()
        }
    }

    fn staged_ask(preferred: usize, tokens: f64) -> Ask {
        Ask {
            stage: Some(tokens),
            ..ask(0, preferred, 0.0, 2)
        }
    }

    /// Two engines: four calls decoding on engine 0, one call prefilling
    /// (staged) on engine 1.
    fn four_decoding_one_prefilling(limits: &[usize], cfg: GateConfig) -> GateQueue {
        let mut q = GateQueue::new(limits, cfg);
        for id in 0..4 {
            assert_eq!(q.offer(id, staged_ask(0, 100.0), 0.0), Offer::Run(0));
            assert_eq!(q.started(0, 100.0, 0.0), vec![]);
        }
        assert_eq!(q.offer(10, staged_ask(1, 100.0), 0.0), Offer::Run(1));
        q
    }

    #[test]
    fn a_decode_heavy_engine_holds_a_long_prefill_for_a_prefilling_lighter_one() {
        // Engine 1 has no room (one call staged, the bound).
        let mut q = four_decoding_one_prefilling(&[16, 16], balanced());
        // A call of a full step of prefill waits for engine 1: engine 0 has
        // room, but 4 decoding > 0 + 2.
        assert_eq!(q.offer(11, staged_ask(0, 10_000.0), 0.0), Offer::Queued);
        // A short prefill shares its step with the decoders: not held.
        assert_eq!(q.offer(12, staged_ask(0, 100.0), 0.0), Offer::Run(0));
        assert_eq!(q.started(0, 100.0, 0.1), vec![]);
        // Engine 1's first token: the long call goes there, not to engine 0.
        assert_eq!(
            q.started(1, 100.0, 0.2),
            vec![Grant {
                id: 11,
                engine: 1,
                stage: Some(10_000.0)
            }]
        );
    }

    #[test]
    fn a_held_call_goes_where_it_is_held_once_it_starves() {
        let cfg = GateConfig {
            queue_starvation_ratio: 2.0,
            service_floor: 1.0,
            ..balanced()
        };
        let mut q = four_decoding_one_prefilling(&[16, 16], cfg);
        assert_eq!(q.offer(11, staged_ask(0, 10_000.0), 0.0), Offer::Queued);
        // Engine 1 never answers; the call starves at 2·max(0, 1) s and
        // then engine 0 takes it.
        assert_eq!(q.next_deadline(0.0), Some(2.0));
        assert_eq!(q.expire(1.9), vec![]);
        assert_eq!(
            q.expire(2.0),
            vec![Grant {
                id: 11,
                engine: 0,
                stage: Some(10_000.0)
            }]
        );
    }

    #[test]
    fn a_larger_engine_may_decode_more_before_it_holds() {
        // Engine 0 has twice engine 1's limit: 4 decoding there is as busy
        // as 2 on engine 1, so with 1 decoding on engine 1 it does not hold.
        let mut q = four_decoding_one_prefilling(&[32, 16], balanced());
        assert_eq!(q.started(1, 100.0, 0.0), vec![]);
        assert_eq!(q.offer(11, staged_ask(1, 100.0), 0.0), Offer::Run(1));
        // Engine 1: 1 decoding of 16 is not below (4 − 2) of 32: no hold.
        assert_eq!(q.offer(12, staged_ask(0, 10_000.0), 0.0), Offer::Run(0));
    }

    #[test]
    fn without_decode_balance_the_engine_with_room_takes_the_call() {
        let cfg = GateConfig {
            decode_balance: 0,
            ..balanced()
        };
        let mut q = four_decoding_one_prefilling(&[16, 16], cfg);
        assert_eq!(q.offer(11, staged_ask(0, 10_000.0), 0.0), Offer::Run(0));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Offer {
            level: u8,
            pref: usize,
            delay: u8,
            stage: Option<u8>,
        },
        Release(usize),
        Start(usize),
        Cancel(usize),
        Tick(u8),
        Limit(usize, usize),
    }

    fn op(n: usize) -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..5, 0..n, 0u8..4, proptest::option::of(0u8..200))
                .prop_map(|(level, pref, delay, stage)| Op::Offer { level, pref, delay, stage }),
            3 => (0..n).prop_map(Op::Release),
            2 => (0..n).prop_map(Op::Start),
            1 => (0usize..64).prop_map(Op::Cancel),
            1 => (1u8..20).prop_map(Op::Tick),
            1 => (0..n, 1usize..4).prop_map(|(e, l)| Op::Limit(e, l)),
        ]
    }

    proptest! {
        /// Whatever happens, every call is accounted for exactly once (it
        /// runs, waits, was refused or left), no engine runs more calls than
        /// were granted on it, staging is counted exactly and never exceeds
        /// its bound, and no engine with room has an eligible waiter after
        /// an operation that may fill it.
        #[test]
        fn no_call_is_lost_or_duplicated(
            ops in proptest::collection::vec(op(3), 1..200),
            decode_balance in 0usize..3,
        ) {
            let n = 3;
            let cfg = GateConfig {
                max_queue: 4, queue_starvation_ratio: 2.0, service_floor: 1.0, size_ratio: 0.5,
                stage_calls: 2, stage_tokens: 300.0, decode_balance, step_tokens: 150.0,
            };
            let mut q = GateQueue::new(&[2, 3, 1], cfg);
            let mut now = 0.0;
            let mut next_id = 0u64;
            // Per engine: (call, tokens it still stages).
            let mut running: Vec<Vec<(u64, Option<f64>)>> = vec![Vec::new(); n];
            let mut waiting: HashSet<u64> = HashSet::new();
            let mut done: HashSet<u64> = HashSet::new();
            let place = |g: Grant, waiting: &mut HashSet<u64>, running: &mut Vec<Vec<(u64, Option<f64>)>>| {
                assert!(waiting.remove(&g.id), "granted a call that was not waiting");
                running[g.engine].push((g.id, g.stage));
            };
            for o in ops {
                match o {
                    Op::Offer { level, pref, delay, stage } => {
                        next_id += 1;
                        let stage = stage.map(f64::from);
                        let a = Ask { stage, ..ask(level, pref, f64::from(delay), n) };
                        match q.offer(next_id, a, now) {
                            Offer::Run(e) => running[e].push((next_id, stage)),
                            Offer::Queued => { waiting.insert(next_id); }
                            Offer::Full => { done.insert(next_id); }
                        }
                    }
                    Op::Release(e) => {
                        if let Some((id, staged)) = running[e].pop() {
                            done.insert(id);
                            for g in q.release(e, staged, now) { place(g, &mut waiting, &mut running); }
                        }
                    }
                    Op::Start(e) => {
                        if let Some(c) = running[e].iter_mut().find(|c| c.1.is_some()) {
                            let t = c.1.take().unwrap_or(0.0);
                            for g in q.started(e, t, now) { place(g, &mut waiting, &mut running); }
                        }
                    }
                    Op::Cancel(k) => {
                        if let Some(id) = waiting.iter().copied().nth(k % waiting.len().max(1)) {
                            prop_assert!(q.cancel(id));
                            waiting.remove(&id);
                            done.insert(id);
                        }
                    }
                    Op::Tick(dt) => {
                        now += f64::from(dt) / 4.0;
                        for g in q.expire(now) { place(g, &mut waiting, &mut running); }
                    }
                    Op::Limit(e, l) => {
                        for g in q.set_limit(e, l, now) { place(g, &mut waiting, &mut running); }
                    }
                }
                prop_assert_eq!(q.waiting(), waiting.len());
                for (e, r) in running.iter().enumerate() {
                    prop_assert_eq!(q.usage(e).0, r.len());
                    let staged: Vec<f64> = r.iter().filter_map(|c| c.1).collect();
                    let (calls, tokens) = q.staged(e);
                    prop_assert_eq!(calls, staged.len());
                    prop_assert!((tokens - staged.iter().sum::<f64>()).abs() < 1e-6);
                    prop_assert!(calls <= cfg.stage_calls);
                }
                let total = running.iter().map(Vec::len).sum::<usize>() + waiting.len() + done.len();
                prop_assert_eq!(total as u64, next_id);
                // After expiring, no engine with room has an eligible waiter
                // it does not hold; and an engine holds a call only while
                // another engine is prefilling (it will have room again).
                for g in q.expire(now) { place(g, &mut waiting, &mut running); }
                for e in 0..n {
                    prop_assert!(!q.waiters.values().any(|w| q.fits(w, e, now)));
                    let held = q.has_room(e)
                        && q.waiters.values().any(|w| GateQueue::eligible(w, e, now));
                    if held {
                        prop_assert!((0..n).any(|o| o != e && q.staged(o).0 > 0));
                    }
                }
            }
        }

        /// A waiting call is dispatched before any call that arrived after it
        /// once it is starving — the bound does not depend on how many fresh
        /// calls keep coming.
        #[test]
        fn a_starving_call_is_not_overtaken_by_later_arrivals(
            fresh in 1usize..30, service in 0.0f64..5.0, wait in 0.0f64..20.0
        ) {
            let cfg = GateConfig { max_queue: 1000, queue_starvation_ratio: 2.0, service_floor: 1.0, size_ratio: 0.0, stage_calls: 0, stage_tokens: 0.0, decode_balance: 0, step_tokens: 8192.0 };
            let mut q = GateQueue::new(&[1], cfg);
            prop_assert_eq!(q.offer(0, ask(0, 0, 1.0, 1), 0.0), Offer::Run(0));
            let old = Ask { service, ..ask(4, 0, 1.0, 1) };
            prop_assert_eq!(q.offer(1, old, 0.0), Offer::Queued);
            for i in 0..fresh {
                prop_assert_eq!(q.offer(2 + i as u64, ask(0, 0, 1.0, 1), wait * 0.5), Offer::Queued);
            }
            let g = rel(&mut q, 0, wait);
            let bound = 2.0 * service.max(1.0);
            prop_assert_eq!(g.map(|g| g.id == 1), Some(wait >= bound));
        }

        /// Within a level, calls are granted in order of due time
        /// (`arrival + γ · size`, ties by arrival): no call is ever passed by
        /// one due after it, whatever the sizes and arrival times.
        #[test]
        fn calls_of_a_level_go_in_due_order(
            calls in proptest::collection::vec((0.0f64..10.0, 0.0f64..3.0), 1..40),
            ratio in 0.0f64..8.0,
        ) {
            let cfg = GateConfig { size_ratio: ratio, ..no_starvation() };
            let mut q = GateQueue::new(&[1], cfg);
            prop_assert_eq!(q.offer(0, ask(0, 0, f64::INFINITY, 1), 0.0), Offer::Run(0));
            let mut arrivals: Vec<f64> = calls.iter().map(|c| c.0).collect();
            arrivals.sort_by(f64::total_cmp);
            let mut due = Vec::new();
            for (i, (at, (_, size))) in arrivals.iter().zip(&calls).enumerate() {
                let a = Ask { size: *size, ..ask(0, 0, f64::INFINITY, 1) };
                prop_assert_eq!(q.offer(i as u64 + 1, a, *at), Offer::Queued);
                due.push((at + ratio * size, i as u64 + 1));
            }
            let mut granted = Vec::new();
            while let Some(g) = rel(&mut q, 0, 20.0) {
                granted.push(g.id);
            }
            due.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            prop_assert_eq!(granted, due.iter().map(|d| d.1).collect::<Vec<_>>());
        }
    }
}
