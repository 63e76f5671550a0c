//! The stable hash. Every service and every version must agree on it, so it is
//! spelled out here and pinned by test vectors — never Rust's randomised
//! `DefaultHasher`.
//!
//! `stable_hash(bytes) = fmix64(fnv1a64(bytes))`:
//! - FNV-1a, 64-bit: offset basis `0xcbf29ce484222325`, prime `0x100000001b3`,
//!   one round per byte (`h ^= b; h *= prime`).
//! - then MurmurHash3's 64-bit finaliser `fmix64`, so that every output bit
//!   depends on every input bit (FNV alone mixes the low bits poorly, and the
//!   shard is taken modulo a small number).
//!
//! A session's shard is `stable_hash(key) % shards`.

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64 over `bytes`, continuing from `state` (start with [`fnv_start`]).
#[inline]
pub fn fnv1a64_update(mut state: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        state ^= u64::from(b);
        state = state.wrapping_mul(FNV_PRIME);
    }
    state
}

/// The FNV-1a offset basis, the state before any byte.
#[inline]
pub const fn fnv_start() -> u64 {
    FNV_OFFSET
}

/// MurmurHash3's 64-bit finaliser.
#[inline]
pub const fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The stable hash of a byte string.
#[inline]
pub fn stable_hash(bytes: &[u8]) -> u64 {
    fmix64(fnv1a64_update(FNV_OFFSET, bytes))
}

/// The shard a session hash belongs to. `shards` of 0 is treated as 1.
#[inline]
pub fn shard_of(session_hash: u64, shards: u16) -> u16 {
    let n = u64::from(shards.max(1));
    // The remainder is < n <= u16::MAX, so the cast is lossless.
    (session_hash % n) as u16
}

/// Combines two hashes into one, for chained block hashes and rendezvous
/// hashing: `mix(a, b) = fmix64((a * 0x100000001b3) ^ b)`, wrapping.
#[inline]
pub const fn mix(a: u64, b: u64) -> u64 {
    fmix64(a.wrapping_mul(FNV_PRIME) ^ b)
}

/// A random 64-bit number from the standard library's per-process random
/// keys and the clock: for epochs and call-id bases, not for cryptography.
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(nanos);
    h.finish()
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// These vectors pin the function: if one changes, every deployed shard
    /// assignment changes with it. Do not "fix" them; bump the protocol instead.
    #[test]
    fn test_vectors_are_stable() {
        assert_eq!(fnv1a64_update(fnv_start(), b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64_update(fnv_start(), b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(
            fnv1a64_update(fnv_start(), b"foobar"),
            0x8594_4171_f739_67e8
        );
        assert_eq!(stable_hash(b""), fmix64(0xcbf2_9ce4_8422_2325));
        assert_eq!(stable_hash(b"session-1"), stable_hash(b"session-1"));
        assert_ne!(stable_hash(b"session-1"), stable_hash(b"session-2"));
    }

    #[test]
    fn shards_are_spread_evenly() {
        let shards = 16u16;
        let mut counts = [0u32; 16];
        for i in 0..16_000 {
            let key = format!("user-{i}");
            counts[usize::from(shard_of(stable_hash(key.as_bytes()), shards))] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven shard spread: {counts:?}");
        }
    }

    #[test]
    fn zero_shards_means_one() {
        assert_eq!(shard_of(12345, 0), 0);
    }
}

/// Bytes of prompt text per prefix block (about 64 tokens of English text).
pub const PROMPT_BLOCK_BYTES: usize = 256;
/// Most blocks hashed per prompt (the first 128 KiB of text).
pub const MAX_PROMPT_BLOCKS: usize = 512;

/// Chained hashes of a prompt's text in fixed-size blocks: block `i` covers
/// bytes `[256·i, 256·(i+1))` and its hash is
/// `h_i = mix(h_{i−1}, stable_hash(block_i))` with `h_{−1} = 0`, so equal
/// hashes mean equal prefixes. Only full blocks count (a partial last block
/// is still being written by the conversation), at most 512 of them.
pub fn prompt_blocks(text: &[u8]) -> Vec<u64> {
    let mut out = Vec::with_capacity((text.len() / PROMPT_BLOCK_BYTES).min(MAX_PROMPT_BLOCKS));
    let mut h = 0u64;
    for block in text
        .chunks_exact(PROMPT_BLOCK_BYTES)
        .take(MAX_PROMPT_BLOCKS)
    {
        h = mix(h, stable_hash(block));
        out.push(h);
    }
    out
}

/// The block hashes engine-sim's prefix cache uses (and publishes in its KV
/// events), for a prompt as engine-sim renders it: a token is a run of
/// non-whitespace characters, its id the 32-bit FNV-1a of its bytes; block
/// `i` covers tokens `[bs·i, bs·(i+1))` and its hash is the 64-bit FNV-1a
/// state after every token byte (little-endian) up to the block's end,
/// chained from the offset basis. Full blocks only, at most 512.
pub fn sim_token_blocks(text: &str, block_size: usize) -> Vec<u64> {
    let bs = block_size.max(1);
    let mut out = Vec::new();
    let mut h = FNV_OFFSET;
    let mut in_block = 0;
    for word in text.split_whitespace() {
        let mut t: u32 = 0x811c_9dc5;
        for b in word.as_bytes() {
            t ^= u32::from(*b);
            t = t.wrapping_mul(0x0100_0193);
        }
        h = fnv1a64_update(h, &t.to_le_bytes());
        in_block += 1;
        if in_block == bs {
            out.push(h);
            in_block = 0;
            if out.len() == MAX_PROMPT_BLOCKS {
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod block_tests {
    use super::*;

    #[test]
    fn blocks_chain_over_the_prefix() {
        let a = vec![b'a'; 1000];
        let mut b = a.clone();
        b[600] = b'b';
        let (ha, hb) = (prompt_blocks(&a), prompt_blocks(&b));
        assert_eq!(ha.len(), 3);
        assert_eq!(ha[..2], hb[..2]);
        assert_ne!(ha[2], hb[2]);
        // The same block content at another position hashes differently.
        assert_ne!(ha[0], ha[1]);
        assert!(prompt_blocks(&a[..255]).is_empty());
    }
}

/// A `Hasher` for maps keyed by `u64`s (session hashes, call ids): one
/// `fmix64` instead of SipHash. Not DoS-resistant, so only for keys the
/// system derives itself, never raw client input.
#[derive(Clone, Copy, Debug, Default)]
pub struct U64Hasher(u64);

impl std::hash::Hasher for U64Hasher {
    fn finish(&self) -> u64 {
        fmix64(self.0)
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0 = fnv1a64_update(self.0 ^ FNV_OFFSET, bytes);
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Builds [`U64Hasher`]s.
pub type BuildU64Hasher = std::hash::BuildHasherDefault<U64Hasher>;
