//! The engine as a pure state machine: requests in, steps out, simulated
//! time as data. It schedules like vLLM's V1 scheduler
//! (`Scheduler.schedule` in `vllm/v1/core/sched/scheduler.py`, vLLM v0.33.0,
//! commit 4ba787ec9; see docs/engine-sim.md for the line-by-line mapping):
//!
//! - **Continuous batching.** Each step serves up to `max_num_seqs` running
//!   sequences within a budget of `max_num_batched_tokens` tokens: first the
//!   running sequences in admission order (one token for a decoding one, the
//!   next chunk for one still prefilling), then newly admitted ones.
//! - **Step time** = `step_overhead + per_prefill_token · prefilled +
//!   per_decode_seq · decoding + per_context_token · context`, where
//!   `context` is the tokens of KV the step's sequences attend to.
//! - **Prefix cache.** Every full computed block, prompt or generated, is
//!   hashed and cached. An admitted sequence's longest cached prefix of full
//!   blocks is not computed (at least one token always is, as in vLLM).
//! - **Preemption.** When a running sequence needs a block and none can be
//!   freed, a running sequence is preempted — the last in the running list
//!   under FCFS, the largest `(priority, arrival)` under `priority`, as
//!   vLLM picks: its blocks are released (its full ones stay cached) and it
//!   returns to the waiting queue, to be recomputed (prompt and generated
//!   tokens, less what is still cached) when readmitted. A step that
//!   preempted admits nobody new.
//! - **Waiting queue** in FCFS order, or by `priority` (lower first, FIFO
//!   among equals). A preempted sequence keeps its place (its arrival
//!   order), so it is readmitted before anything that arrived after it. The
//!   head is admitted only if a seat is free and the KV blocks of its whole
//!   sequence fit (vLLM's `scheduler_reserve_full_isl`); otherwise nobody
//!   is admitted. Admission never preempts: a waiting sequence, whatever its
//!   priority, waits for a seat or for blocks to free up.
//!
//! Every sequence keeps one invariant: `target` is the number of its tokens
//! that must be computed before it can sample its next one. A decoding
//! sequence is one token short of its target; a prefilling one is more.

use std::collections::{HashMap, HashSet};

use crate::config::{SchedulingPolicy, SimConfig};
use crate::kv::KvCache;
use crate::tokens::{block_hashes, extend_block_hashes, fnv32, word};

pub type SeqId = u64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddError {
    #[error(
        "this model's maximum context length is {limit} tokens; the prompt ({prompt} tokens) plus max_tokens ({max_tokens}) exceeds it"
    )]
    TooLong {
        prompt: usize,
        max_tokens: usize,
        limit: usize,
    },
    #[error("the request needs {needed} KV blocks; the whole cache holds {capacity}")]
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
    /// Arrival to first scheduled.
    pub queue: f64,
    /// Arrival to first token.
    pub ttft: f64,
    /// Arrival to last token.
    pub e2e: f64,
}

/// One step's work and what it produced.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepOutcome {
    /// Simulated seconds the step took.
    pub duration: f64,
    /// Simulated time at the end of the step.
    pub end: f64,
    /// Prompt (or recomputed) tokens prefilled.
    pub prefill_tokens: usize,
    /// Sequences that decoded one token.
    pub decode_seqs: usize,
    /// Tokens of KV attended to by the step's sequences.
    pub context_tokens: usize,
    /// Sequences sent back to the waiting queue this step.
    pub preempted: Vec<SeqId>,
    pub outputs: Vec<Output>,
}

#[derive(Debug)]
struct Seq {
    /// Prompt plus generated tokens so far.
    tokens: Vec<u32>,
    prompt_len: usize,
    max_tokens: usize,
    priority: i64,
    /// Arrival order, for FIFO.
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
    /// Hashes of the full blocks of `tokens`, extended as tokens are
    /// generated.
    hashes: Vec<u64>,
    /// Shared blocks this sequence pins (a prefix of `hashes`).
    pinned: Vec<u64>,
    /// Blocks private to this sequence.
    private: usize,
    cached_tokens: usize,
}

impl Seq {
    fn blocks_held(&self) -> usize {
        self.pinned.len() + self.private
    }

    fn is_decoding(&self) -> bool {
        self.generated > 0 && self.computed + 1 == self.target
    }
}

/// A sequence's share of the step being planned.
#[derive(Clone, Copy, Debug)]
struct Planned {
    id: SeqId,
    tokens: usize,
    decode: bool,
}

/// The step being planned: who runs, and the tokens left in the budget.
#[derive(Debug)]
struct Plan {
    scheduled: Vec<Planned>,
    /// The ids in `scheduled`.
    ids: HashSet<SeqId>,
    budget: usize,
    preempted: Vec<SeqId>,
}

impl Plan {
    fn new(budget: usize) -> Self {
        Self {
            scheduled: Vec::new(),
            ids: HashSet::new(),
            budget,
            preempted: Vec::new(),
        }
    }

    fn schedule(&mut self, p: Planned) {
        self.budget -= p.tokens;
        self.ids.insert(p.id);
        self.scheduled.push(p);
    }

    /// Takes a preempted sequence out of the plan, refunding its tokens.
    fn unschedule(&mut self, id: SeqId) {
        if let Some(i) = self.scheduled.iter().position(|p| p.id == id) {
            self.ids.remove(&id);
            self.budget += self.scheduled.remove(i).tokens;
        }
        self.preempted.push(id);
    }
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

pub struct Engine {
    cfg: SimConfig,
    now: f64,
    seqs: HashMap<SeqId, Seq>,
    waiting: Vec<SeqId>,
    /// Running sequences, oldest admission first.
    running: Vec<SeqId>,
    kv: KvCache,
    next_id: SeqId,
    pub stats: Stats,
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
            stats: Stats::default(),
        }
    }

    /// The simulated clock, seconds.
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

    /// Fraction of the KV cache's blocks held by sequences (0..1), as vLLM's
    /// `kv_cache_usage_perc`: cached blocks no one uses count as free.
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

    /// Starts recording KV cache events (see [`Engine::take_kv_events`]).
    pub fn record_kv_events(&mut self) {
        self.kv.record_events();
    }

    /// The KV cache events since the last call, in order.
    pub fn take_kv_events(&mut self) -> Vec<crate::kv::CacheEvent> {
        self.kv.take_events()
    }

    /// Drops the whole prefix cache (vLLM's `/reset_prefix_cache`); false,
    /// changing nothing, while any sequence holds blocks.
    pub fn reset_prefix_cache(&mut self) -> bool {
        self.kv.clear()
    }

    fn block_size(&self) -> usize {
        self.cfg.block_size.max(1)
    }

    /// Queues a request. Refuses one that could never run: an empty prompt,
    /// or prompt plus `max_tokens` over `max_model_len` or over the cache.
    pub fn add(&mut self, req: Request) -> Result<SeqId, AddError> {
        if req.prompt.is_empty() {
            return Err(AddError::EmptyPrompt);
        }
        let max_tokens = req.max_tokens.max(1);
        let total = req.prompt.len() + max_tokens;
        if total > self.cfg.max_model_len {
            return Err(AddError::TooLong {
                prompt: req.prompt.len(),
                max_tokens,
                limit: self.cfg.max_model_len,
            });
        }
        let needed = total.div_ceil(self.block_size());
        if needed > self.kv.capacity() {
            return Err(AddError::TooBig {
                needed,
                capacity: self.kv.capacity(),
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        let seed = req.prompt.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, t| {
            (h ^ u64::from(*t)).wrapping_mul(0x100_0000_01b3)
        });
        let hashes = block_hashes(&req.prompt, self.block_size());
        self.seqs.insert(
            id,
            Seq {
                prompt_len: req.prompt.len(),
                target: req.prompt.len(),
                tokens: req.prompt,
                max_tokens,
                priority: req.priority,
                order: id,
                seed,
                arrival: self.now,
                scheduled_at: None,
                first_token_at: None,
                generated: 0,
                computed: 0,
                hashes,
                pinned: Vec::new(),
                private: 0,
                cached_tokens: 0,
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

    /// Gives back a sequence's blocks. Shared blocks are unpinned last
    /// block first, so that a prompt's tail is evicted before its head (as
    /// vLLM frees them): the head is what other prompts share.
    fn release(&mut self, s: &mut Seq) {
        for h in s.pinned.drain(..).rev() {
            self.kv.unpin(h);
        }
        self.kv.free_private(s.private);
        s.private = 0;
    }

    /// The position in `waiting` of the sequence to admit next.
    fn next_waiting(&self) -> Option<usize> {
        self.waiting
            .iter()
            .enumerate()
            .filter_map(|(i, id)| self.seqs.get(id).map(|s| (i, self.queue_key(s))))
            .min_by_key(|(_, key)| *key)
            .map(|(i, _)| i)
    }

    /// Lower goes first (and is preempted last).
    fn queue_key(&self, s: &Seq) -> (i64, u64) {
        match self.cfg.scheduling_policy {
            SchedulingPolicy::Fcfs => (0, s.order),
            SchedulingPolicy::Priority => (s.priority, s.order),
        }
    }

    /// The running sequence to preempt, as vLLM picks it: the last of the
    /// running list under FCFS (`self.running[-1]`); under `priority` the
    /// largest `(priority, arrival_time)` (`max(self.running, key=...)`):
    /// the lowest priority, the latest arrival among equals.
    fn victim(&self) -> Option<SeqId> {
        match self.cfg.scheduling_policy {
            SchedulingPolicy::Fcfs => self.running.last().copied(),
            SchedulingPolicy::Priority => self
                .running
                .iter()
                .filter_map(|id| self.seqs.get(id).map(|s| (*id, self.queue_key(s))))
                .max_by_key(|(_, key)| *key)
                .map(|(id, _)| id),
        }
    }

    /// Sends a running sequence back to the waiting queue, to be recomputed
    /// (vLLM's `_preempt_request`: blocks freed, `num_computed_tokens = 0`,
    /// `waiting.prepend_request`). Its full blocks stay cached until evicted.
    fn preempt(&mut self, id: SeqId) {
        self.running.retain(|r| *r != id);
        if let Some(mut s) = self.seqs.remove(&id) {
            self.release(&mut s);
            s.computed = 0;
            self.seqs.insert(id, s);
            self.waiting.push(id);
            self.stats.preemptions += 1;
        }
    }

    /// Grows a sequence's blocks to cover `tokens` tokens; false if the
    /// cache cannot make room.
    fn grow(&mut self, id: SeqId, tokens: usize) -> bool {
        let bs = self.block_size();
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

    /// Like [`Self::grow`], preempting while it fails. False if `id` itself
    /// was preempted.
    fn grow_or_preempt(&mut self, id: SeqId, tokens: usize, plan: &mut Plan) -> bool {
        loop {
            if self.grow(id, tokens) {
                return true;
            }
            let Some(victim) = self.victim() else {
                return false;
            };
            self.preempt(victim);
            plan.unschedule(victim);
            if victim == id {
                return false;
            }
        }
    }

    /// Registers the full blocks computed so far as shared cache blocks.
    fn publish_blocks(&mut self, id: SeqId) {
        let bs = self.block_size();
        let Some(s) = self.seqs.get_mut(&id) else {
            return;
        };
        let full = (s.computed / bs).min(s.hashes.len());
        while s.pinned.len() < full && s.private > 0 {
            let i = s.pinned.len();
            let h = s.hashes[i];
            let parent = i.checked_sub(1).map(|p| s.hashes[p]);
            let tokens = s.tokens.get(i * bs..(i + 1) * bs).unwrap_or(&[]);
            self.kv.store(h, parent, tokens);
            s.private -= 1;
            s.pinned.push(h);
        }
    }

    /// Schedules the running sequences in the running list's order (vLLM's
    /// loop over `self.running`): a decode token, or the next prefill chunk.
    /// Admission appends, so decoding sequences come before prefilling ones.
    fn schedule_running(&mut self, plan: &mut Plan) {
        for id in self.running.clone() {
            if plan.budget == 0 {
                break;
            }
            // Skip those preempted while planning.
            if plan.ids.contains(&id) || plan.preempted.contains(&id) {
                continue;
            }
            let Some(s) = self.seqs.get(&id) else {
                continue;
            };
            let decode = s.is_decoding();
            let chunk = s.target.saturating_sub(s.computed).min(plan.budget);
            if chunk == 0 {
                continue;
            }
            let upto = s.computed + chunk;
            if self.grow_or_preempt(id, upto, plan) {
                plan.schedule(Planned {
                    id,
                    tokens: chunk,
                    decode,
                });
            } else if self.cfg.scheduling_policy == SchedulingPolicy::Fcfs {
                // It preempted itself, the last of the list: vLLM stops
                // here. Under `priority` the sequences after it rank higher
                // and may still fit, so vLLM goes on to them.
                break;
            }
        }
    }

    /// Admits waiting sequences, the queue's head first, while there is
    /// budget and a free seat. A head that does not fit stops admission: it
    /// waits, nobody behind it goes first, and nothing is preempted for it
    /// (vLLM's waiting loop `break`s on a full running list and on a failed
    /// `allocate_slots`).
    fn admit(&mut self, plan: &mut Plan) {
        let bs = self.block_size();
        while plan.budget > 0 && self.running.len() < self.cfg.max_num_seqs.max(1) {
            let Some(w) = self.next_waiting() else { break };
            let id = self.waiting[w];
            let Some(s) = self.seqs.get(&id) else {
                self.waiting.remove(w);
                continue;
            };
            // The longest cached prefix of full blocks, leaving one token to compute.
            let hit = self.kv.cached_prefix(&s.hashes).min((s.target - 1) / bs);
            let hashes = s.hashes[..hit].to_vec();
            let target = s.target;
            let first_time = s.scheduled_at.is_none();
            // The whole sequence must fit, not just this step's chunk (vLLM's
            // `allocate_slots(..., full_sequence_must_fit=True)`): blocks for
            // every token past the hit, plus the hit blocks nobody pins, which
            // leave the free pool when taken.
            let needed = target.div_ceil(bs) - hit + self.kv.unpinned(&hashes);
            if needed > self.kv.free() {
                break;
            }
            for h in &hashes {
                self.kv.pin(*h);
            }
            let computed = hit * bs;
            let chunk = (target - computed).min(plan.budget);
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
            if first_time {
                self.stats.prefix_queries += target as u64;
                self.stats.prefix_hits += computed as u64;
                self.stats.prompt_tokens += target as u64;
            }
            self.waiting.remove(w);
            self.running.push(id);
            let now = self.now;
            if let Some(s) = self.seqs.get_mut(&id) {
                if first_time {
                    s.cached_tokens = computed;
                }
                s.scheduled_at.get_or_insert(now);
            }
            plan.schedule(Planned {
                id,
                tokens: chunk,
                decode: false,
            });
        }
    }

    /// Runs one step. `None` when there is nothing to do.
    pub fn step(&mut self) -> Option<StepOutcome> {
        if self.is_idle() {
            return None;
        }
        let mut plan = Plan::new(self.cfg.max_num_batched_tokens.max(1));
        self.schedule_running(&mut plan);
        // As vLLM: a step that had to preempt admits nobody new. If it
        // preempted every running sequence, vLLM's step is empty and the next
        // one admits; the simulator admits at once instead of running an
        // empty step.
        if plan.preempted.is_empty() || plan.scheduled.is_empty() {
            self.admit(&mut plan);
        }
        if plan.scheduled.is_empty() {
            return None;
        }

        // The step's cost.
        let mut prefill_tokens = 0;
        let mut decode_seqs = 0;
        let mut context_tokens = 0;
        for p in &plan.scheduled {
            if p.decode {
                decode_seqs += 1;
            } else {
                prefill_tokens += p.tokens;
            }
            context_tokens += self.seqs.get(&p.id).map_or(0, |s| s.computed) + p.tokens;
        }
        let duration = self.cfg.step_overhead
            + self.cfg.per_prefill_token * prefill_tokens as f64
            + self.cfg.per_decode_seq * decode_seqs as f64
            + self.cfg.per_context_token * context_tokens as f64;
        self.now += duration;

        // Its results.
        let mut outputs = Vec::new();
        for p in &plan.scheduled {
            if let Some(s) = self.seqs.get_mut(&p.id) {
                s.computed += p.tokens;
            }
            self.publish_blocks(p.id);
            if self.seqs.get(&p.id).is_some_and(|s| s.computed >= s.target) {
                self.sample(p.id, &mut outputs);
            }
        }
        Some(StepOutcome {
            duration,
            end: self.now,
            prefill_tokens,
            decode_seqs,
            context_tokens,
            preempted: plan.preempted,
            outputs,
        })
    }

    /// Samples the next token of a sequence whose context is computed.
    fn sample(&mut self, id: SeqId, outputs: &mut Vec<Output>) {
        let now = self.now;
        let bs = self.block_size();
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
        s.target = s.tokens.len();
        extend_block_hashes(&mut s.hashes, &s.tokens, bs);
        s.first_token_at.get_or_insert(now);
        self.stats.generation_tokens += 1;
        if s.generated < s.max_tokens {
            return;
        }
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

    fn req(prompt: Vec<u32>, max_tokens: usize, priority: i64) -> Request {
        Request {
            prompt,
            max_tokens,
            priority,
        }
    }

    fn finish_order(out: &[Output]) -> Vec<SeqId> {
        out.iter()
            .filter_map(|o| match o {
                Output::Finished { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect()
    }

    fn position(out: &[Output], id: SeqId, token: usize) -> Option<usize> {
        out.iter().position(
            |o| matches!(o, Output::Token { seq, index, .. } if *seq == id && *index == token),
        )
    }

    #[test]
    fn context_tokens_cost_time() {
        let mut e = Engine::new(SimConfig {
            per_context_token: 0.0001,
            ..cfg()
        });
        for salt in 0..3 {
            e.add(req(prompt(8, salt), 3, 0)).ok();
        }
        let s = e.step().unwrap_or_default();
        // Prefill: each sequence attends to its 8 prompt tokens.
        assert_eq!(s.context_tokens, 24);
        assert!((s.duration - (0.01 + 0.001 * 24.0 + 0.0001 * 24.0)).abs() < 1e-12);
        let s = e.step().unwrap_or_default();
        // Decode: each attends to its prompt and its first token.
        assert_eq!((s.decode_seqs, s.context_tokens), (3, 27));
        assert!((s.duration - (0.01 + 0.002 * 3.0 + 0.0001 * 27.0)).abs() < 1e-12);
        assert!((e.now() - (0.0364 + 0.0187)).abs() < 1e-12);
    }

    #[test]
    fn decode_goes_first_and_prefill_gets_the_rest_of_the_budget() {
        let mut e = Engine::new(cfg());
        e.add(req(prompt(8, 1), 5, 0)).ok();
        e.step();
        e.add(req(prompt(100, 2), 1, 0)).ok();
        let s = e.step().unwrap_or_default();
        assert_eq!((s.decode_seqs, s.prefill_tokens), (1, 63));
        let s = e.step().unwrap_or_default();
        assert_eq!((s.decode_seqs, s.prefill_tokens), (1, 37));
    }

    #[test]
    fn a_finished_prompt_is_evicted_tail_first() {
        // Room for 4 blocks of 4 tokens.
        let mut e = Engine::new(SimConfig {
            kv_cache_tokens: 16,
            ..cfg()
        });
        let a = prompt(12, 1);
        e.add(req(a.clone(), 1, 0)).ok();
        run(&mut e);
        assert_eq!(e.kv().cached(), 3);
        // Two new blocks: one is free, the other is A's last block.
        e.add(req(prompt(8, 2), 1, 0)).ok();
        run(&mut e);
        let h = block_hashes(&a, 4);
        assert!(e.kv().contains(h[0]) && e.kv().contains(h[1]));
        assert!(!e.kv().contains(h[2]));
        assert_eq!(e.kv().evictions, 1);
    }

    #[test]
    fn an_aborted_request_frees_its_blocks() {
        let mut e = Engine::new(cfg());
        let a = e.add(req(prompt(30, 1), 50, 0)).unwrap_or(0);
        e.step();
        e.step();
        assert!(e.kv().in_use() > 0 && e.kv_usage() > 0.0);
        e.abort(a);
        assert_eq!(e.kv().in_use(), 0);
        assert!(e.is_idle());
        assert!(e.step().is_none());
        // Its full blocks stay cached for the next prompt that shares them.
        assert_eq!(e.kv().cached(), 7);
    }

    #[test]
    fn a_preempted_sequence_is_readmitted_before_later_arrivals() {
        // 4 blocks of 4 tokens; A and B each grow to 4 blocks; C is small.
        let mut e = Engine::new(SimConfig {
            kv_cache_tokens: 16,
            max_num_seqs: 2,
            ..cfg()
        });
        let a = e.add(req(prompt(6, 1), 8, 0)).unwrap_or(0);
        let b = e.add(req(prompt(6, 2), 8, 0)).unwrap_or(0);
        let c = e.add(req(prompt(2, 3), 1, 0)).unwrap_or(0);
        let mut out = Vec::new();
        let mut preempted = Vec::new();
        while let Some(s) = e.step() {
            if !s.preempted.is_empty() {
                // A step that preempts admits nobody.
                assert!(s.outputs.iter().all(|o| !matches!(o,
                    Output::Token { seq, index: 0, .. } if *seq == c)));
            }
            preempted.extend(s.preempted);
            out.extend(s.outputs);
        }
        assert_eq!(preempted, vec![b], "the newest is preempted, once");
        assert_eq!(e.stats.preemptions, 1);
        // A finishes first; B resumes where it stopped, before C starts.
        assert_eq!(finish_order(&out).first(), Some(&a));
        assert!(position(&out, b, 3) < position(&out, c, 0));
        for id in [a, b] {
            for i in 0..8 {
                assert!(position(&out, id, i).is_some());
            }
        }
    }

    #[test]
    fn under_priority_the_lowest_priority_is_preempted() {
        let mut e = Engine::new(SimConfig {
            kv_cache_tokens: 16,
            scheduling_policy: SchedulingPolicy::Priority,
            ..cfg()
        });
        let low = e.add(req(prompt(6, 1), 8, 5)).unwrap_or(0);
        let high = e.add(req(prompt(6, 2), 8, 0)).unwrap_or(0);
        let mut out = Vec::new();
        let mut preempted = Vec::new();
        while let Some(s) = e.step() {
            preempted.extend(s.preempted);
            out.extend(s.outputs);
        }
        assert_eq!(preempted, vec![low]);
        assert_eq!(finish_order(&out), vec![high, low]);
    }

    /// Runs to the end, returning every output and the preempted ids in order.
    fn run_all(e: &mut Engine) -> (Vec<Output>, Vec<SeqId>) {
        let mut out = Vec::new();
        let mut preempted = Vec::new();
        while let Some(s) = e.step() {
            preempted.extend(s.preempted);
            out.extend(s.outputs);
        }
        (out, preempted)
    }

    #[test]
    fn the_victim_is_the_largest_priority_then_the_latest_arrival() {
        // 6 blocks of 4 tokens; three sequences each grow to a third block
        // at their ninth token, one too many.
        let three = |policy| {
            let mut e = Engine::new(SimConfig {
                kv_cache_tokens: 24,
                scheduling_policy: policy,
                ..cfg()
            });
            let a = e.add(req(prompt(4, 1), 8, 1)).unwrap_or(0);
            let b = e.add(req(prompt(4, 2), 8, 1)).unwrap_or(0);
            let c = e.add(req(prompt(4, 3), 8, 0)).unwrap_or(0);
            let (_, preempted) = run_all(&mut e);
            (preempted.first().copied(), [a, b, c])
        };
        // Priority: b and a tie on priority 1, b arrived later; c ranks higher.
        let (first, [_, b, _]) = three(SchedulingPolicy::Priority);
        assert_eq!(first, Some(b));
        // FCFS: the last of the running list, whatever its priority.
        let (first, [_, _, c]) = three(SchedulingPolicy::Fcfs);
        assert_eq!(first, Some(c));
    }

    #[test]
    fn under_priority_a_request_that_preempts_itself_lets_the_ones_after_it_run() {
        // 4 blocks of 4; both need a third block at their ninth token. The
        // low-priority one, first in the running list, is its own victim;
        // the high-priority one after it still runs in that step.
        let mut e = Engine::new(SimConfig {
            kv_cache_tokens: 16,
            scheduling_policy: SchedulingPolicy::Priority,
            ..cfg()
        });
        let low = e.add(req(prompt(6, 1), 8, 5)).unwrap_or(0);
        let high = e.add(req(prompt(6, 2), 8, 0)).unwrap_or(0);
        let s = std::iter::from_fn(|| e.step())
            .find(|s| !s.preempted.is_empty())
            .unwrap_or_default();
        assert_eq!(s.preempted, vec![low]);
        assert_eq!(s.decode_seqs, 1);
        assert!(
            s.outputs
                .iter()
                .any(|o| matches!(o, Output::Token { seq, .. } if *seq == high))
        );
    }

    #[test]
    fn a_waiting_higher_priority_request_preempts_nobody() {
        // vLLM's waiting loop stops at a full running list or a failed
        // allocation; it never preempts to admit.
        // Out of seats.
        let mut e = Engine::new(SimConfig {
            max_num_seqs: 1,
            scheduling_policy: SchedulingPolicy::Priority,
            ..cfg()
        });
        let low = e.add(req(prompt(4, 1), 6, 5)).unwrap_or(0);
        e.step();
        let high = e.add(req(prompt(4, 2), 1, 0)).unwrap_or(0);
        let (out, preempted) = run_all(&mut e);
        assert!(preempted.is_empty());
        assert_eq!(finish_order(&out), vec![low, high]);
        // Out of blocks: 5 blocks of 4; low grows to 4 blocks, high needs 3.
        let mut e = Engine::new(SimConfig {
            kv_cache_tokens: 20,
            scheduling_policy: SchedulingPolicy::Priority,
            ..cfg()
        });
        let low = e.add(req(prompt(8, 1), 8, 5)).unwrap_or(0);
        e.step();
        let high = e.add(req(prompt(12, 2), 1, 0)).unwrap_or(0);
        let (out, preempted) = run_all(&mut e);
        assert!(preempted.is_empty());
        assert_eq!(e.stats.preemptions, 0);
        assert_eq!(finish_order(&out), vec![low, high]);
    }

    #[test]
    fn a_waiting_request_is_admitted_only_if_its_whole_sequence_fits() {
        // 8 blocks of 4, 8 tokens a step. A (20 tokens, 5 blocks) finishes
        // its prefill with budget to spare, but B's 5 blocks do not fit
        // beside A's: B waits for A, though its first chunk would fit.
        let mut e = Engine::new(SimConfig {
            kv_cache_tokens: 32,
            max_num_batched_tokens: 8,
            ..cfg()
        });
        let a = e.add(req(prompt(20, 1), 2, 0)).unwrap_or(0);
        let b = e.add(req(prompt(20, 2), 2, 0)).unwrap_or(0);
        let (out, preempted) = run_all(&mut e);
        assert!(preempted.is_empty());
        let (_, ta) = finished(&out, a).unwrap_or_default();
        let (_, tb) = finished(&out, b).unwrap_or_default();
        assert!(tb.queue >= ta.e2e - 1e-12, "B admitted before A finished");
    }

    #[test]
    fn blocks_filled_while_decoding_are_cached() {
        let mut e = Engine::new(cfg());
        let p = prompt(8, 1);
        e.add(req(p.clone(), 9, 0)).ok();
        let words: Vec<&str> = run(&mut e)
            .into_iter()
            .filter_map(|o| match o {
                Output::Token { word, .. } => Some(word),
                _ => None,
            })
            .collect();
        // 8 prompt tokens and the first 8 generated were computed: 4 blocks.
        assert_eq!(e.kv().cached(), 4);
        // A prompt that repeats the answer hits all four.
        let mut q = p;
        q.extend(words[..8].iter().map(|w| fnv32(w.as_bytes())));
        q.extend(prompt(3, 2));
        let b = e.add(req(q, 1, 0)).unwrap_or(0);
        let s = e.step().unwrap_or_default();
        assert_eq!(s.prefill_tokens, 3);
        assert_eq!(
            finished(&s.outputs, b).map(|(u, _)| u.cached_tokens),
            Some(16)
        );
    }

    #[test]
    fn a_preempted_sequence_recomputes_only_what_is_no_longer_cached() {
        let mut e = Engine::new(cfg());
        let a = e.add(req(prompt(4, 1), 20, 0)).unwrap_or(0);
        let mut out = Vec::new();
        for _ in 0..10 {
            out.extend(e.step().unwrap_or_default().outputs);
        }
        // 14 tokens (4 + 10 generated), 13 computed: 3 full blocks.
        e.preempt(a);
        assert_eq!((e.num_running(), e.num_waiting()), (0, 1));
        assert_eq!((e.kv().in_use(), e.kv().cached()), (0, 3));
        // Readmitted, it hits its 3 blocks (prompt and generated tokens) and
        // recomputes the other 2 tokens, then samples its eleventh.
        let s = e.step().unwrap_or_default();
        assert_eq!((s.prefill_tokens, s.decode_seqs), (2, 0));
        out.extend(s.outputs);
        assert!(position(&out, a, 10).is_some());
        out.extend(run(&mut e));
        for i in 0..20 {
            assert!(position(&out, a, i).is_some());
        }
        assert_eq!(e.stats.preemptions, 1);
    }

    #[test]
    fn under_priority_a_preempted_request_waits_behind_higher_priority_arrivals() {
        // As above, low preempts itself; mid arrives afterwards with a
        // higher priority and is admitted before low is readmitted.
        let mut e = Engine::new(SimConfig {
            kv_cache_tokens: 16,
            scheduling_policy: SchedulingPolicy::Priority,
            ..cfg()
        });
        let low = e.add(req(prompt(6, 1), 8, 5)).unwrap_or(0);
        e.add(req(prompt(6, 2), 8, 0)).ok();
        let mut out = Vec::new();
        while let Some(s) = e.step() {
            out.extend(s.outputs);
            if !s.preempted.is_empty() {
                assert_eq!(s.preempted, vec![low]);
                break;
            }
        }
        assert_eq!(e.stats.preemptions, 1);
        let mid = e.add(req(prompt(2, 3), 1, 1)).unwrap_or(0);
        let (rest, _) = run_all(&mut e);
        out.extend(rest);
        let done = |id| {
            out.iter()
                .position(|o| matches!(o, Output::Finished { seq, .. } if *seq == id))
        };
        assert!(done(mid) < position(&out, low, 3));
    }

    #[test]
    fn queue_time_and_ttft_are_simulated_time() {
        let mut e = Engine::new(SimConfig {
            max_num_seqs: 1,
            ..cfg()
        });
        let a = e.add(req(prompt(10, 1), 3, 0)).unwrap_or(0);
        let b = e.add(req(prompt(10, 2), 3, 0)).unwrap_or(0);
        let out = run(&mut e);
        let (_, ta) = finished(&out, a).unwrap_or_default();
        let (ub, tb) = finished(&out, b).unwrap_or_default();
        // A: prefill 10 tokens, then two decode steps.
        let prefill = 0.01 + 0.001 * 10.0;
        let decode = 0.01 + 0.002;
        assert!(ta.queue.abs() < 1e-12);
        assert!((ta.ttft - prefill).abs() < 1e-12);
        assert!((ta.e2e - (prefill + 2.0 * decode)).abs() < 1e-12);
        // B waits for A's seat.
        assert!((tb.queue - ta.e2e).abs() < 1e-12);
        assert!((tb.ttft - (ta.e2e + prefill)).abs() < 1e-12);
        assert_eq!(ub.completion_tokens, 3);
        assert_eq!(ub.prompt_tokens, 10);
    }

    #[test]
    fn max_tokens_is_honoured_exactly_and_text_is_deterministic() {
        let words = |salt| {
            let mut e = Engine::new(cfg());
            e.add(req(prompt(20, salt), 7, 0)).ok();
            run(&mut e)
                .into_iter()
                .filter_map(|o| match o {
                    Output::Token { word, .. } => Some(word),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(words(1).len(), 7);
        assert_eq!(words(1), words(1));
    }

    /// Many requests of mixed sizes sharing prefixes, in a cache small
    /// enough to evict and preempt: every request gets exactly its tokens,
    /// every limit holds at every step, and at the end no block is held.
    #[test]
    fn a_mixed_load_keeps_every_invariant() {
        for policy in [SchedulingPolicy::Fcfs, SchedulingPolicy::Priority] {
            let mut e = Engine::new(SimConfig {
                kv_cache_tokens: 200,
                max_num_seqs: 8,
                max_num_batched_tokens: 48,
                scheduling_policy: policy,
                ..cfg()
            });
            let mut want = HashMap::new();
            let mut x: u64 = 7;
            for i in 0..60u32 {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                let shared = prompt(((x >> 33) % 40) as usize, i % 3);
                let mut p = shared;
                p.extend(prompt(1 + ((x >> 40) % 30) as usize, 100 + i));
                let max_tokens = 1 + ((x >> 50) % 40) as usize;
                let id = e
                    .add(req(p, max_tokens, ((x >> 20) % 4) as i64))
                    .unwrap_or(0);
                want.insert(id, max_tokens);
            }
            let mut got: HashMap<SeqId, Vec<usize>> = HashMap::new();
            let mut finished = Vec::new();
            let mut last = 0.0;
            while let Some(s) = e.step() {
                assert!(e.num_running() <= 8);
                assert!(s.prefill_tokens + s.decode_seqs <= 48);
                assert!(e.kv().in_use() <= e.kv().capacity());
                assert!(s.end > last);
                last = s.end;
                for o in s.outputs {
                    match o {
                        Output::Token { seq, index, .. } => got.entry(seq).or_default().push(index),
                        Output::Finished { seq, usage, timing } => {
                            assert_eq!(usage.completion_tokens, want[&seq]);
                            assert!(timing.queue <= timing.ttft && timing.ttft <= timing.e2e);
                            finished.push(seq);
                        }
                    }
                }
            }
            assert_eq!(finished.len(), 60);
            for (id, n) in &want {
                assert_eq!(got[id], (0..*n).collect::<Vec<_>>(), "seq {id}");
            }
            assert!(e.is_idle());
            assert_eq!(e.kv().in_use(), 0);
            assert!(e.stats.preemptions > 0, "the load should preempt");
            assert!(e.stats.prefix_hits > 0, "and hit the prefix cache");
        }
    }
}
