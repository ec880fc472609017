//! KV block accounting: which physical blocks each request owns, with automatic prefix caching.
//!
//! No tensor code here: the `model`'s `KvCache` holds the data, this module decides which block ids
//! a request's tokens live in (vLLM v1's `KVCacheManager`). With prefix caching enabled, every full
//! block gets a chained hash (parent hash + its token ids) once its K/V is computed; a new request
//! whose prompt starts with the same tokens reuses those blocks (`get_computed_blocks`), and free
//! cached blocks are evicted LRU-first only when new blocks are needed.

mod block_pool;

pub use block_pool::{BlockHash, BlockId, BlockPool};

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

/// What the KV manager needs to know about a request.
pub trait KvRequest {
    fn request_id(&self) -> &str;
    /// Prompt followed by the generated tokens (every token whose K/V may be computed).
    fn all_token_ids(&self) -> &[u32];
    /// Tokens whose K/V is already in this request's blocks.
    fn num_computed_tokens(&self) -> usize;
}

#[derive(Debug, Default)]
struct ReqBlocks {
    blocks: Vec<BlockId>,
    /// Chained hashes of this request's full blocks registered so far (prefix caching only).
    hashes: Vec<BlockHash>,
}

/// Per-request block tables over one `BlockPool`.
#[derive(Debug)]
pub struct KVCacheManager {
    pool: BlockPool,
    block_size: usize,
    reqs: HashMap<String, ReqBlocks>,
    /// Prefix-cache lookups and hits, in tokens (for the hit-rate metric).
    pub prefix_queries: u64,
    pub prefix_hits: u64,
}

impl KVCacheManager {
    pub fn new(num_blocks: usize, block_size: usize, enable_prefix_caching: bool) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        Self {
            pool: BlockPool::new(num_blocks, enable_prefix_caching),
            block_size,
            reqs: HashMap::new(),
            prefix_queries: 0,
            prefix_hits: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.pool.num_blocks()
    }

    pub fn num_free_blocks(&self) -> usize {
        self.pool.num_free_blocks()
    }

    /// Fraction of the pool in use, 0.0..=1.0 (`vllm:kv_cache_usage_perc`).
    pub fn usage(&self) -> f64 {
        self.pool.usage()
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Blocks needed to hold `num_tokens` tokens.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// The request's block table (empty when it owns none).
    pub fn block_ids(&self, request_id: &str) -> &[BlockId] {
        self.reqs
            .get(request_id)
            .map(|r| r.blocks.as_slice())
            .unwrap_or(&[])
    }

    /// Ids of requests that currently own blocks.
    pub fn owners(&self) -> impl Iterator<Item = &str> {
        self.reqs.keys().map(String::as_str)
    }

    /// Longest run of cached full blocks matching the start of a new request's tokens, and the
    /// number of tokens they cover. The blocks are not referenced until `allocate_slots` takes
    /// them. At least the last token is always left to compute (its logits are needed).
    pub fn get_computed_blocks(&mut self, request: &dyn KvRequest) -> (Vec<BlockId>, usize) {
        if !self.pool.enable_caching() {
            return (Vec::new(), 0);
        }
        let tokens = request.all_token_ids();
        let max_blocks = tokens.len().saturating_sub(1) / self.block_size;
        let mut hits = Vec::new();
        let mut parent = None;
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let h = hash_block(parent, chunk);
            match self.pool.get_cached_block(h) {
                Some(id) => hits.push(id),
                None => break,
            }
            parent = Some(h);
        }
        let n = hits.len() * self.block_size;
        self.prefix_queries += tokens.len() as u64;
        self.prefix_hits += n as u64;
        (hits, n)
    }

    /// Makes room for `num_new_tokens` more tokens of `request` after its computed ones (and
    /// after `new_computed_blocks`, prefix hits from `get_computed_blocks`, which it takes).
    /// Returns the newly allocated blocks, or None -- taking nothing -- when the pool cannot
    /// cover it (the scheduler then preempts someone or waits).
    pub fn allocate_slots(
        &mut self,
        request: &dyn KvRequest,
        num_new_tokens: usize,
        new_computed_blocks: &[BlockId],
    ) -> Option<Vec<BlockId>> {
        let id = request.request_id();
        let have = self.reqs.get(id).map_or(0, |r| r.blocks.len());
        let num_computed =
            request.num_computed_tokens() + new_computed_blocks.len() * self.block_size;
        let required = self.blocks_for(num_computed + num_new_tokens);
        let num_new_blocks = required.saturating_sub(have + new_computed_blocks.len());
        // Hits sitting in the free list stop being free once taken.
        let evictable_hits = new_computed_blocks
            .iter()
            .filter(|&&b| self.pool.ref_cnt(b) == 0)
            .count();
        if num_new_blocks + evictable_hits > self.pool.num_free_blocks() {
            return None;
        }
        self.pool.touch(new_computed_blocks);
        let new_blocks = self.pool.get_new_blocks(num_new_blocks)?;
        let entry = self.reqs.entry(id.to_string()).or_default();
        entry.blocks.extend_from_slice(new_computed_blocks);
        entry.blocks.extend_from_slice(&new_blocks);
        // Hits are cached already: record their hashes so later blocks chain from them.
        self.cache_blocks(request, num_computed);
        Some(new_blocks)
    }

    /// Registers the request's full blocks covering its first `num_computed_tokens` tokens
    /// (whose K/V is in the cache) in the prefix cache. A no-op without prefix caching.
    pub fn cache_blocks(&mut self, request: &dyn KvRequest, num_computed_tokens: usize) {
        if !self.pool.enable_caching() {
            return;
        }
        let Some(entry) = self.reqs.get_mut(request.request_id()) else {
            return;
        };
        let tokens = request.all_token_ids();
        let num_full =
            (num_computed_tokens.min(tokens.len()) / self.block_size).min(entry.blocks.len());
        while entry.hashes.len() < num_full {
            let i = entry.hashes.len();
            let chunk = &tokens[i * self.block_size..(i + 1) * self.block_size];
            let h = hash_block(entry.hashes.last().copied(), chunk);
            self.pool.cache_full_block(entry.blocks[i], h);
            entry.hashes.push(h);
        }
    }

    /// Releases every block of the request (tail first, so a shared prefix outlives its tail in
    /// the LRU). Full computed blocks are registered in the prefix cache first. Idempotent.
    pub fn free(&mut self, request: &dyn KvRequest) {
        self.cache_blocks(request, request.num_computed_tokens());
        if let Some(entry) = self.reqs.remove(request.request_id()) {
            self.pool.free_blocks(entry.blocks.into_iter().rev());
        }
    }

    /// Drops every cached hash not in use; returns false if any block is still referenced
    /// (vLLM's `reset_prefix_cache`).
    pub fn reset_prefix_cache(&mut self) -> bool {
        if self.pool.num_free_blocks() != self.pool.num_blocks() {
            return false;
        }
        self.pool.reset_prefix_cache();
        for r in self.reqs.values_mut() {
            r.hashes.clear();
        }
        true
    }
}

/// Chained block hash: equal only for equal token runs from the sequence start.
pub fn hash_block(parent: Option<BlockHash>, token_ids: &[u32]) -> BlockHash {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    token_ids.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct R {
        id: String,
        toks: Vec<u32>,
        computed: usize,
    }
    impl KvRequest for R {
        fn request_id(&self) -> &str {
            &self.id
        }
        fn all_token_ids(&self) -> &[u32] {
            &self.toks
        }
        fn num_computed_tokens(&self) -> usize {
            self.computed
        }
    }
    fn req(id: &str, toks: Vec<u32>) -> R {
        R {
            id: id.into(),
            toks,
            computed: 0,
        }
    }

    #[test]
    fn allocate_is_all_or_nothing() {
        let mut m = KVCacheManager::new(4, 4, false);
        let mut a = req("a", (0..10).collect());
        let got = m.allocate_slots(&a, 10, &[]).unwrap();
        assert_eq!(got.len(), 3);
        a.computed = 10;
        // 10 + 7 = 17 tokens -> 5 blocks; only 1 free: nothing is taken
        assert!(m.allocate_slots(&a, 7, &[]).is_none());
        assert_eq!(m.num_free_blocks(), 1);
        assert_eq!(m.block_ids("a").len(), 3);
        // 2 more tokens fit in block 3's free slots
        assert_eq!(m.allocate_slots(&a, 2, &[]).unwrap().len(), 0);
        m.free(&a);
        assert_eq!(m.num_free_blocks(), 4);
        assert!(m.block_ids("a").is_empty());
        m.free(&a);
        assert_eq!(m.num_free_blocks(), 4, "free is idempotent");
    }

    #[test]
    fn prefix_hits_share_blocks_and_leave_last_token() {
        let mut m = KVCacheManager::new(8, 4, true);
        let mut a = req("a", (0..12).collect());
        m.allocate_slots(&a, 12, &[]).unwrap();
        a.computed = 12;
        m.cache_blocks(&a, 12);
        // same first 9 tokens: 2 full blocks hit
        let b = req("b", (0..9).chain(100..103).collect());
        let (hits, n) = m.get_computed_blocks(&b);
        assert_eq!(n, 8);
        assert_eq!(hits, m.block_ids("a")[..2].to_vec());
        let new = m.allocate_slots(&b, 12 - n, &hits).unwrap();
        assert_eq!(new.len(), 1);
        assert_eq!(m.pool().ref_cnt(hits[0]), 2);
        // identical 12-token prompt: only 2 blocks may hit (last token must be computed)
        let c = req("c", (0..12).collect());
        assert_eq!(m.get_computed_blocks(&c).1, 8);
        m.free(&a);
        m.free(&b);
        assert_eq!(m.num_free_blocks(), 8);
        // freed but still cached: a new request hits without recompute
        let d = req("d", (0..12).collect());
        let (hits, n) = m.get_computed_blocks(&d);
        assert_eq!(n, 8);
        m.allocate_slots(&d, 4, &hits).unwrap();
        assert_eq!(m.num_free_blocks(), 5);
        m.free(&d);
        assert!(m.reset_prefix_cache());
        assert_eq!(m.get_computed_blocks(&d).1, 0);
    }

    #[test]
    fn cached_free_blocks_are_evicted_when_needed() {
        let mut m = KVCacheManager::new(4, 2, true);
        let mut a = req("a", vec![1, 2, 3, 4, 5, 6, 7, 8]);
        m.allocate_slots(&a, 8, &[]).unwrap();
        a.computed = 8;
        m.free(&a);
        assert_eq!(m.pool().num_cached_blocks(), 4);
        let b = req("b", vec![9; 8]);
        assert_eq!(m.get_computed_blocks(&b).1, 0);
        assert_eq!(m.allocate_slots(&b, 8, &[]).unwrap().len(), 4);
        assert_eq!(m.pool().num_cached_blocks(), 0);
        assert_eq!(m.get_computed_blocks(&a).1, 0);
    }

    #[test]
    fn hits_in_free_list_count_against_capacity() {
        let mut m = KVCacheManager::new(3, 2, true);
        let mut a = req("a", vec![1, 2, 3, 4]);
        m.allocate_slots(&a, 4, &[]).unwrap();
        a.computed = 4;
        m.free(&a);
        // b hits a's first block (free, cached) and needs 2 new ones: 3 > 3 free? exactly fits
        let b = req("b", vec![1, 2, 7, 7, 7, 7]);
        let (hits, n) = m.get_computed_blocks(&b);
        assert_eq!((hits.len(), n), (1, 2));
        assert!(m.allocate_slots(&b, 4, &hits).is_some());
        assert_eq!(m.num_free_blocks(), 0);
        m.free(&b);
        // needs 3 new blocks plus the free hit: does not fit
        let c = req("c", vec![1, 2, 5, 5, 5, 5, 5, 5]);
        let (hits, n) = m.get_computed_blocks(&c);
        assert_eq!(n, 2);
        assert!(m.allocate_slots(&c, 6, &hits).is_none());
        assert_eq!(m.num_free_blocks(), 3);
    }
}
