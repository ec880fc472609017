//! Which CUDA attention kernel a step takes and how it splits contexts: the process-wide switches,
//! context splits and head tiles behind `attention_cuda`'s launches (host-only arithmetic, tested
//! without a GPU; re-exported by `attention_cuda`).

// The CPU build keeps the choices (their setters are public API and tested) but launches nothing.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use candle_core::{bail, DType, Result};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Head sizes the paged-attention kernel is instantiated for.
pub const SUPPORTED_HEAD_DIMS: [usize; 4] = [64, 80, 96, 128];

/// Sequences with at least this many query tokens in a step go to the tensor-core prefill kernel
/// (bf16/f16); shorter ones (decode, short chunks) to the paged-attention kernel.
pub const FLASH_MIN_QUERY_LEN: usize = 16;

/// Which kernel takes the sequences of >= `FLASH_MIN_QUERY_LEN` query tokens (process-wide).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillKernel {
    /// The tensor-core prefill kernel (bf16/f16; f32 always takes the paged kernel).
    TensorCore,
    /// The paged-attention kernel for every sequence.
    Paged,
}

pub(crate) static PAGED_PREFILL: AtomicBool = AtomicBool::new(false);

/// How a kernel splits contexts (grid.z): enough partitions that a launch has at least
/// `ctas_per_sm` CTAs per SM, each partition at least `min_partition` long (the unit is the
/// kernel's: key tiles for the paged kernel, keys for the decode kernel).
struct Split {
    ctas_per_sm: AtomicUsize,
    min_partition: AtomicUsize,
}

impl Split {
    const fn new(ctas_per_sm: usize, min_partition: usize) -> Self {
        Self {
            ctas_per_sm: AtomicUsize::new(ctas_per_sm),
            min_partition: AtomicUsize::new(min_partition),
        }
    }

    fn set(&self, ctas_per_sm: usize, min_partition: usize) {
        self.ctas_per_sm
            .store(ctas_per_sm.max(1), Ordering::Relaxed);
        self.min_partition
            .store(min_partition.max(1), Ordering::Relaxed);
    }

    fn get(&self) -> (usize, usize) {
        (
            self.ctas_per_sm.load(Ordering::Relaxed),
            self.min_partition.load(Ordering::Relaxed),
        )
    }
}

/// The paged kernel's split. 16:1 measured fastest or within 3% of it at batches 1-128 on an
/// H200 (decode, context 1k, `engine-bench --attn-splits`; days/gpu-engine/run9); the first
/// default was 2:2.
static PAGED_SPLIT: Split = Split::new(16, 1);

/// Sets the paged kernel's context split (defaults 16 CTAs per SM, 1 key tile per partition);
/// for side-by-side benchmarks.
pub fn set_paged_split(ctas_per_sm: usize, min_tiles: usize) {
    PAGED_SPLIT.set(ctas_per_sm, min_tiles);
}

/// The current context split: (CTAs per SM, key tiles per partition at least).
pub fn paged_split() -> (usize, usize) {
    PAGED_SPLIT.get()
}

/// Chooses the prefill attention kernel process-wide (`TensorCore` by default); for tests and
/// side-by-side benchmarks.
pub fn set_prefill_kernel(kernel: PrefillKernel) {
    PAGED_PREFILL.store(kernel == PrefillKernel::Paged, Ordering::Relaxed);
}

crate::switch! {
    /// Decode-only steps on the decode kernel (on, from `DECODE_MIN_SEQS` sequences) or on the
    /// general paged kernel (off).
    static DECODE_KERNEL = true;
}

crate::switch! {
    /// Split-context paged attention merges its partitions in each CTA group's last CTA (on, when the
    /// step carries split counters and there are at most 32 partitions) or in a separate combine
    /// launch (off, the default). Off by default: at the Qwen2.5-1.5B shape, batch 1, context 1k,
    /// attention over all layers took 1.81 ms with 17 two-tile partitions merged in the kernel and
    /// 1.60 ms with 11 three-tile ones, against 0.46 ms with 33 one-tile partitions and the
    /// combine launch (days/gpu-engine/run30); at the served default it never engaged at context
    /// 1k (33 partitions), and where it would (contexts up to 1k) it was never timed apart.
    static IN_KERNEL_COMBINE = false;
}

/// Turns the paged kernel's in-kernel combine on or off process-wide (side-by-side benchmarks).
pub fn set_in_kernel_combine(on: bool) {
    IN_KERNEL_COMBINE.set(on);
}

/// [`set_in_kernel_combine`] for launches on this thread (`None`: the process-wide value).
pub fn set_in_kernel_combine_on_this_thread(on: Option<bool>) {
    IN_KERNEL_COMBINE.set_on_this_thread(on);
}

/// Whether split launches on this thread merge their partitions in the kernel.
pub(crate) fn in_kernel_combine() -> bool {
    IN_KERNEL_COMBINE.on()
}

/// Turns the decode kernel (`paged_decode.cu`, for steps in which every sequence has one query
/// token) on or off process-wide (on by default); off, such steps take the general paged kernel.
/// For tests and side-by-side benchmarks.
pub fn set_decode_kernel(on: bool) {
    DECODE_KERNEL.set(on);
}

/// Whether decode-only steps may run on the decode kernel (the process-wide switch).
pub fn decode_kernel() -> bool {
    DECODE_KERNEL.process()
}

/// Fewest sequences a decode-only step needs to take the decode kernel: every decode step since
/// the decode kernel takes small batches with one query head per CTA. On an H200 (Qwen2.5-1.5B
/// shape, context 1k, attention over all layers, days/gpu-engine/run31) the paged kernel took
/// 0.456 / 0.715 ms at batch 1 / 8, the decode kernel with one head per CTA 0.340 / 0.618 (and with
/// its 8-head tiles 0.683 / 0.732); at 32 and 128 the 8-head tiles won, 1.457 and 5.178 ms against
/// 1.848 and 5.835. Before one-head tiles the bound was 16 (run9, run10).
pub const DECODE_MIN_SEQS: usize = 1;

static DECODE_MIN: AtomicUsize = AtomicUsize::new(DECODE_MIN_SEQS);

/// Sets the fewest sequences a decode-only step needs to take the decode kernel (default
/// `DECODE_MIN_SEQS`); for side-by-side benchmarks.
pub fn set_decode_min_seqs(n: usize) {
    DECODE_MIN.store(n, Ordering::Relaxed);
}

/// Overrides the decode-kernel choice for ops called on this thread: `Some(true)` takes it for
/// every decode-only step whatever its size, `Some(false)` never, `None` follows the switch and
/// `DECODE_MIN_SEQS`. For tests that compare kernels while other threads run.
pub fn set_decode_kernel_on_this_thread(on: Option<bool>) {
    DECODE_KERNEL.set_on_this_thread(on);
}

/// Whether a decode-only step of `num_seqs` sequences runs on the decode kernel.
pub(crate) fn takes_decode_kernel(num_seqs: usize) -> bool {
    DECODE_KERNEL
        .this_thread()
        .unwrap_or_else(|| decode_kernel() && num_seqs >= DECODE_MIN.load(Ordering::Relaxed))
}

/// The decode kernel's split: partitions of at least 128 keys (one 32-key chunk per warp of the
/// CTA), 4 CTAs per SM.
static DECODE_SPLIT: Split = Split::new(4, 128);

/// Sets the decode kernel's context split (defaults 4 CTAs per SM, partitions of >= 128 keys);
/// for side-by-side benchmarks.
pub fn set_decode_split(ctas_per_sm: usize, min_partition_keys: usize) {
    DECODE_SPLIT.set(ctas_per_sm, min_partition_keys);
}

/// The decode kernel's current context split: (CTAs per SM, keys per partition at least).
pub fn decode_split() -> (usize, usize) {
    DECODE_SPLIT.get()
}

crate::switch! {
    /// A split decode launch of at most `DECODE_CLUSTER_MAX` partitions and no more CTAs than SMs
    /// runs as thread-block clusters that merge their partitions through distributed shared
    /// memory (on) or writes partials for the combine launch (off). Only small launches: with more
    /// CTAs than fit at once, clusters measured slower than the combine (attention over all
    /// layers, context 1k, one head per CTA; days/gpu-engine/run31, run32): Qwen2.5-1.5B batch 8,
    /// 672 CTAs, 1.059 against 0.626 ms; CodeLlama-34B batch 1, 576 CTAs, 1.105 against 0.623.
    /// Qwen2.5-1.5B batch 1 (108 CTAs): 0.296 against 0.341 ms, and a graphed step 1.380 against
    /// 1.417 ms. The tensor-core kernel merges in clusters under the same rule: at Qwen2.5-1.5B
    /// batch 1 (2 KV heads x 9 partitions, a cluster of 9 per KV head) a graphed step took
    /// 1.238-1.239 ms against 1.290-1.293 with the combine launch (run63), CodeLlama-34B batch 1
    /// (8 x 9) 15.74 against 15.79 ms (run64).
    static DECODE_CLUSTER = true;
}

crate::switch! {
    /// The tensor-core decode kernel issues its first two key tiles (older keys, block table and
    /// lengths: none of them written by the kernel before it) before it waits for the kernel
    /// before, and this step's own key and the query after the wait (on); off, everything after
    /// the wait. It changes nothing but when the copies start, and only where that kernel may
    /// still run (programmatic dependent launch, in CUDA graphs too). H200, Qwen2.5-1.5B batch 1,
    /// graphs with programmatic edges (days/gpu-engine/run66): 1.219 ms a step against 1.253
    /// without; attention over all layers (eager, queued) 0.172 against 0.233 ms.
    pub(crate) static DECODE_EARLY_KV = true;
}

/// Turns the decode kernel's early K/V copies on or off process-wide (side-by-side benchmarks).
pub fn set_decode_early_kv(on: bool) {
    DECODE_EARLY_KV.set(on);
    #[cfg(feature = "cuda")]
    super::cuda_graph::invalidate_graphs();
}

/// [`set_decode_early_kv`] for launches on this thread (`None`: the process-wide value).
pub fn set_decode_early_kv_on_this_thread(on: Option<bool>) {
    DECODE_EARLY_KV.set_on_this_thread(on);
}

crate::switch! {
    /// A decode launch of at most one CTA per SM (one that leaves HBM mostly idle) fetches the
    /// weight ranges its caller names into L2 for the kernels after it (on), or does not (off).
    pub(crate) static WARM_L2 = true;
}

/// Most weight ranges one attention launch fetches into L2.
pub const WARM_RANGES: usize = 3;

/// Turns the L2 warm-up of short decode launches on or off process-wide (side-by-side
/// benchmarks).
pub fn set_warm_l2(on: bool) {
    WARM_L2.set(on);
}

/// [`set_warm_l2`] for launches on this thread (`None`: the process-wide value).
pub fn set_warm_l2_on_this_thread(on: Option<bool>) {
    WARM_L2.set_on_this_thread(on);
}

/// Most partitions a clustered decode launch merges (clusters above 8 CTAs are the hardware's
/// non-portable sizes, allowed per kernel).
pub const DECODE_CLUSTER_MAX: usize = 16;

/// Whether a decode launch split `splits` ways merges in clusters: the switch for a `small` launch
/// (at most one CTA per SM) or this thread's override (`Some(true)`: any launch whose partitions
/// fit a cluster).
pub(crate) fn takes_decode_cluster(small: bool, splits: usize) -> bool {
    (2..=DECODE_CLUSTER_MAX).contains(&splits)
        && DECODE_CLUSTER
            .this_thread()
            .unwrap_or_else(|| DECODE_CLUSTER.process() && small)
}

/// Turns the decode kernel's cluster merge on or off process-wide (side-by-side benchmarks).
pub fn set_decode_cluster(on: bool) {
    DECODE_CLUSTER.set(on);
}

/// [`set_decode_cluster`] for launches on this thread: `Some(true)` merges in clusters at any
/// batch size when the partitions fit one, `Some(false)` never, `None` follows the switch.
pub fn set_decode_cluster_on_this_thread(on: Option<bool>) {
    DECODE_CLUSTER.set_on_this_thread(on);
}

crate::switch! {
    /// Decode steps of bf16/f16 models with GQA groups of `FLASH_DECODE_MIN_GROUP` to 16 heads take
    /// the tensor-core decode kernel (`flash_decode.cu`, a whole group per CTA) when on; off, the
    /// CUDA-core kernel. An explicit head tile (`set_decode_head_tile`) keeps the CUDA-core kernel.
    /// H200, attention over all layers at context 1k (days/gpu-engine/run40): Qwen2.5-1.5B batch
    /// 1 / 8 / 32 / 128 0.293 / 0.357 / 0.631 / 1.674 ms against 0.299 / 0.632 / 1.482 / 3.906 on
    /// CUDA cores; CodeLlama-34B batch 1 / 16 0.550 / 1.608 against 0.760 / 5.028. Graphed
    /// steps: Qwen2.5-1.5B 1.369 / 1.769 / 2.048 / 3.228 ms against 1.433 / 1.976 / 3.187 / 5.387.
    static DECODE_TENSOR_CORES = true;
}

/// The tensor-core decode kernel's split: 2 CTAs per SM, partitions of at least 128 keys. H200,
/// context 1k (run37, attention over all layers): Qwen2.5-1.5B batch 32 0.609 ms against 0.771 at
/// 4:128, batch 128 1.669 against 1.567; CodeLlama-34B batch 16 1.543 against 1.935; batches 1
/// and 8 alike.
static FLASH_DECODE_SPLIT: Split = Split::new(2, 128);

/// Sets the tensor-core decode kernel's context split (defaults 2 CTAs per SM, partitions of >=
/// 128 keys); for side-by-side benchmarks.
pub fn set_flash_decode_split(ctas_per_sm: usize, min_partition_keys: usize) {
    FLASH_DECODE_SPLIT.set(ctas_per_sm, min_partition_keys);
}

/// The tensor-core decode kernel's current context split: (CTAs per SM, keys per partition at
/// least).
pub fn flash_decode_split() -> (usize, usize) {
    FLASH_DECODE_SPLIT.get()
}

/// Smallest GQA group the tensor-core decode kernel takes by default: its 16-row Q tile is mostly
/// padding below it (a judgement; the CUDA-core kernel's 4-head tile serves such groups whole).
pub const FLASH_DECODE_MIN_GROUP: usize = 4;
/// Largest GQA group the tensor-core decode kernel takes (one m16 tile of query rows).
const FLASH_DECODE_MAX_GROUP: usize = 16;
/// Keys per tile of the tensor-core decode kernel (`flash_decode::BN`).
const FLASH_DECODE_KEYS: usize = 64;

/// Turns the tensor-core decode kernel on or off process-wide (side-by-side benchmarks).
pub fn set_decode_tensor_cores(on: bool) {
    DECODE_TENSOR_CORES.set(on);
}

/// [`set_decode_tensor_cores`] for launches on this thread: `Some(true)` takes the tensor-core
/// kernel for every decode step it can serve (bf16/f16, groups of 2 to 16, any batch),
/// `Some(false)` never, `None` follows the switch. For tests.
pub fn set_decode_tensor_cores_on_this_thread(on: Option<bool>) {
    DECODE_TENSOR_CORES.set_on_this_thread(on);
}

/// Whether a decode step takes the tensor-core kernel: it can (16-bit `dtype`, a group of 2 to
/// 16, a supported head size), and this thread's override says so, or the switch is on, the group
/// is at least `FLASH_DECODE_MIN_GROUP` and no head tile is set.
pub(crate) fn takes_flash_decode(dtype: DType, group: usize, head_dim: usize) -> bool {
    let can = matches!(dtype, DType::BF16 | DType::F16)
        && (2..=FLASH_DECODE_MAX_GROUP).contains(&group)
        && SUPPORTED_HEAD_DIMS.contains(&head_dim);
    can && DECODE_TENSOR_CORES.this_thread().unwrap_or_else(|| {
        DECODE_TENSOR_CORES.process()
            && group >= FLASH_DECODE_MIN_GROUP
            && DECODE_HEAD_TILE.load(Ordering::Relaxed) == 0
    })
}

/// Dynamic shared memory of a tensor-core decode launch (`Dec::kSmemBytes`): a 16-row Q tile and
/// two stages of K and V tiles, rows of `head_dim + 8` 16-bit elements, then two u32 per key of
/// two tiles.
pub(crate) fn flash_decode_shared_bytes(head_dim: usize) -> usize {
    (16 + 4 * FLASH_DECODE_KEYS) * (head_dim + 8) * 2 + 16 * FLASH_DECODE_KEYS
}

/// Query heads per decode CTA when set (one of `DECODE_HEAD_TILES`); 0: the smallest tile that
/// holds the GQA group.
static DECODE_HEAD_TILE: AtomicUsize = AtomicUsize::new(0);

/// Overrides the decode kernel's query heads per CTA (`None`: the smallest tile that holds the
/// GQA group); for side-by-side benchmarks. Errors on a size the kernel is not built for.
pub fn set_decode_head_tile(tile: Option<usize>) -> Result<()> {
    if let Some(g) = tile {
        if !DECODE_HEAD_TILES.contains(&g) {
            bail!("decode head tile {g}: not one of {DECODE_HEAD_TILES:?}")
        }
    }
    DECODE_HEAD_TILE.store(tile.unwrap_or(0), Ordering::Relaxed);
    Ok(())
}

/// Keys per warp step of the decode kernel (`DEC_CHUNK`): partitions are whole chunks.
const DECODE_CHUNK: usize = 32;
/// Query heads per CTA the decode kernel is instantiated for (`_g<G>` suffix); a GQA group takes
/// the smallest that holds it, groups above the largest are tiled.
const DECODE_HEAD_TILES: [usize; 3] = [1, 4, 8];

/// Query heads per decode CTA for a step of `num_seqs` sequences of `num_heads` heads in GQA
/// groups of `group` on `sms` SMs: the override if set; one head while one-head CTAs before any
/// split do not exceed one per SM (batch 1-8 at the Qwen2.5-1.5B shape: each CTA's work is a
/// sixth, the K/V rows are read once per head, mostly from L2; run31); else the smallest tile
/// that holds the group (its K/V rows read once per step).
pub(crate) fn decode_head_tile(
    group: usize,
    num_seqs: usize,
    num_heads: usize,
    sms: usize,
) -> usize {
    let set = DECODE_HEAD_TILE.load(Ordering::Relaxed);
    if set != 0 {
        return set;
    }
    if num_seqs * num_heads <= sms {
        return 1;
    }
    let max = DECODE_HEAD_TILES[DECODE_HEAD_TILES.len() - 1];
    DECODE_HEAD_TILES
        .into_iter()
        .find(|&g| g >= group)
        .unwrap_or(max)
}

/// Context partitions of a decode launch of `base_ctas` CTAs before splitting, for contexts up to
/// `max_ctx` keys: enough to reach `target_ctas`, partitions of at least `min_partition` keys.
/// Each sequence's own context is split evenly over them in the kernel (whole 32-key chunks).
pub(crate) fn decode_splits(
    base_ctas: usize,
    max_ctx: usize,
    target_ctas: usize,
    min_partition: usize,
) -> usize {
    if base_ctas >= target_ctas {
        return 1;
    }
    let want = target_ctas.div_ceil(base_ctas.max(1));
    let partition = max_ctx
        .div_ceil(want)
        .max(min_partition)
        .next_multiple_of(DECODE_CHUNK);
    max_ctx.div_ceil(partition).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The H200's SMs (the splits' target is CTAs per SM times this).
    const SMS: usize = 132;

    #[test]
    fn decode_splits_at_the_shapes_the_readme_quotes() {
        // Qwen2.5-1.5B, batch 1, context 1k (+ the new token): 2 KV heads, tensor cores 2:128 ->
        // 9 partitions of 128 keys, 18 CTAs (days/gpu-engine "runs 37-40").
        assert_eq!(decode_splits(2, 1025, 2 * SMS, 128), 9);
        // The CUDA-core kernel, one head per CTA (12 heads), 4:128: the same 9 partitions, 108 CTAs.
        assert_eq!(decode_splits(12, 1025, 4 * SMS, 128), 9);
        // A launch already at its target is not split.
        assert_eq!(decode_splits(2 * SMS, 1025, 2 * SMS, 128), 1);
        assert_eq!(decode_splits(1000, 4096, 2 * SMS, 128), 1);
        // Partitions are whole 32-key chunks and at least the minimum: 8 base CTAs, target 264
        // wants 33 partitions of 32 keys, the minimum of 128 caps it at 9.
        assert_eq!(decode_splits(8, 1025, 2 * SMS, 128), 9);
        // Without a minimum: 1025 / 33 -> 32-key partitions -> 33 of them.
        assert_eq!(decode_splits(8, 1025, 2 * SMS, 1), 33);
        // A short context is one partition; no base CTAs is taken as one.
        assert_eq!(decode_splits(2, 5, 2 * SMS, 128), 1);
        assert_eq!(decode_splits(0, 1025, 2 * SMS, 128), 9);
    }

    #[test]
    fn decode_head_tiles_follow_the_launch_size() {
        // Qwen2.5-1.5B (12 heads, groups of 6): one head per CTA while seqs x heads <= SMs.
        assert_eq!(decode_head_tile(6, 1, 12, SMS), 1);
        assert_eq!(decode_head_tile(6, 11, 12, SMS), 1);
        // Above: the smallest tile holding the group; groups above 8 are tiled by 8.
        assert_eq!(decode_head_tile(6, 12, 12, SMS), 8);
        assert_eq!(decode_head_tile(3, 64, 9, SMS), 4);
        assert_eq!(decode_head_tile(1, 64, 32, SMS), 1);
        assert_eq!(decode_head_tile(16, 64, 32, SMS), 8);
    }

    #[test]
    fn tensor_core_decode_takes_16_bit_groups_it_can_tile() {
        // The override and the switch are this thread's or the process's; this test only uses
        // its own thread's overrides (the defaults are what other tests see).
        set_decode_tensor_cores_on_this_thread(None);
        // Defaults (switch on, no head tile): bf16/f16 groups of 4 to 16 at supported head sizes.
        assert!(takes_flash_decode(DType::BF16, 6, 128));
        assert!(takes_flash_decode(DType::F16, 8, 128));
        assert!(takes_flash_decode(DType::BF16, 16, 64));
        assert!(takes_flash_decode(DType::BF16, 4, 80));
        // Below the default's smallest group, above one m16 tile, f32, other head sizes: no.
        assert!(!takes_flash_decode(DType::BF16, 3, 64));
        assert!(!takes_flash_decode(DType::BF16, 17, 128));
        assert!(!takes_flash_decode(DType::F32, 6, 128));
        assert!(!takes_flash_decode(DType::BF16, 6, 256));
        // This thread's override: on takes any group it can serve (2 and up), off none.
        set_decode_tensor_cores_on_this_thread(Some(true));
        assert!(takes_flash_decode(DType::BF16, 2, 64));
        assert!(!takes_flash_decode(DType::BF16, 1, 64));
        assert!(!takes_flash_decode(DType::F32, 6, 128));
        set_decode_tensor_cores_on_this_thread(Some(false));
        assert!(!takes_flash_decode(DType::BF16, 6, 128));
        set_decode_tensor_cores_on_this_thread(None);
    }

    #[test]
    fn tensor_core_decode_shared_memory_matches_the_kernel_layout() {
        // (16 Q rows + 2 stages x (64 K + 64 V rows)) x (D + 8) bf16, then 2 u32 per key of two
        // tiles: 75,008 B at d128 (above the default 48 KiB, so the launch raises the limit).
        assert_eq!(flash_decode_shared_bytes(128), 272 * 136 * 2 + 1024);
        assert_eq!(flash_decode_shared_bytes(128), 75_008);
        assert_eq!(flash_decode_shared_bytes(64), 272 * 72 * 2 + 1024);
    }

    #[test]
    fn cluster_merge_needs_a_small_launch_of_2_to_16_partitions() {
        set_decode_cluster_on_this_thread(None);
        assert!(takes_decode_cluster(true, 9));
        assert!(!takes_decode_cluster(false, 9));
        assert!(!takes_decode_cluster(true, 1));
        assert!(!takes_decode_cluster(true, DECODE_CLUSTER_MAX + 1));
        set_decode_cluster_on_this_thread(Some(true));
        assert!(takes_decode_cluster(false, 9));
        assert!(!takes_decode_cluster(false, 17));
        set_decode_cluster_on_this_thread(Some(false));
        assert!(!takes_decode_cluster(true, 9));
        set_decode_cluster_on_this_thread(None);
    }

    #[test]
    fn head_tile_override_is_checked() {
        let err = set_decode_head_tile(Some(3)).unwrap_err().to_string();
        assert!(err.contains("not one of [1, 4, 8]"), "{err}");
    }
}
