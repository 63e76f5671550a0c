//! Tokenisation, deterministic and cheap: a token is a run of non-whitespace
//! characters, its id the 32-bit FNV-1a hash of its bytes. Identical prompt
//! text therefore gives identical tokens and identical KV blocks. Real
//! tokenisers give 1.3–1.5 tokens per English word; this one gives one —
//! a simulator needs determinism, not fidelity of counts.

/// FNV-1a, 32-bit.
pub fn fnv32(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

pub fn tokenize(text: &str) -> Vec<u32> {
    text.split_whitespace()
        .map(|w| fnv32(w.as_bytes()))
        .collect()
}

/// Hashes of the full blocks of a token sequence, chained: block `i`'s hash
/// covers every token before it, as vLLM's prefix-cache block hashes do.
pub fn block_hashes(tokens: &[u32], block_size: usize) -> Vec<u64> {
    let mut out = Vec::with_capacity(tokens.len() / block_size.max(1));
    extend_block_hashes(&mut out, tokens, block_size);
    out
}

/// Appends to `hashes` (those of the first full blocks of `tokens`) the
/// hashes of the blocks of `tokens` that have filled since: vLLM hashes a
/// request's blocks as its tokens grow, generated tokens included.
pub fn extend_block_hashes(hashes: &mut Vec<u64>, tokens: &[u32], block_size: usize) {
    let bs = block_size.max(1);
    let mut h: u64 = hashes.last().copied().unwrap_or(0xcbf2_9ce4_8422_2325);
    for block in tokens[(hashes.len() * bs).min(tokens.len())..].chunks_exact(bs) {
        for t in block {
            for b in t.to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        hashes.push(h);
    }
}

const WORDS: [&str; 32] = [
    "the",
    "model",
    "answers",
    "with",
    "a",
    "simulated",
    "token",
    "stream",
    "of",
    "plain",
    "words",
    "that",
    "carry",
    "no",
    "meaning",
    "but",
    "arrive",
    "at",
    "the",
    "pace",
    "an",
    "engine",
    "would",
    "keep",
    "under",
    "load",
    "and",
    "so",
    "let",
    "schedulers",
    "be",
    "measured",
];

/// The `i`-th generated word of an answer to a prompt with hash `seed`.
pub fn word(seed: u64, i: usize) -> &'static str {
    let x = seed.wrapping_add((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let x = (x ^ (x >> 31)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    WORDS[(x >> 59) as usize % WORDS.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_text_same_blocks() {
        let a = tokenize("one two three four five");
        assert_eq!(a, tokenize("one  two\nthree four five"));
        let b = tokenize("one two three four six");
        assert_eq!(block_hashes(&a, 2)[..2], block_hashes(&b, 2)[..2]);
        assert_eq!(block_hashes(&a, 2).len(), 2);
        assert_ne!(block_hashes(&a, 5), block_hashes(&b, 5));
        assert_eq!(word(7, 3), word(7, 3));
    }

    #[test]
    fn hashes_extended_as_tokens_grow_equal_those_computed_at_once() {
        let tokens: Vec<u32> = (0..23).collect();
        let mut grown = Vec::new();
        for n in 0..=tokens.len() {
            extend_block_hashes(&mut grown, &tokens[..n], 4);
            assert_eq!(grown, block_hashes(&tokens[..n], 4));
        }
        assert_eq!(grown.len(), 5);
    }
}
