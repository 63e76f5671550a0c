//! Mooncake-format traces: parsing, session reconstruction, the plan.
//!
//! One JSON object a line: `timestamp` (ms), `input_length` and
//! `output_length` (tokens), `hash_ids` (one id per 512-token prompt block;
//! equal ids mean an equal prefix up to and including that block).
//!
//! **Sessions** (`--session-rule longest-prefix`, the default). Requests are
//! taken in timestamp order (ties: file order). For a request R, find the
//! earlier requests whose `hash_ids` share the longest common leading run
//! with R's; if that run is at least `min_shared` blocks (default 1), R is a
//! later turn of the session of the *latest* of those requests; otherwise R
//! starts a new session. A request equal to an earlier one counts (a full
//! match). The rule does not ask the earlier request's ids to be a whole
//! prefix of R's: a conversation's last block is partial, and its id
//! changes once the next turn fills it, so turn N+1 typically shares all but
//! the last one to three blocks of turn N.
//!
//! `--session-rule whole-prefix` is stricter: R is a later turn only of an
//! earlier request whose *whole* list R's begins with (at least `min_shared`
//! blocks; the longest such, then the latest).

use serde::Deserialize;
use std::collections::HashMap;

use crate::config::SessionRule;
use crate::plan::{Call, Pacing, Plan, Prompt, Session, Step};

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct TraceRequest {
    pub timestamp: u64,
    pub input_length: u64,
    pub output_length: u64,
    #[serde(default)]
    pub hash_ids: Vec<u64>,
}

/// Parses JSON Lines (blank lines skipped) and sorts by timestamp (stable).
pub fn parse(text: &str) -> anyhow::Result<Vec<TraceRequest>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r: TraceRequest =
            serde_json::from_str(line).map_err(|e| anyhow::anyhow!("trace line {}: {e}", i + 1))?;
        out.push(r);
    }
    out.sort_by_key(|r| r.timestamp);
    Ok(out)
}

/// A trie of the id lists seen so far.
#[derive(Default)]
struct Node {
    children: HashMap<u64, usize>,
    /// The latest request whose list passes through this node.
    latest: usize,
    /// The latest request whose list ends at this node.
    latest_ending: Option<usize>,
}

/// The session of every request (requests in trace order; sessions numbered
/// in order of their first request), by the rule in the module doc.
pub fn sessions_of(reqs: &[TraceRequest], rule: SessionRule, min_shared: usize) -> Vec<usize> {
    let min_shared = min_shared.max(1);
    let mut nodes: Vec<Node> = vec![Node::default()];
    let mut session: Vec<usize> = Vec::with_capacity(reqs.len());
    let mut sessions = 0;
    for (i, r) in reqs.iter().enumerate() {
        // Walk the longest path of earlier ids, noting the candidates.
        let mut at = 0;
        let mut depth = 0;
        let mut best: Option<usize> = None; // earlier request
        for id in &r.hash_ids {
            let Some(&next) = nodes[at].children.get(id) else {
                break;
            };
            at = next;
            depth += 1;
            if depth >= min_shared {
                match rule {
                    SessionRule::LongestPrefix => best = Some(nodes[at].latest),
                    SessionRule::WholePrefix => {
                        if let Some(j) = nodes[at].latest_ending {
                            best = Some(j);
                        }
                    }
                }
            }
        }
        let s = match best {
            Some(j) => session[j],
            None => {
                sessions += 1;
                sessions - 1
            }
        };
        session.push(s);
        // Record this request's path.
        let mut at = 0;
        for id in &r.hash_ids {
            at = match nodes[at].children.get(id) {
                Some(&n) => n,
                None => {
                    nodes.push(Node::default());
                    let n = nodes.len() - 1;
                    nodes[at].children.insert(*id, n);
                    n
                }
            };
            nodes[at].latest = i;
        }
        if at != 0 {
            nodes[at].latest_ending = Some(i);
        }
    }
    session
}

/// Pacing and session options of a trace plan.
#[derive(Clone, Copy, Debug)]
pub struct TraceOptions {
    pub pacing: Pacing,
    /// Trace time runs this much faster.
    pub speedup: f64,
    /// Closed loop: think-time cap, seconds.
    pub max_think: f64,
    pub rule: SessionRule,
    pub min_shared: usize,
}

/// The plan of a trace (already sorted, see [`parse`]): sessions by the
/// rule; a session starts at its first request's timestamp ÷ speedup. Open
/// loop: each request at its own timestamp ÷ speedup. Closed loop: each
/// later turn after the previous answer plus min(gap ÷ speedup, max_think).
pub fn plan(reqs: &[TraceRequest], o: TraceOptions) -> Plan {
    let speedup = if o.speedup > 0.0 { o.speedup } else { 1.0 };
    let ids = sessions_of(reqs, o.rule, o.min_shared);
    let mut sessions: Vec<Session> = Vec::new();
    let mut last_ts: Vec<u64> = Vec::new();
    for (i, (r, s)) in reqs.iter().zip(ids).enumerate() {
        let t = r.timestamp as f64 / 1000.0 / speedup;
        if s == sessions.len() {
            sessions.push(Session {
                id: format!("mooncake-{s}"),
                start: t,
                steps: Vec::new(),
                carry_history: false,
                system: None,
            });
            last_ts.push(r.timestamp);
        }
        let delay = match o.pacing {
            Pacing::Open => t - sessions[s].start,
            Pacing::Closed if sessions[s].steps.is_empty() => 0.0,
            Pacing::Closed => {
                let gap = r.timestamp.saturating_sub(last_ts[s]) as f64 / 1000.0 / speedup;
                gap.min(o.max_think.max(0.0))
            }
        };
        last_ts[s] = r.timestamp;
        sessions[s].steps.push(Step {
            delay,
            calls: vec![Call {
                prompt: Prompt::Blocks {
                    hash_ids: r.hash_ids.clone(),
                    words: r.input_length,
                },
                max_tokens: u32::try_from(r.output_length.max(1)).unwrap_or(u32::MAX),
                trace_index: Some(i),
            }],
        });
    }
    Plan {
        sessions,
        pacing: o.pacing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ts: u64, ids: &[u64]) -> TraceRequest {
        TraceRequest {
            timestamp: ts,
            input_length: 512 * ids.len() as u64,
            output_length: 4,
            hash_ids: ids.to_vec(),
        }
    }

    fn opts(pacing: Pacing) -> TraceOptions {
        TraceOptions {
            pacing,
            speedup: 2.0,
            max_think: 5.0,
            rule: SessionRule::LongestPrefix,
            min_shared: 1,
        }
    }

    #[test]
    fn longest_common_prefix_rule() {
        let reqs = vec![
            req(0, &[1, 2, 3]),    // 0: new session 0
            req(1, &[10]),         // 1: new session 1
            req(2, &[1, 2, 4, 5]), // 2: shares [1,2] with 0 (its last block changed)
            req(3, &[20, 21]),     // 3: new session 2
            req(4, &[1, 2, 4, 6]), // 4: shares [1,2,4] with 2
            req(5, &[10]),         // 5: equal to 1: session 1
            req(6, &[20, 22]),     // 6: shares [20] with 3
            req(7, &[30]),         // 7: new session 3
            req(8, &[]),           // 8: no blocks: new session 4
            req(9, &[1, 7]),       // 9: shares [1] with 0, 2 and 4: the latest, 4
        ];
        let s = sessions_of(&reqs, SessionRule::LongestPrefix, 1);
        assert_eq!(s, vec![0, 1, 0, 2, 0, 1, 2, 3, 4, 0]);
        // With at least two shared blocks, one-block matches start sessions
        // (even the repeat of a one-block request).
        let s = sessions_of(&reqs, SessionRule::LongestPrefix, 2);
        assert_eq!(s, vec![0, 1, 0, 2, 0, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn the_longest_match_wins_over_the_latest() {
        // Two sessions share a first block (a system prompt); a request
        // continuing the first one goes to it even though the second is later.
        let reqs = vec![
            req(0, &[1, 2, 3]),
            req(1, &[1, 8, 9]),
            req(2, &[1, 2, 3, 4]),
            req(3, &[1, 8, 5]),
        ];
        assert_eq!(
            sessions_of(&reqs, SessionRule::LongestPrefix, 1),
            vec![0, 0, 0, 0]
        );
        assert_eq!(
            sessions_of(&reqs, SessionRule::LongestPrefix, 2),
            vec![0, 1, 0, 1]
        );
    }

    #[test]
    fn whole_prefix_rule() {
        let reqs = vec![
            req(0, &[1, 2]),
            req(1, &[3]),
            req(2, &[1, 2, 4]),    // extends request 0
            req(3, &[1, 5]),       // shares only block 1: new session
            req(4, &[1, 2, 4, 6]), // extends request 2 (longest)
            req(5, &[3]),          // repeats request 1 exactly: same session
            req(6, &[1, 2, 7]),    // extends request 0 (2 is longer but not a prefix)
        ];
        assert_eq!(
            sessions_of(&reqs, SessionRule::WholePrefix, 1),
            vec![0, 1, 0, 2, 0, 1, 0]
        );
    }

    #[test]
    fn closed_and_open_pacing() {
        let reqs = vec![
            req(1000, &[1]),
            req(5000, &[9]),
            req(61_000, &[1, 2]),
            req(62_000, &[1, 2, 3]),
        ];
        let closed = plan(&reqs, opts(Pacing::Closed));
        assert_eq!(closed.sessions.len(), 2);
        assert_eq!(closed.calls(), 4);
        let s = &closed.sessions[0];
        assert_eq!(s.start, 0.5);
        let delays: Vec<f64> = s.steps.iter().map(|st| st.delay).collect();
        assert_eq!(delays, vec![0.0, 5.0, 0.5]); // 30 s capped at 5; 1 s / 2
        assert_eq!(closed.sessions[1].start, 2.5);
        let open = plan(&reqs, opts(Pacing::Open));
        let delays: Vec<f64> = open.sessions[0].steps.iter().map(|st| st.delay).collect();
        assert_eq!(delays, vec![0.0, 30.0, 30.5]);
        let call = &open.sessions[0].steps[2].calls[0];
        assert_eq!(call.trace_index, Some(3));
        assert_eq!(call.max_tokens, 4);
        assert_eq!(
            call.prompt,
            Prompt::Blocks {
                hash_ids: vec![1, 2, 3],
                words: 1536
            }
        );
    }

    #[test]
    fn parses_the_format() {
        let text = "{\"timestamp\": 5, \"input_length\": 10, \"output_length\": 2, \"hash_ids\": [1]}\n\n\
                    {\"timestamp\": 1, \"input_length\": 3, \"output_length\": 1, \"hash_ids\": []}\n";
        let r = parse(text).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].timestamp, 1);
        assert_eq!(r[1].hash_ids, vec![1]);
        let e = parse("{\"timestamp\": 1}\n{").unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn the_shared_trace_has_multi_turn_sessions() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/traces/mooncake_synthetic_trace.jsonl"
        );
        let Ok(text) = std::fs::read_to_string(path) else {
            return; // the shared trace is not part of the repository
        };
        let reqs = parse(&text).unwrap();
        assert_eq!(reqs.len(), 3993);
        let count = |s: &[usize]| s.iter().max().map_or(0, |m| m + 1);
        // Longest common prefix: 2211 sessions, 408 of them multi-turn.
        let longest = sessions_of(&reqs, SessionRule::LongestPrefix, 1);
        assert_eq!(count(&longest), 2211);
        let mut sizes = vec![0usize; 2211];
        longest.iter().for_each(|s| sizes[*s] += 1);
        assert_eq!(sizes.iter().filter(|n| **n > 1).count(), 408);
        assert_eq!(sizes.iter().max(), Some(&24));
        // Whole prefix: only the 213 exact repeats continue anything.
        let whole = sessions_of(&reqs, SessionRule::WholePrefix, 1);
        assert_eq!(count(&whole), 3993 - 213);
        // The first 2000 requests (the comparison's slice): 1639 sessions.
        let first = sessions_of(&reqs[..2000], SessionRule::LongestPrefix, 1);
        assert_eq!(count(&first), 1639);
    }
}
