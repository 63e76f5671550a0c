//! Mooncake-format traces (one JSON object a line: `timestamp` in ms,
//! `input_length` and `output_length` in tokens, `hash_ids`: one id per
//! 512-token prompt block, equal ids meaning an equal prefix).
//!
//! **Sessions.** A request whose `hash_ids` begin with the *whole* `hash_ids`
//! list of an earlier request is a later turn of that request's session (its
//! prompt re-sends that conversation and extends it). When several earlier
//! requests qualify, the longest wins. Anything else starts a new session —
//! two requests that merely share a system prompt block stay apart.
//!
//! **Prompts.** Block id `h` becomes 512 words `x<h>_<k>` (k = 0…511, base 36),
//! one token each under engine-sim's whitespace tokenisation, so equal ids
//! give identical blocks and different ids different ones; the last block is
//! cut so that the prompt has exactly `input_length` words.

use serde::Deserialize;
use std::collections::HashMap;

use crate::plan::{Call, Pacing, Plan, Session, Step};

pub const BLOCK_TOKENS: usize = 512;

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct TraceRequest {
    pub timestamp: u64,
    pub input_length: u64,
    pub output_length: u64,
    pub hash_ids: Vec<u64>,
}

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

fn chain(ids: &[u64]) -> Vec<u64> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    ids.iter()
        .map(|id| {
            for b in id.to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x100_0000_01b3);
            }
            h
        })
        .collect()
}

/// The session index of every request (in trace order), by the rule above.
pub fn sessions_of(reqs: &[TraceRequest]) -> Vec<usize> {
    let mut by_full: HashMap<(usize, u64), usize> = HashMap::new();
    let mut next = 0;
    let mut out = Vec::with_capacity(reqs.len());
    for r in reqs {
        let prefixes = chain(&r.hash_ids);
        let found = (1..=prefixes.len())
            .rev()
            .find_map(|k| by_full.get(&(k, prefixes[k - 1])).copied());
        let s = found.unwrap_or_else(|| {
            next += 1;
            next - 1
        });
        if let Some(last) = prefixes.last() {
            by_full.insert((prefixes.len(), *last), s);
        }
        out.push(s);
    }
    out
}

fn base36(mut n: u64, out: &mut String) {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut buf = [0u8; 13];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = DIGITS[(n % 36) as usize];
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.extend(buf[i..].iter().map(|b| char::from(*b)));
}

/// The prompt text of a request: `input_length` words, block by block.
pub fn prompt(r: &TraceRequest) -> String {
    let total = usize::try_from(r.input_length).unwrap_or(usize::MAX).max(1);
    let mut text = String::with_capacity(total * 9);
    let mut words = 0;
    'blocks: for id in &r.hash_ids {
        for k in 0..BLOCK_TOKENS as u64 {
            if words == total {
                break 'blocks;
            }
            if words > 0 {
                text.push(' ');
            }
            text.push('x');
            base36(*id, &mut text);
            text.push('_');
            base36(k, &mut text);
            words += 1;
        }
    }
    // A trace whose ids cover fewer tokens than input_length: pad uniquely.
    while words < total {
        text.push_str(if words > 0 { " pad" } else { "pad" });
        base36(words as u64, &mut text);
        words += 1;
    }
    text
}

/// Builds a plan: sessions by the rule above; times divided by `speedup`;
/// closed loop think times capped at `max_think` seconds.
pub fn plan(reqs: &[TraceRequest], pacing: Pacing, speedup: f64, max_think: f64) -> Plan {
    let speedup = if speedup > 0.0 { speedup } else { 1.0 };
    let ids = sessions_of(reqs);
    let mut sessions: Vec<Session> = Vec::new();
    let mut last_ts: Vec<u64> = Vec::new();
    for (r, s) in reqs.iter().zip(ids) {
        let t = r.timestamp as f64 / 1000.0 / speedup;
        if s == sessions.len() {
            sessions.push(Session {
                id: format!("mooncake-{s}"),
                start: t,
                steps: Vec::new(),
                carry_history: false,
            });
            last_ts.push(r.timestamp);
        }
        let delay = match pacing {
            Pacing::Open => t - sessions[s].start,
            Pacing::Closed if sessions[s].steps.is_empty() => 0.0,
            Pacing::Closed => {
                ((r.timestamp.saturating_sub(last_ts[s])) as f64 / 1000.0 / speedup).min(max_think)
            }
        };
        last_ts[s] = r.timestamp;
        let call = Call {
            prompt: prompt(r),
            max_tokens: u32::try_from(r.output_length.max(1)).unwrap_or(u32::MAX),
        };
        sessions[s].steps.push(Step {
            delay,
            calls: vec![call],
        });
    }
    Plan { sessions, pacing }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ts: u64, ids: &[u64], input: u64) -> TraceRequest {
        TraceRequest {
            timestamp: ts,
            input_length: input,
            output_length: 4,
            hash_ids: ids.to_vec(),
        }
    }

    #[test]
    fn later_turns_extend_a_whole_earlier_request() {
        let reqs = vec![
            req(0, &[1, 2], 1000),
            req(1, &[3], 300),
            req(2, &[1, 2, 4], 1500),    // extends request 0
            req(3, &[1, 5], 900),        // shares only block 1: new session
            req(4, &[1, 2, 4, 6], 2000), // extends request 2 (longest)
            req(5, &[3], 300),           // repeats request 1 exactly: same session
        ];
        assert_eq!(sessions_of(&reqs), vec![0, 1, 0, 2, 0, 1]);
    }

    #[test]
    fn prompts_share_blocks_exactly_when_ids_do() {
        let a = prompt(&req(0, &[7, 8], 700));
        let b = prompt(&req(0, &[7, 9], 700));
        let wa: Vec<&str> = a.split_whitespace().collect();
        let wb: Vec<&str> = b.split_whitespace().collect();
        assert_eq!(wa.len(), 700);
        assert_eq!(wa[..512], wb[..512]);
        assert!(wa[512..].iter().zip(&wb[512..]).all(|(x, y)| x != y));
        // Padding when the ids do not cover the length.
        assert_eq!(prompt(&req(0, &[1], 600)).split_whitespace().count(), 600);
    }

    #[test]
    fn closed_and_open_pacing() {
        let reqs = vec![req(1000, &[1], 10), req(61_000, &[1, 2], 600)];
        let closed = plan(&reqs, Pacing::Closed, 2.0, 5.0);
        assert_eq!(closed.sessions.len(), 1);
        assert_eq!(closed.sessions[0].start, 0.5);
        assert_eq!(closed.sessions[0].steps[1].delay, 5.0); // 30 s capped
        let open = plan(&reqs, Pacing::Open, 2.0, 5.0);
        assert_eq!(open.sessions[0].steps[1].delay, 30.0);
    }

    #[test]
    fn parses_the_format() {
        let text = "{\"timestamp\": 5, \"input_length\": 10, \"output_length\": 2, \"hash_ids\": [1]}\n\n{\"timestamp\": 1, \"input_length\": 3, \"output_length\": 1, \"hash_ids\": []}\n";
        let r = parse(text).unwrap_or_default();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].timestamp, 1);
        assert!(parse("{").is_err());
    }
}
