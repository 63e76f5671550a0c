//! The prefix KV cache, in blocks of `block_size` tokens.
//!
//! Full prompt blocks are identified by their chained hash and shared: a
//! prompt whose leading blocks are cached does not prefill them. Blocks used
//! by running sequences are pinned (reference-counted); unpinned hashed
//! blocks stay cached until space is needed, then the least recently used
//! goes first. A block that is not (yet) full is private to its sequence;
//! once full and computed it is hashed and shared, whether it holds prompt or
//! generated tokens (vLLM caches every full block).

use std::collections::{BTreeMap, HashMap};

#[derive(Debug)]
struct Cached {
    refs: u32,
    tick: u64,
}

/// What the cache did, for KV cache events (vLLM's `BlockStored`,
/// `BlockRemoved`, `AllBlocksCleared`). Recorded only when asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheEvent {
    Stored {
        hash: u64,
        parent: Option<u64>,
        tokens: Vec<u32>,
    },
    Removed {
        hash: u64,
    },
    Cleared,
}

#[derive(Debug)]
pub struct KvCache {
    capacity: usize,
    blocks: HashMap<u64, Cached>,
    /// Unpinned hashed blocks by last use.
    lru: BTreeMap<u64, u64>,
    pinned: usize,
    private: usize,
    tick: u64,
    pub evictions: u64,
    /// Events since the last [`KvCache::take_events`], when recording.
    events: Option<Vec<CacheEvent>>,
}

impl KvCache {
    pub fn new(capacity_blocks: usize) -> Self {
        Self {
            capacity: capacity_blocks,
            blocks: HashMap::new(),
            lru: BTreeMap::new(),
            pinned: 0,
            private: 0,
            tick: 0,
            evictions: 0,
            events: None,
        }
    }

    /// Starts recording [`CacheEvent`]s.
    pub fn record_events(&mut self) {
        self.events.get_or_insert_with(Vec::new);
    }

    /// The events recorded since the last call (none when not recording).
    pub fn take_events(&mut self) -> Vec<CacheEvent> {
        self.events.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Drops every cached block, as vLLM's `reset_prefix_cache`: refused
    /// (false) while any block is in use by a sequence.
    pub fn clear(&mut self) -> bool {
        if self.in_use() > 0 {
            return false;
        }
        self.blocks.clear();
        self.lru.clear();
        if let Some(ev) = &mut self.events {
            ev.push(CacheEvent::Cleared);
        }
        true
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Blocks in use by sequences (what vLLM reports as KV cache usage).
    pub fn in_use(&self) -> usize {
        self.pinned + self.private
    }

    /// Hashed blocks held, pinned or not.
    pub fn cached(&self) -> usize {
        self.blocks.len()
    }

    /// Every cached block's hash, in no order.
    pub fn hashes(&self) -> Vec<u64> {
        self.blocks.keys().copied().collect()
    }

    pub fn contains(&self, hash: u64) -> bool {
        self.blocks.contains_key(&hash)
    }

    /// Blocks free for a new allocation: those no sequence holds, cached
    /// ones nobody pins included (vLLM's free block count).
    pub fn free(&self) -> usize {
        self.capacity.saturating_sub(self.in_use())
    }

    /// How many of `hashes` are cached and pinned by nobody: taking them
    /// removes them from the free blocks.
    pub fn unpinned(&self, hashes: &[u64]) -> usize {
        hashes
            .iter()
            .filter(|h| self.blocks.get(h).is_some_and(|b| b.refs == 0))
            .count()
    }

    /// How many of `hashes`, from the start, are cached.
    pub fn cached_prefix(&self, hashes: &[u64]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.blocks.contains_key(h))
            .count()
    }

    fn used(&self) -> usize {
        self.blocks.len() + self.private
    }

    /// Evicts unpinned blocks, least recently used first, until `n` more fit.
    fn make_room(&mut self, n: usize) -> bool {
        while self.used() + n > self.capacity {
            let Some((&tick, &hash)) = self.lru.iter().next() else {
                return false;
            };
            self.lru.remove(&tick);
            self.blocks.remove(&hash);
            self.evictions += 1;
            if let Some(ev) = &mut self.events {
                ev.push(CacheEvent::Removed { hash });
            }
        }
        true
    }

    /// Pins a cached block. False if it is not cached.
    pub fn pin(&mut self, hash: u64) -> bool {
        let Some(b) = self.blocks.get_mut(&hash) else {
            return false;
        };
        if b.refs == 0 {
            self.lru.remove(&b.tick);
            self.pinned += 1;
        }
        b.refs += 1;
        true
    }

    /// Unpins a block; at no pins it becomes evictable (most recently used).
    pub fn unpin(&mut self, hash: u64) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(b) = self.blocks.get_mut(&hash) {
            b.refs = b.refs.saturating_sub(1);
            if b.refs == 0 {
                self.pinned -= 1;
                b.tick = tick;
                self.lru.insert(tick, hash);
            }
        }
    }

    /// Turns one of a sequence's private blocks into the shared, pinned block
    /// `hash` (its tokens are now full and computed).
    pub fn publish(&mut self, hash: u64) {
        self.store(hash, None, &[]);
    }

    /// [`Self::publish`], recording a `Stored` event (with the block's
    /// parent and tokens) when the block is new to the cache.
    pub fn store(&mut self, hash: u64, parent: Option<u64>, tokens: &[u32]) {
        self.private = self.private.saturating_sub(1);
        if !self.pin(hash) {
            self.blocks.insert(hash, Cached { refs: 1, tick: 0 });
            self.pinned += 1;
            if let Some(ev) = &mut self.events {
                ev.push(CacheEvent::Stored {
                    hash,
                    parent,
                    tokens: tokens.to_vec(),
                });
            }
        }
    }

    pub fn alloc_private(&mut self, n: usize) -> bool {
        if !self.make_room(n) {
            return false;
        }
        self.private += n;
        true
    }

    pub fn free_private(&mut self, n: usize) {
        self.private = self.private.saturating_sub(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_evicts_the_least_recently_released() {
        let mut kv = KvCache::new(3);
        for h in [1, 2, 3] {
            assert!(kv.alloc_private(1));
            kv.publish(h);
        }
        kv.unpin(2);
        kv.unpin(1);
        kv.unpin(3);
        // Pinned nothing; 2 was released first, so it goes first.
        assert!(kv.alloc_private(1));
        assert!(!kv.contains(2) && kv.contains(1) && kv.contains(3));
        assert!(kv.alloc_private(1));
        assert!(!kv.contains(1) && kv.contains(3));
        assert_eq!(kv.evictions, 2);
    }

    #[test]
    fn events_follow_stores_evictions_and_clears() {
        let mut kv = KvCache::new(2);
        kv.record_events();
        assert!(kv.alloc_private(1));
        kv.store(1, None, &[5, 6]);
        assert!(kv.alloc_private(1));
        kv.store(2, Some(1), &[7, 8]);
        kv.unpin(1);
        kv.unpin(2);
        assert!(kv.alloc_private(1)); // evicts 1
        kv.store(1, None, &[5, 6]);
        let ev = kv.take_events();
        assert_eq!(
            ev,
            vec![
                CacheEvent::Stored {
                    hash: 1,
                    parent: None,
                    tokens: vec![5, 6]
                },
                CacheEvent::Stored {
                    hash: 2,
                    parent: Some(1),
                    tokens: vec![7, 8]
                },
                CacheEvent::Removed { hash: 1 },
                CacheEvent::Stored {
                    hash: 1,
                    parent: None,
                    tokens: vec![5, 6]
                },
            ]
        );
        assert!(!kv.clear(), "block 1 is pinned");
        kv.unpin(1);
        assert!(kv.clear());
        assert_eq!(kv.cached(), 0);
        assert_eq!(kv.take_events(), vec![CacheEvent::Cleared]);
    }

    #[test]
    fn pinned_blocks_are_never_evicted() {
        let mut kv = KvCache::new(2);
        assert!(kv.alloc_private(1));
        kv.publish(7);
        assert!(kv.alloc_private(1));
        assert!(!kv.alloc_private(1), "full of pinned and private blocks");
        assert!(kv.contains(7));
        assert_eq!(kv.in_use(), 2);
    }
}
