//! The engine as a pure state machine: requests in, steps out, simulated
//! time as data. It schedules like vLLM's V1 scheduler:
//!
//! - **Continuous batching.** Each step serves up to `max_num_seqs` running
//!   sequences within a budget of `max_num_batched_tokens` tokens, shared by
//!   decode (one token per decoding sequence, served first) and chunked
//!   prefill (running sequences still prefilling, then newly admitted ones).
//! - **Step time** = `step_overhead + per_prefill_token · prefilled +
//!   per_decode_seq · decoding + per_context_token · context`, where `context`
//!   is the tokens held by the running sequences.
//! - **Prefix cache.** An admitted prompt's longest cached prefix of full
//!   blocks is not prefilled (at least one token always is, as in vLLM).
//! - **Preemption.** When a running sequence needs a block and none can be
//!   freed, the newest running sequence is preempted: its blocks are
//!   released and it returns to the waiting queue, to be recomputed
//!   (prompt and generated tokens) when readmitted.
//! - **Waiting queue** in FCFS order, or by `priority` (lower first, FIFO
//!   among equals).

use std::collections::HashMap;

use crate::config::{SchedulingPolicy, SimConfig};
use crate::kv::KvCache;
use crate::tokens::{block_hashes, fnv32, word};

pub type SeqId = u64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddError {
    #[error(
        "prompt ({prompt} tokens) plus max_tokens ({max_tokens}) exceeds the model's length of {limit} tokens"
    )]
    TooLong {
        prompt: usize,
        max_tokens: usize,
        limit: usize,
    },
    #[error("request needs {needed} KV blocks; the cache holds {capacity}")]
    TooBig { needed: usize, capacity: usize },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the engine is stopping")]
    Stopped,
}

/// A new request.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub priority: i64,
}

/// What a step produced for one sequence.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// Token number `index` (0-based) of the answer.
    Token {
        seq: SeqId,
        index: usize,
        word: &'static str,
    },
    Finished {
        seq: SeqId,
        usage: Usage,
        timing: Timing,
    },
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
}

/// Simulated-time latencies of a finished request, seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timing {
    pub queue: f64,
    pub ttft: f64,
    pub e2e: f64,
}

/// One step's work.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Step {
    pub duration: f64,
    pub prefill_tokens: usize,
    pub decode_seqs: usize,
    pub context_tokens: usize,
    pub outputs: Vec<Output>,
}

#[derive(Debug)]
struct Seq {
    /// Prompt plus generated tokens so far.
    tokens: Vec<u32>,
    prompt_len: usize,
    max_tokens: usize,
    priority: i64,
    /// Admission order, for FIFO.
    order: u64,
    seed: u64,
    arrival: f64,
    scheduled_at: Option<f64>,
    first_token_at: Option<f64>,
    generated: usize,
    /// Tokens whose KV is computed (prefix hits included).
    computed: usize,
    /// Tokens to compute before the next token can be sampled.
    target: usize,
    /// Hashes of the full blocks of `tokens[..target]`.
    hashes: Vec<u64>,
    /// Shared blocks this sequence pins (a prefix of `hashes`).
    pinned: Vec<u64>,
    private: usize,
    cached_tokens: usize,
    running: bool,
}

impl Seq {
    fn blocks_held(&self) -> usize {
        self.pinned.len() + self.private
    }
}

pub struct Engine {
    cfg: SimConfig,
    now: f64,
    seqs: HashMap<SeqId, Seq>,
    waiting: Vec<SeqId>,
    /// Running sequences, oldest admission first.
    running: Vec<SeqId>,
    kv: KvCache,
    next_id: SeqId,
    next_order: u64,
    pub stats: Stats,
}

/// Counters for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stats {
    pub prefix_queries: u64,
    pub prefix_hits: u64,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub preemptions: u64,
    pub finished: u64,
}

impl Engine {
    pub fn new(cfg: SimConfig) -> Self {
        let blocks = cfg.kv_cache_tokens / cfg.block_size.max(1);
        Self {
            kv: KvCache::new(blocks),
            cfg,
            now: 0.0,
            seqs: HashMap::new(),
            waiting: Vec::new(),
            running: Vec::new(),
            next_id: 1,
            next_order: 0,
            stats: Stats::default(),
        }
    }

    pub fn now(&self) -> f64 {
        self.now
    }

    /// Moves the clock forward while idle (the actor keeps it in step with
    /// scaled wall time, so that arrivals get honest timestamps).
    pub fn advance_to(&mut self, t: f64) {
        self.now = self.now.max(t);
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn kv_usage(&self) -> f64 {
        if self.kv.capacity() == 0 {
            0.0
        } else {
            self.kv.in_use() as f64 / self.kv.capacity() as f64
        }
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    pub fn kv(&self) -> &KvCache {
        &self.kv
    }

    pub fn add(&mut self, req: Request) -> Result<SeqId, AddError> {
        if req.prompt.is_empty() {
            return Err(AddError::EmptyPrompt);
        }
        let total = req.prompt.len() + req.max_tokens;
        if total > self.cfg.max_model_len {
            return Err(AddError::TooLong {
                prompt: req.prompt.len(),
                max_tokens: req.max_tokens,
                limit: self.cfg.max_model_len,
            });
        }
        let needed = total.div_ceil(self.cfg.block_size.max(1));
        if needed > self.kv.capacity() {
            return Err(AddError::TooBig {
                needed,
                capacity: self.kv.capacity(),
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        self.next_order += 1;
        let seed = req.prompt.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, t| {
            (h ^ u64::from(*t)).wrapping_mul(0x100_0000_01b3)
        });
        let target = req.prompt.len();
        let hashes = block_hashes(&req.prompt, self.cfg.block_size);
        self.seqs.insert(
            id,
            Seq {
                prompt_len: req.prompt.len(),
                tokens: req.prompt,
                max_tokens: req.max_tokens.max(1),
                priority: req.priority,
                order: self.next_order,
                seed,
                arrival: self.now,
                scheduled_at: None,
                first_token_at: None,
                generated: 0,
                computed: 0,
                target,
                hashes,
                pinned: Vec::new(),
                private: 0,
                cached_tokens: 0,
                running: false,
            },
        );
        self.waiting.push(id);
        Ok(id)
    }

    /// Drops a request (its client went away); frees its blocks.
    pub fn abort(&mut self, id: SeqId) {
        if let Some(mut s) = self.seqs.remove(&id) {
            self.release(&mut s);
            self.waiting.retain(|w| *w != id);
            self.running.retain(|r| *r != id);
        }
    }

    fn release(&mut self, s: &mut Seq) {
        for h in s.pinned.drain(..) {
            self.kv.unpin(h);
        }
        self.kv.free_private(s.private);
        s.private = 0;
    }

    /// The waiting sequence to admit next.
    fn next_waiting(&self) -> Option<usize> {
        let key = |id: &SeqId| {
            let s = &self.seqs[id];
            let p = if self.cfg.scheduling_policy == SchedulingPolicy::Priority {
                s.priority
            } else {
                0
            };
            (p, s.order)
        };
        self.waiting
            .iter()
            .enumerate()
            .min_by_key(|(_, id)| key(id))
            .map(|(i, _)| i)
    }

    /// Preempts the newest running sequence; returns its id.
    fn preempt_newest(&mut self) -> Option<SeqId> {
        let id = self.running.pop()?;
        if let Some(mut s) = self.seqs.remove(&id) {
            self.release(&mut s);
            s.running = false;
            s.computed = 0;
            s.cached_tokens = 0;
            // Recompute everything known so far, then sample the next token.
            s.target = s.tokens.len();
            s.hashes = block_hashes(&s.tokens, self.cfg.block_size);
            self.seqs.insert(id, s);
            self.waiting.push(id);
            self.stats.preemptions += 1;
        }
        Some(id)
    }

    /// Grows a sequence's blocks to cover `tokens` tokens; false if the
    /// cache cannot make room.
    fn grow(&mut self, id: SeqId, tokens: usize) -> bool {
        let bs = self.cfg.block_size.max(1);
        let Some(s) = self.seqs.get(&id) else {
            return false;
        };
        let need = tokens.div_ceil(bs).saturating_sub(s.blocks_held());
        if need == 0 {
            return true;
        }
        if !self.kv.alloc_private(need) {
            return false;
        }
        if let Some(s) = self.seqs.get_mut(&id) {
            s.private += need;
        }
        true
    }

    /// Like [`Self::grow`], preempting newer sequences while it fails. False
    /// if `id` itself had to be preempted.
    fn grow_or_preempt(&mut self, id: SeqId, tokens: usize) -> bool {
        loop {
            if self.grow(id, tokens) {
                return true;
            }
            match self.preempt_newest() {
                Some(p) if p == id => return false,
                Some(_) => continue,
                None => return false,
            }
        }
    }

    /// Registers the full prompt blocks computed so far as shared cache blocks.
    fn publish_blocks(&mut self, id: SeqId) {
        let bs = self.cfg.block_size.max(1);
        let Some(s) = self.seqs.get_mut(&id) else {
            return;
        };
        let full = (s.computed / bs).min(s.hashes.len());
        while s.pinned.len() < full && s.private > 0 {
            let h = s.hashes[s.pinned.len()];
            self.kv.publish(h);
            s.private -= 1;
            s.pinned.push(h);
        }
    }

    /// Runs one step. None when there is nothing to do.
    pub fn step(&mut self) -> Option<Step> {
        if self.is_idle() {
            return None;
        }
        let mut budget = self.cfg.max_num_batched_tokens.max(1);
        let mut decoding: Vec<SeqId> = Vec::new();
        let mut prefilling: Vec<(SeqId, usize)> = Vec::new();

        // 1. Decode: running sequences whose prefill is done, oldest first.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let (done, len) = match self.seqs.get(&id) {
                Some(s) => (s.computed >= s.target, s.tokens.len()),
                None => (false, 0),
            };
            if done {
                if !self.grow_or_preempt(id, len + 1) {
                    continue; // preempted itself; `running` shrank
                }
                decoding.push(id);
                budget -= 1;
            }
            i += 1;
        }

        // 2. Chunked prefill of running sequences not done yet.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let (remaining, computed) = match self.seqs.get(&id) {
                Some(s) => (s.target.saturating_sub(s.computed), s.computed),
                None => (0, 0),
            };
            if remaining > 0 && !decoding.contains(&id) {
                let chunk = remaining.min(budget);
                if !self.grow_or_preempt(id, computed + chunk) {
                    continue;
                }
                prefilling.push((id, chunk));
                budget -= chunk;
            }
            i += 1;
        }
        // Preemption may have removed sequences planned above.
        decoding.retain(|id| self.running.contains(id));
        prefilling.retain(|(id, _)| self.running.contains(id));

        // 3. Admit waiting sequences.
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs.max(1) {
            let Some(w) = self.next_waiting() else { break };
            let id = self.waiting[w];
            let Some(s) = self.seqs.get(&id) else {
                self.waiting.remove(w);
                continue;
            };
            // Longest cached prefix of full blocks, leaving one token to compute.
            let bs = self.cfg.block_size.max(1);
            let hit = self.kv.cached_prefix(&s.hashes).min((s.target - 1) / bs);
            let hashes: Vec<u64> = s.hashes[..hit].to_vec();
            let target = s.target;
            let fresh = s.generated == 0;
            for h in &hashes {
                self.kv.pin(*h);
            }
            let computed = hit * bs;
            let chunk = (target - computed).min(budget);
            if let Some(s) = self.seqs.get_mut(&id) {
                s.pinned = hashes;
                s.computed = computed;
            }
            if !self.grow(id, computed + chunk) {
                // No room even after evicting everything unpinned: wait.
                if let Some(mut s) = self.seqs.remove(&id) {
                    self.release(&mut s);
                    s.computed = 0;
                    self.seqs.insert(id, s);
                }
                break;
            }
            if fresh {
                self.stats.prefix_queries += target as u64;
                self.stats.prefix_hits += computed as u64;
                self.stats.prompt_tokens += target as u64;
            }
            self.waiting.remove(w);
            self.running.push(id);
            if let Some(s) = self.seqs.get_mut(&id) {
                s.running = true;
                if fresh {
                    s.cached_tokens = computed;
                }
                s.scheduled_at.get_or_insert(self.now);
            }
            prefilling.push((id, chunk));
            budget -= chunk;
        }

        if decoding.is_empty() && prefilling.is_empty() {
            return None;
        }

        // The step's cost.
        let prefill_tokens: usize = prefilling.iter().map(|(_, c)| c).sum();
        let context_tokens: usize = self
            .running
            .iter()
            .filter_map(|id| self.seqs.get(id))
            .map(|s| s.computed)
            .sum();
        let duration = self.cfg.step_overhead
            + self.cfg.per_prefill_token * prefill_tokens as f64
            + self.cfg.per_decode_seq * decoding.len() as f64
            + self.cfg.per_context_token * context_tokens as f64;
        self.now += duration;

        // Outcomes.
        let mut outputs = Vec::new();
        for (id, chunk) in &prefilling {
            if let Some(s) = self.seqs.get_mut(id) {
                s.computed += chunk;
            }
            self.publish_blocks(*id);
            if self.seqs.get(id).is_some_and(|s| s.computed >= s.target) {
                self.sample(*id, &mut outputs);
            }
        }
        for id in &decoding {
            if let Some(s) = self.seqs.get_mut(id) {
                s.computed = s.tokens.len();
                s.target = s.computed;
            }
            self.sample(*id, &mut outputs);
        }
        Some(Step {
            duration,
            prefill_tokens,
            decode_seqs: decoding.len(),
            context_tokens,
            outputs,
        })
    }

    /// Samples the next token of a sequence whose context is computed.
    fn sample(&mut self, id: SeqId, outputs: &mut Vec<Output>) {
        let now = self.now;
        let Some(s) = self.seqs.get_mut(&id) else {
            return;
        };
        let w = word(s.seed, s.generated);
        outputs.push(Output::Token {
            seq: id,
            index: s.generated,
            word: w,
        });
        s.generated += 1;
        s.tokens.push(fnv32(w.as_bytes()));
        s.first_token_at.get_or_insert(now);
        self.stats.generation_tokens += 1;
        if s.generated >= s.max_tokens {
            let usage = Usage {
                prompt_tokens: s.prompt_len,
                completion_tokens: s.generated,
                cached_tokens: s.cached_tokens,
            };
            let timing = Timing {
                queue: s.scheduled_at.unwrap_or(now) - s.arrival,
                ttft: s.first_token_at.unwrap_or(now) - s.arrival,
                e2e: now - s.arrival,
            };
            outputs.push(Output::Finished {
                seq: id,
                usage,
                timing,
            });
            self.stats.finished += 1;
            if let Some(mut s) = self.seqs.remove(&id) {
                self.release(&mut s);
            }
            self.running.retain(|r| *r != id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SimConfig {
        SimConfig {
            step_overhead: 0.01,
            per_prefill_token: 0.001,
            per_decode_seq: 0.002,
            per_context_token: 0.0,
            block_size: 4,
            kv_cache_tokens: 4096,
            max_num_batched_tokens: 64,
            ..SimConfig::default()
        }
    }

    fn prompt(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + salt * 100_000).collect()
    }

    fn run(e: &mut Engine) -> Vec<Output> {
        let mut out = Vec::new();
        while let Some(s) = e.step() {
            out.extend(s.outputs);
        }
        out
    }

    fn finished(out: &[Output], id: SeqId) -> Option<(Usage, Timing)> {
        out.iter().find_map(|o| match o {
            Output::Finished { seq, usage, timing } if *seq == id => Some((*usage, *timing)),
            _ => None,
        })
    }

    #[test]
    fn prefill_only_step_matches_the_model() {
        let mut e = Engine::new(cfg());
        e.add(Request {
            prompt: prompt(40, 1),
            max_tokens: 1,
            priority: 0,
        })
        .ok();
        let s = e.step().unwrap_or_default();
        assert_eq!(s.prefill_tokens, 40);
        assert_eq!(s.decode_seqs, 0);
        assert!((s.duration - (0.01 + 0.001 * 40.0)).abs() < 1e-12);
        assert!(matches!(s.outputs.last(), Some(Output::Finished { .. })));
    }

    #[test]
    fn decode_steps_match_the_model() {
        let mut e = Engine::new(cfg());
        for salt in 0..3 {
            e.add(Request {
                prompt: prompt(8, salt),
                max_tokens: 5,
                priority: 0,
            })
            .ok();
        }
        let first = e.step().unwrap_or_default();
        assert_eq!((first.prefill_tokens, first.decode_seqs), (24, 0));
        let s = e.step().unwrap_or_default();
        assert_eq!((s.prefill_tokens, s.decode_seqs), (0, 3));
        assert!((s.duration - (0.01 + 0.002 * 3.0)).abs() < 1e-12);
        assert_eq!(s.outputs.len(), 3);
    }

    #[test]
    fn chunked_prefill_respects_the_budget() {
        let mut e = Engine::new(cfg());
        e.add(Request {
            prompt: prompt(150, 1),
            max_tokens: 2,
            priority: 0,
        })
        .ok();
        let chunks: Vec<usize> = std::iter::from_fn(|| e.step())
            .map(|s| s.prefill_tokens)
            .collect();
        assert_eq!(chunks, vec![64, 64, 22, 0]);
    }

    #[test]
    fn a_repeated_prompt_prefills_only_its_new_suffix() {
        let mut e = Engine::new(cfg());
        let base = prompt(40, 1);
        let a = e
            .add(Request {
                prompt: base.clone(),
                max_tokens: 1,
                priority: 0,
            })
            .unwrap_or(0);
        let out = run(&mut e);
        assert_eq!(finished(&out, a).map(|(u, _)| u.cached_tokens), Some(0));
        let mut longer = base;
        longer.extend(prompt(10, 2));
        let b = e
            .add(Request {
                prompt: longer,
                max_tokens: 1,
                priority: 0,
            })
            .unwrap_or(0);
        let s = e.step().unwrap_or_default();
        assert_eq!(s.prefill_tokens, 10, "only the new suffix is prefilled");
        let out = s.outputs;
        assert_eq!(finished(&out, b).map(|(u, _)| u.cached_tokens), Some(40));
        assert_eq!(e.stats.prefix_hits, 40);
        assert_eq!(e.stats.prefix_queries, 90);
    }

    #[test]
    fn a_fully_cached_prompt_still_computes_one_token() {
        let mut e = Engine::new(cfg());
        let p = prompt(16, 1);
        e.add(Request {
            prompt: p.clone(),
            max_tokens: 1,
            priority: 0,
        })
        .ok();
        run(&mut e);
        let b = e
            .add(Request {
                prompt: p,
                max_tokens: 1,
                priority: 0,
            })
            .unwrap_or(0);
        let s = e.step().unwrap_or_default();
        assert_eq!(s.prefill_tokens, 4);
        assert_eq!(
            finished(&s.outputs, b).map(|(u, _)| u.cached_tokens),
            Some(12)
        );
    }

    #[test]
    fn eviction_is_least_recently_used() {
        // Room for 6 blocks of 4 tokens.
        let mut e = Engine::new(SimConfig {
            kv_cache_tokens: 24,
            ..cfg()
        });
        let (a, b) = (prompt(8, 1), prompt(8, 2));
        for p in [&a, &b] {
            e.add(Request {
                prompt: p.clone(),
                max_tokens: 1,
                priority: 0,
            })
            .ok();
            run(&mut e);
        }
        // Touch a again so b is the least recently used.
        e.add(Request {
            prompt: a.clone(),
            max_tokens: 1,
            priority: 0,
        })
        .ok();
        run(&mut e);
        // A new prompt needing 4 blocks evicts b's blocks, not a's.
        e.add(Request {
            prompt: prompt(13, 3),
            max_tokens: 1,
            priority: 0,
        })
        .ok();
        run(&mut e);
        let a_hashes = block_hashes(&a, 4);
        let b_hashes = block_hashes(&b, 4);
        assert!(a_hashes.iter().all(|h| e.kv().contains(*h)));
        assert!(b_hashes.iter().any(|h| !e.kv().contains(*h)));
    }

    #[test]
    fn priority_orders_the_waiting_queue() {
        let mut e = Engine::new(SimConfig {
            max_num_seqs: 1,
            scheduling_policy: SchedulingPolicy::Priority,
            ..cfg()
        });
        let low = e
            .add(Request {
                prompt: prompt(4, 1),
                max_tokens: 1,
                priority: 5,
            })
            .unwrap_or(0);
        let high = e
            .add(Request {
                prompt: prompt(4, 2),
                max_tokens: 1,
                priority: 0,
            })
            .unwrap_or(0);
        let high2 = e
            .add(Request {
                prompt: prompt(4, 3),
                max_tokens: 1,
                priority: 0,
            })
            .unwrap_or(0);
        let order: Vec<SeqId> = run(&mut e)
            .into_iter()
            .filter_map(|o| match o {
                Output::Finished { seq, .. } => Some(seq),
                _ => None,
            })
            .collect();
        assert_eq!(order, vec![high, high2, low]);
        // FCFS ignores priority.
        let mut e = Engine::new(SimConfig {
            max_num_seqs: 1,
            ..cfg()
        });
        let a = e
            .add(Request {
                prompt: prompt(4, 1),
                max_tokens: 1,
                priority: 5,
            })
            .unwrap_or(0);
        let b = e
            .add(Request {
                prompt: prompt(4, 2),
                max_tokens: 1,
                priority: 0,
            })
            .unwrap_or(0);
        let order: Vec<SeqId> = run(&mut e)
            .into_iter()
            .filter_map(|o| match o {
                Output::Finished { seq, .. } => Some(seq),
                _ => None,
            })
            .collect();
        assert_eq!(order, vec![a, b]);
    }

    #[test]
    fn the_newest_sequence_is_preempted_when_blocks_run_out() {
        // 4 blocks of 4 tokens; two sequences of 6-token prompts each want 4 blocks by the end.
        let mut e = Engine::new(SimConfig {
            kv_cache_tokens: 16,
            ..cfg()
        });
        let old = e
            .add(Request {
                prompt: prompt(6, 1),
                max_tokens: 8,
                priority: 0,
            })
            .unwrap_or(0);
        let new = e
            .add(Request {
                prompt: prompt(6, 2),
                max_tokens: 8,
                priority: 0,
            })
            .unwrap_or(0);
        let out = run(&mut e);
        assert!(e.stats.preemptions >= 1);
        // Both finish with all their tokens, each token index once.
        for id in [old, new] {
            let idx: Vec<usize> = out
                .iter()
                .filter_map(|o| match o {
                    Output::Token { seq, index, .. } if *seq == id => Some(*index),
                    _ => None,
                })
                .collect();
            assert_eq!(idx, (0..8).collect::<Vec<_>>());
        }
        // The older one finished first: the newer was the one preempted.
        let pos = |id| {
            out.iter()
                .position(|o| matches!(o, Output::Finished { seq, .. } if *seq == id))
        };
        assert!(pos(old) < pos(new));
    }

    #[test]
    fn max_num_seqs_is_respected_and_requests_too_big_are_refused() {
        let mut e = Engine::new(SimConfig {
            max_num_seqs: 2,
            ..cfg()
        });
        for salt in 0..5 {
            e.add(Request {
                prompt: prompt(4, salt),
                max_tokens: 3,
                priority: 0,
            })
            .ok();
        }
        while let Some(_s) = e.step() {
            assert!(e.num_running() <= 2);
        }
        let mut e = Engine::new(SimConfig {
            kv_cache_tokens: 16,
            ..cfg()
        });
        assert!(matches!(
            e.add(Request {
                prompt: prompt(20, 1),
                max_tokens: 1,
                priority: 0
            }),
            Err(AddError::TooBig { .. })
        ));
        assert_eq!(
            e.add(Request {
                prompt: vec![],
                max_tokens: 1,
                priority: 0
            }),
            Err(AddError::EmptyPrompt)
        );
    }
}
