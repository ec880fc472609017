//! The pool of physical KV blocks: ref counts, an index-linked LRU free list, and the hash index of
//! cached full blocks used by automatic prefix caching.
//!
//! Free blocks form a doubly linked list threaded through the block array (no allocation per
//! operation). Blocks are taken from the head and returned at the tail, so the head is always the
//! least recently freed block: with prefix caching on, that is the cached block evicted first.

use std::collections::HashMap;

/// Physical block index into the paged cache tensors.
pub type BlockId = u32;
/// Chained hash of a full block: hash(parent block hash, this block's token ids).
pub type BlockHash = u64;

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct BlockMeta {
    ref_cnt: u32,
    /// Set once the block is full and registered in the prefix cache.
    hash: Option<BlockHash>,
    prev_free: u32,
    next_free: u32,
    in_free_list: bool,
}

/// Owner of every block's bookkeeping; the tensors themselves live in the model's `KvCache`.
#[derive(Debug)]
pub struct BlockPool {
    blocks: Vec<BlockMeta>,
    free_head: u32,
    free_tail: u32,
    num_free: usize,
    enable_caching: bool,
    cached: HashMap<BlockHash, BlockId>,
}

impl BlockPool {
    /// A pool of `num_blocks` blocks, all free, none cached.
    pub fn new(num_blocks: usize, enable_caching: bool) -> Self {
        assert!(num_blocks < NIL as usize, "too many KV blocks");
        let n = num_blocks as u32;
        let blocks = (0..n)
            .map(|i| BlockMeta {
                ref_cnt: 0,
                hash: None,
                prev_free: if i == 0 { NIL } else { i - 1 },
                next_free: if i + 1 == n { NIL } else { i + 1 },
                in_free_list: true,
            })
            .collect();
        Self {
            blocks,
            free_head: if n == 0 { NIL } else { 0 },
            free_tail: if n == 0 { NIL } else { n - 1 },
            num_free: num_blocks,
            enable_caching,
            cached: HashMap::new(),
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks not referenced by any request (cached-but-unused blocks count as free).
    pub fn num_free_blocks(&self) -> usize {
        self.num_free
    }

    pub fn enable_caching(&self) -> bool {
        self.enable_caching
    }

    /// Fraction of blocks in use, 0.0..=1.0.
    pub fn usage(&self) -> f64 {
        if self.blocks.is_empty() {
            return 0.0;
        }
        1.0 - self.num_free as f64 / self.blocks.len() as f64
    }

    pub fn ref_cnt(&self, id: BlockId) -> u32 {
        self.blocks[id as usize].ref_cnt
    }

    /// Number of full blocks registered in the prefix cache (in use or free).
    pub fn num_cached_blocks(&self) -> usize {
        self.cached.len()
    }

    /// Takes `n` blocks from the LRU end of the free list, evicting their cache entries.
    /// Returns None (taking nothing) when fewer than `n` are free.
    pub fn get_new_blocks(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.num_free {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let id = self.free_head;
            self.unlink(id);
            let meta = &mut self.blocks[id as usize];
            if let Some(h) = meta.hash.take() {
                if self.cached.get(&h) == Some(&id) {
                    self.cached.remove(&h);
                }
            }
            meta.ref_cnt = 1;
            out.push(id);
        }
        Some(out)
    }

    /// Looks up a cached full block by its chained hash.
    pub fn get_cached_block(&self, hash: BlockHash) -> Option<BlockId> {
        if !self.enable_caching {
            return None;
        }
        self.cached.get(&hash).copied()
    }

    /// Adds a reference to each block (prefix-cache hits); free ones leave the free list.
    pub fn touch(&mut self, ids: &[BlockId]) {
        for &id in ids {
            if self.blocks[id as usize].ref_cnt == 0 {
                self.unlink(id);
            }
            self.blocks[id as usize].ref_cnt += 1;
        }
    }

    /// Registers a full block under `hash`. The first block registered for a hash keeps it.
    pub fn cache_full_block(&mut self, id: BlockId, hash: BlockHash) {
        if !self.enable_caching || self.blocks[id as usize].hash.is_some() {
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(hash) {
            e.insert(id);
            self.blocks[id as usize].hash = Some(hash);
        }
    }

    /// Drops one reference from each block, in the given order; blocks reaching zero go to the
    /// tail of the free list (so callers pass a sequence's blocks tail-first: its last blocks
    /// are then evicted before its shared prefix).
    pub fn free_blocks(&mut self, ids: impl IntoIterator<Item = BlockId>) {
        for id in ids {
            let meta = &mut self.blocks[id as usize];
            assert!(meta.ref_cnt > 0, "double free of KV block {id}");
            meta.ref_cnt -= 1;
            if meta.ref_cnt == 0 {
                self.push_tail(id);
            }
        }
    }

    /// Forgets every cached hash (e.g. after weights change). Blocks in use are untouched.
    pub fn reset_prefix_cache(&mut self) {
        self.cached.clear();
        for b in &mut self.blocks {
            b.hash = None;
        }
    }

    fn unlink(&mut self, id: BlockId) {
        let (prev, next) = {
            let m = &self.blocks[id as usize];
            debug_assert!(m.in_free_list);
            (m.prev_free, m.next_free)
        };
        if prev == NIL {
            self.free_head = next;
        } else {
            self.blocks[prev as usize].next_free = next;
        }
        if next == NIL {
            self.free_tail = prev;
        } else {
            self.blocks[next as usize].prev_free = prev;
        }
        let m = &mut self.blocks[id as usize];
        m.prev_free = NIL;
        m.next_free = NIL;
        m.in_free_list = false;
        self.num_free -= 1;
    }

    fn push_tail(&mut self, id: BlockId) {
        let tail = self.free_tail;
        {
            let m = &mut self.blocks[id as usize];
            debug_assert!(!m.in_free_list);
            m.prev_free = tail;
            m.next_free = NIL;
            m.in_free_list = true;
        }
        if tail == NIL {
            self.free_head = id;
        } else {
            self.blocks[tail as usize].next_free = id;
        }
        self.free_tail = id;
        self.num_free += 1;
    }

    /// Free-list order from LRU head to tail (tests and debugging).
    pub fn free_list(&self) -> Vec<BlockId> {
        let mut out = Vec::with_capacity(self.num_free);
        let mut cur = self.free_head;
        while cur != NIL {
            out.push(cur);
            cur = self.blocks[cur as usize].next_free;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_from_head_returns_to_tail() {
        let mut p = BlockPool::new(4, false);
        let a = p.get_new_blocks(2).unwrap();
        assert_eq!(a, vec![0, 1]);
        assert_eq!(p.num_free_blocks(), 2);
        assert!(p.get_new_blocks(3).is_none());
        assert_eq!(p.num_free_blocks(), 2, "a failed request takes nothing");
        p.free_blocks(a.iter().rev().copied());
        assert_eq!(p.free_list(), vec![2, 3, 1, 0]);
        assert_eq!(p.usage(), 0.0);
    }

    #[test]
    fn ref_counts_and_cache_eviction() {
        let mut p = BlockPool::new(3, true);
        let a = p.get_new_blocks(1).unwrap()[0];
        p.cache_full_block(a, 42);
        assert_eq!(p.get_cached_block(42), Some(a));
        p.touch(&[a]);
        assert_eq!(p.ref_cnt(a), 2);
        p.free_blocks([a]);
        assert_eq!(p.num_free_blocks(), 2);
        p.free_blocks([a]);
        assert_eq!(p.num_free_blocks(), 3);
        // still cached while free; a hit revives it without allocation
        assert_eq!(p.get_cached_block(42), Some(a));
        p.touch(&[a]);
        assert_eq!(p.num_free_blocks(), 2);
        p.free_blocks([a]);
        // a is now at the tail (most recent); take all three: a is evicted last and loses its hash
        let all = p.get_new_blocks(3).unwrap();
        assert_eq!(*all.last().unwrap(), a);
        assert_eq!(p.get_cached_block(42), None);
        assert_eq!(p.num_cached_blocks(), 0);
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_is_caught() {
        let mut p = BlockPool::new(2, false);
        let a = p.get_new_blocks(1).unwrap();
        p.free_blocks(a.clone());
        p.free_blocks(a);
    }
}
