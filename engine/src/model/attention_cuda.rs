//! CUDA versions of the paged-attention ops (kernels in `engine/kernels/*.cu`, loaded through cudarc).
//!
//! Same contract as the CPU reference ops in `attention.rs`. Kernels are compiled to PTX by
//! `engine/build.rs` and JIT-loaded once per device through candle's module cache. Attention
//! steps in which every sequence has one query token run on the decode kernels (`paged_decode.cu`
//! on CUDA cores, `flash_decode.cu` on tensor cores for whole GQA groups; switches:
//! `set_decode_kernel`, `set_decode_tensor_cores`); other steps on the general paged kernel
//! (`paged_attention.cu`) and the tensor-core prefill kernel (`flash_prefill.cu`).

use super::attention::{l2_byte_ranges, AttentionMetadata, L2Range};
// The kernel choices and splits (host arithmetic) live in `attention_select`; their setters are
// re-exported here, where the launches that read them are.
pub use super::attention_select::*;
use super::attention_select::{
    decode_head_tile, decode_splits, flash_decode_shared_bytes, takes_decode_cluster,
    takes_decode_kernel, takes_flash_decode, DECODE_EARLY_KV, PAGED_PREFILL, WARM_L2,
};
use super::pdl;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
    SyncOnDrop,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice, WrapErr};
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, DType, InplaceOp1, InplaceOp3, Layout, Result, Shape,
    Storage, Tensor,
};
use std::sync::atomic::Ordering;
use std::sync::OnceLock;

/// The PTX of every kernel file (`engine/build.rs`); `fused_cuda.rs` uses it too.
pub(super) mod ptx {
    include!(concat!(env!("OUT_DIR"), "/kernels_ptx.rs"));
}

/// Keys per shared-memory tile and query rows per CTA (`KT`, `MAX_ROWS` in paged_attention.cu).
const KEY_TILE: usize = 32;
const MAX_ROWS: usize = 16;
const THREADS: u32 = 128;
/// One tiling of the tensor-core prefill kernel: query rows per CTA and keys per tile (kernels
/// `flash_prefill_<type>_d<D>_<rows>x<keys>` in flash_prefill.cu, 4 warps each).
#[derive(Debug, Clone, Copy)]
struct FlashTiles {
    rows: usize,
    keys: usize,
}

/// 4 warps x 32 query rows, 64-key tiles: the default (`set_flash_wide_tiles`). Kernel alone on an
/// H200, bf16, CodeLlama-34B shape (64 heads, 8 kv heads, d128), one prompt of 1k/2k/4k tokens:
/// 258/304/343 TFLOP/s, against 209/251/270 for `FLASH_NARROW`.
const FLASH_WIDE: FlashTiles = FlashTiles {
    rows: 128,
    keys: 64,
};
/// 4 warps x 16 query rows, 32-key tiles.
const FLASH_NARROW: FlashTiles = FlashTiles { rows: 64, keys: 32 };
/// Threads per CTA of the tensor-core prefill kernel (both tilings).
const FLASH_THREADS: u32 = 128;

impl FlashTiles {
    fn kernel(self, suffix: &str, head_dim: usize) -> String {
        format!(
            "flash_prefill_{suffix}_d{head_dim}_{}x{}",
            self.rows, self.keys
        )
    }

    /// Dynamic shared memory of a launch (`Tiles::kSmemBytes`): the Q tile and two stages of K
    /// and V tiles, rows of `head_dim + 8` 16-bit elements, then two u32 per key of two tiles.
    fn shared_bytes(self, head_dim: usize) -> usize {
        (self.rows + 4 * self.keys) * (head_dim + 8) * 2 + 16 * self.keys
    }
}

crate::switch! {
    /// The tensor-core prefill kernel's tiling: `FLASH_WIDE` (on) or `FLASH_NARROW` (off).
    static FLASH_WIDE_TILES = true;
}

/// Chooses the tensor-core prefill kernel's tiling process-wide: 128 query rows x 64-key tiles
/// (on, the default) or 64 rows x 32 keys (off). For side-by-side benchmarks.
pub fn set_flash_wide_tiles(on: bool) {
    FLASH_WIDE_TILES.set(on);
}

/// Overrides the tiling for calls on this thread (`None`: follow the process-wide value); for
/// tests that run both while other threads run.
pub fn set_flash_wide_tiles_on_this_thread(on: Option<bool>) {
    FLASH_WIDE_TILES.set_on_this_thread(on);
}

/// Whether the tensor-core prefill kernel runs with the wide tiles on this thread.
pub fn flash_wide_tiles() -> bool {
    FLASH_WIDE_TILES.on()
}

/// Lets `func` take `bytes` of dynamic shared memory (where dynamic and static together pass the
/// default 48 KiB it must be allowed per function). Set at every launch that asks for any: a
/// cached "already set" keyed by the function handle went stale when a device's modules were
/// unloaded and a newly loaded function got the same handle (CUDA_ERROR_INVALID_VALUE at the
/// launch, `days/gpu-engine/run16/cuda-tests.log`). The driver call costs microseconds against a
/// prefill launch's milliseconds; a decode launch pays it on the host (eager steps) or once at
/// capture (graphs).
pub(super) fn allow_shared_bytes(func: &CudaFunction, bytes: usize) -> Result<()> {
    // Not only above 48 KiB: a kernel's static shared memory counts against the same default
    // limit (the tensor-core decode kernel's cluster variant at head size 80: 47.75 KiB dynamic
    // plus 5.1 KiB static failed to launch, CUDA_ERROR_INVALID_VALUE).
    if bytes == 0 {
        return Ok(());
    }
    func.set_attribute(
        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        bytes as i32,
    )
    .w()
    .map_err(|e| e.context(format!("raising the shared-memory limit to {bytes} B")))
}

/// Threads per CTA of the decode kernel (`DEC_THREADS` in paged_decode.cu).
const DECODE_THREADS: u32 = 128;

/// An f32, f16 or bf16 storage of `numel` elements on `dev`, not initialized (`op` names the
/// caller in the error for other dtypes).
///
/// # Safety
/// The caller's kernel must write every element before anything reads it.
pub(super) unsafe fn uninit_storage(
    dev: &CudaDevice,
    dtype: DType,
    numel: usize,
    op: &str,
) -> Result<CudaStorage> {
    let dev = dev.clone();
    Ok(match dtype {
        DType::F32 => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<f32>(numel)? }, dev),
        DType::F16 => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<half::f16>(numel)? }, dev),
        DType::BF16 => {
            CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<half::bf16>(numel)? }, dev)
        }
        other => bail!("{op}: unsupported storage dtype {other:?}"),
    })
}

/// Raw device address of a storage's first element under `layout`, plus the stream-ordering guard
/// that must live until the kernel using it is launched.
pub(super) fn device_ptr<'a>(
    s: &'a CudaStorage,
    layout: &Layout,
    stream: &'a CudaStream,
) -> Result<(u64, SyncOnDrop<'a>)> {
    let ((ptr, guard), elem) = match &s.slice {
        CudaStorageSlice::BF16(x) => (x.device_ptr(stream), 2),
        CudaStorageSlice::F16(x) => (x.device_ptr(stream), 2),
        CudaStorageSlice::F32(x) => (x.device_ptr(stream), 4),
        CudaStorageSlice::U32(x) => (x.device_ptr(stream), 4),
        CudaStorageSlice::I64(x) => (x.device_ptr(stream), 8),
        _ => bail!("CUDA op: unsupported dtype {:?}", s.dtype()),
    };
    Ok((ptr + (layout.start_offset() * elem) as u64, guard))
}

/// [`device_ptr`] for a storage the kernel writes.
pub(super) fn device_ptr_mut<'a>(
    s: &'a mut CudaStorage,
    layout: &Layout,
    stream: &'a CudaStream,
) -> Result<(u64, SyncOnDrop<'a>)> {
    let dtype = s.dtype();
    let ((ptr, guard), elem) = match &mut s.slice {
        CudaStorageSlice::BF16(x) => (x.device_ptr_mut(stream), 2),
        CudaStorageSlice::F16(x) => (x.device_ptr_mut(stream), 2),
        CudaStorageSlice::F32(x) => (x.device_ptr_mut(stream), 4),
        _ => bail!("CUDA op: unsupported output dtype {dtype:?}"),
    };
    Ok((ptr + (layout.start_offset() * elem) as u64, guard))
}

fn dtype_suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => bail!("paged attention: unsupported storage dtype {other:?}"),
    })
}

pub(super) fn cuda_storage<'a>(s: &'a Storage, what: &str) -> Result<&'a CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => bail!("{what} must live on the CUDA device"),
    }
}

pub(super) fn multiprocessor_count(stream: &CudaStream) -> usize {
    static SMS: OnceLock<usize> = OnceLock::new();
    *SMS.get_or_init(|| {
        stream
            .context()
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map(|n| n.max(1) as usize)
            .unwrap_or(132)
    })
}

/// Whether the device has thread-block clusters (compute capability 9.0 and above).
fn has_clusters(stream: &CudaStream) -> bool {
    static MAJOR: OnceLock<i32> = OnceLock::new();
    *MAJOR.get_or_init(|| {
        stream
            .context()
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .unwrap_or(0)
    }) >= 9
}

/// Per-partition partials (running max, running sum, accumulator) of `rows` query rows, for a
/// launch that splits contexts; its combine kernel merges them.
struct Partials {
    m: CudaSlice<f32>,
    l: CudaSlice<f32>,
    acc: CudaSlice<f32>,
}

impl Partials {
    fn alloc(dev: &CudaDevice, rows: usize, head_dim: usize) -> Result<Self> {
        // SAFETY: the attention kernel writes every partial its combine reads.
        unsafe {
            let alloc = |len: usize| {
                dev.alloc::<f32>(len)
                    .map_err(|e| e.context(format!("attention partials: {len} floats")))
            };
            Ok(Self {
                m: alloc(rows)?,
                l: alloc(rows)?,
                acc: alloc(rows * head_dim)?,
            })
        }
    }

    /// The addresses an attention kernel takes first: `out`, then the partials' running max,
    /// running sum and accumulator (zeros without partials: one partition writes `out`).
    fn out_ptrs(out: u64, parts: &Option<Self>, stream: &CudaStream) -> [u64; 4] {
        match parts {
            Some(p) => [
                out,
                p.m.device_ptr(stream).0,
                p.l.device_ptr(stream).0,
                p.acc.device_ptr(stream).0,
            ],
            None => [out, 0, 0, 0],
        }
    }
}

/// Addresses of an attention launch's q, key cache, value cache, block tables, context lengths
/// and query starts (in that order), with the guards that must live until the launch; q and the
/// caches must be 16-byte aligned (`elem`: bytes per element of q).
fn input_ptrs<'a>(
    inputs: [(&'a CudaStorage, &'a Layout); 6],
    elem: usize,
    stream: &'a CudaStream,
) -> Result<([u64; 6], Vec<SyncOnDrop<'a>>)> {
    let mut ptrs = [0u64; 6];
    let mut guards = Vec::with_capacity(6);
    for (i, (s, l)) in inputs.into_iter().enumerate() {
        let (p, g) = device_ptr(s, l, stream)?;
        ptrs[i] = p;
        guards.push(g);
    }
    for (p, what) in ptrs[..3].iter().zip(["q", "key_cache", "value_cache"]) {
        if p % 16 != 0 {
            bail!("paged_attention: {what} is not 16-byte aligned (start offset x {elem} bytes)")
        }
    }
    Ok((ptrs, guards))
}

// ------------------------------------------------------------------------------ write_kv_cache

/// Copies rows of `src` into one paged cache (the op is applied once for K, once for V).
struct ReshapeAndCache;

impl InplaceOp3 for ReshapeAndCache {
    fn name(&self) -> &'static str {
        "reshape_and_cache"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        bail!("reshape_and_cache (CUDA) called with CPU tensors; use attention::write_kv_cache")
    }

    fn cuda_fwd(
        &self,
        cache: &mut CudaStorage,
        cache_l: &Layout,
        src: &CudaStorage,
        src_l: &Layout,
        slots: &CudaStorage,
        slots_l: &Layout,
    ) -> Result<()> {
        let (num_blocks, block_size, kv_heads, head_dim) = cache_l.shape().dims4()?;
        let (n, src_heads, src_dim) = src_l.shape().dims3()?;
        if (src_heads, src_dim) != (kv_heads, head_dim) {
            bail!("write_kv_cache: k/v [{n}, {src_heads}, {src_dim}] vs cache heads {kv_heads} x {head_dim}")
        }
        if slots_l.shape().dims1()? != n || slots.dtype() != DType::I64 {
            bail!("write_kv_cache: slot_mapping must be i64 [{n}]")
        }
        if cache.dtype() != src.dtype() {
            bail!(
                "write_kv_cache: k/v {:?} vs cache {:?}",
                src.dtype(),
                cache.dtype()
            )
        }
        if !cache_l.is_contiguous() || !slots_l.is_contiguous() {
            bail!("write_kv_cache: cache and slot_mapping must be contiguous")
        }
        // Rows of k/v may be strided (e.g. a narrow of a fused qkv output) but each row is dense.
        let stride = src_l.stride();
        if stride[2] != 1 || stride[1] != head_dim {
            bail!("write_kv_cache: each k/v row [heads, head_dim] must be contiguous")
        }
        if n == 0 {
            return Ok(());
        }
        let dev = cache.device.clone();
        let stream = dev.cuda_stream();
        let elem = cache.dtype().size_in_bytes();
        let row_bytes = kv_heads * head_dim * elem;
        let (src_ptr, _g1) = device_ptr(src, src_l, &stream)?;
        let (slot_ptr, _g2) = device_ptr(slots, slots_l, &stream)?;
        let (dst_ptr, _g3) = device_ptr_mut(cache, cache_l, &stream)?;
        // Widest copy unit that divides the row, the token stride and every base address.
        let src_stride_bytes = stride[0] * elem;
        let unit = [16usize, 4, 2]
            .into_iter()
            .find(|&u| {
                row_bytes % u == 0
                    && src_stride_bytes % u == 0
                    && (src_ptr as usize) % u == 0
                    && (dst_ptr as usize) % u == 0
            })
            .unwrap_or(2);
        let name = match unit {
            16 => "reshape_and_cache_v16",
            4 => "reshape_and_cache_u32",
            _ => "reshape_and_cache_u16",
        };
        let mut b = pdl::Launch::new(&dev, name, "cache_ops", ptx::CACHE_OPS)?;
        let row_units = (row_bytes / unit) as i64;
        let stride_units = (src_stride_bytes / unit) as i64;
        let num_slots = (num_blocks * block_size) as i64;
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: ((row_units as u32).clamp(32, 256), 1, 1),
            shared_mem_bytes: 0,
        };
        b.arg(&src_ptr)
            .arg(&dst_ptr)
            .arg(&slot_ptr)
            .arg(&row_units)
            .arg(&stride_units)
            .arg(&num_slots);
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}

/// CUDA `write_kv_cache`: k, v `[n, num_kv_heads, head_dim]` into the caches at `slot_mapping`
/// (i64 `[n]`, -1 skipped), in place. Two launches (K then V) on candle's stream.
pub fn write_kv_cache(
    k: &Tensor,
    v: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    slot_mapping: &Tensor,
) -> Result<()> {
    let slot_mapping = if slot_mapping.dtype() == DType::I64 {
        slot_mapping.clone()
    } else {
        slot_mapping.to_dtype(DType::I64)?
    };
    key_cache.inplace_op3(k, &slot_mapping, &ReshapeAndCache)?;
    value_cache.inplace_op3(v, &slot_mapping, &ReshapeAndCache)
}

// ------------------------------------------------------------------------------ paged_attention

struct PagedAttention {
    /// Weights to fetch into L2 during a short decode launch: (tensor, first byte from the start
    /// of its layout, bytes).
    warm: Vec<(Tensor, usize, usize)>,
    key_cache: Tensor,
    value_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    query_start_loc: Tensor,
    /// Zeroed u32 counters (`AttentionMetadata::split_counters`): the split paged kernel merges
    /// its partitions itself when they suffice for its CTA groups.
    split_counters: Option<Tensor>,
    /// Upper bound of any sequence's context length (sizes the context partitions).
    max_context_len: usize,
    /// Bounds of the sequences' query lengths: whether the prefill kernel runs, and whether the
    /// paged kernel has sequences to take beside it.
    max_query_len: usize,
    min_query_len: usize,
    scale: f32,
}

impl PagedAttention {
    /// Checks every input and launches the kernel(s) writing `out` (`[n, num_heads, head_dim]`).
    fn launch(
        &self,
        q: &CudaStorage,
        q_l: &Layout,
        out: &mut CudaStorage,
        out_l: &Layout,
    ) -> Result<()> {
        let (n, num_heads, head_dim) = q_l.shape().dims3()?;
        if out_l.shape() != q_l.shape() || !out_l.is_contiguous() || out.dtype() != q.dtype() {
            bail!(
                "paged_attention: out must be a contiguous {:?} {:?}",
                q.dtype(),
                q_l.shape()
            )
        }
        let (kc_s, kc_l) = self.key_cache.storage_and_layout();
        let (vc_s, vc_l) = self.value_cache.storage_and_layout();
        let (bt_s, bt_l) = self.block_tables.storage_and_layout();
        let (cl_s, cl_l) = self.context_lens.storage_and_layout();
        let (qs_s, qs_l) = self.query_start_loc.storage_and_layout();
        let kc = cuda_storage(&kc_s, "key_cache")?;
        let vc = cuda_storage(&vc_s, "value_cache")?;
        let bt = cuda_storage(&bt_s, "block_tables")?;
        let cl = cuda_storage(&cl_s, "context_lens")?;
        let qsl = cuda_storage(&qs_s, "query_start_loc")?;

        let (_, block_size, num_kv_heads, kv_dim) = kc_l.shape().dims4()?;
        if vc_l.shape() != kc_l.shape() {
            bail!(
                "paged_attention: key cache {:?} vs value cache {:?}",
                kc_l.shape(),
                vc_l.shape()
            )
        }
        if kv_dim != head_dim || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            bail!("paged_attention: q heads {num_heads}x{head_dim} vs kv heads {num_kv_heads}x{kv_dim}")
        }
        if !SUPPORTED_HEAD_DIMS.contains(&head_dim) {
            bail!("paged_attention: head_dim {head_dim} not in {SUPPORTED_HEAD_DIMS:?}")
        }
        let dtype = q.dtype();
        if kc.dtype() != dtype || vc.dtype() != dtype {
            bail!(
                "paged_attention: q {dtype:?}, caches {:?}/{:?}",
                kc.dtype(),
                vc.dtype()
            )
        }
        let (num_seqs, max_blocks) = bt_l.shape().dims2()?;
        if cl_l.shape().dims1()? != num_seqs || qs_l.shape().dims1()? != num_seqs + 1 {
            bail!("paged_attention: context_lens [{num_seqs}] and query_start_loc [{num_seqs}+1] expected")
        }
        for (s, what) in [
            (bt, "block_tables"),
            (cl, "context_lens"),
            (qsl, "query_start_loc"),
        ] {
            if s.dtype() != DType::U32 {
                bail!("paged_attention: {what} must be u32, got {:?}", s.dtype())
            }
        }
        for (l, what) in [
            (q_l, "q"),
            (kc_l, "key_cache"),
            (vc_l, "value_cache"),
            (bt_l, "block_tables"),
            (cl_l, "context_lens"),
            (qs_l, "query_start_loc"),
        ] {
            if !l.is_contiguous() {
                bail!("paged_attention: {what} must be contiguous")
            }
        }

        let dev = q.device.clone();
        let stream = dev.cuda_stream();
        let elem = dtype.size_in_bytes();
        if n == 0 || num_seqs == 0 {
            return Ok(());
        }
        // Decode-only step: one query token per sequence (query lengths are >= 1, so n tokens
        // over n sequences; an unknown max_query_len is usize::MAX).
        let decode_only =
            n == num_seqs && (self.max_query_len == 1 || self.max_query_len == usize::MAX);
        if decode_only && takes_decode_kernel(num_seqs) {
            return self.launch_decode(
                q,
                q_l,
                out,
                out_l,
                [(kc, kc_l), (vc, vc_l), (bt, bt_l), (cl, cl_l), (qsl, qs_l)],
                (num_heads, num_kv_heads, head_dim, block_size, max_blocks),
            );
        }

        // Sequences of >= FLASH_MIN_QUERY_LEN query tokens go to the tensor-core prefill kernel.
        let flash = !PAGED_PREFILL.load(Ordering::Relaxed)
            && dtype != DType::F32
            && self.max_query_len.min(n) >= FLASH_MIN_QUERY_LEN;
        let qlen_hi = if flash {
            FLASH_MIN_QUERY_LEN as i32
        } else {
            i32::MAX
        };
        // The paged kernel runs unless the prefill kernel takes every sequence.
        let paged = !flash || self.min_query_len < FLASH_MIN_QUERY_LEN;
        // Work split (see paged_attention.cu): rows = qt tokens x gh heads of one kv head.
        let group = num_heads / num_kv_heads;
        let gh = group.min(MAX_ROWS);
        let qt = (MAX_ROWS / gh).max(1);
        let head_groups = group.div_ceil(gh);
        let tiles = n.div_ceil(qt) + num_seqs; // upper bound of sum over seqs of ceil(qlen/qt)
        let base_ctas = tiles * num_kv_heads * head_groups;
        let max_ctx = self.max_context_len.clamp(1, max_blocks * block_size);
        let (ctas_per_sm, min_tiles) = paged_split();
        let target = ctas_per_sm * multiprocessor_count(&stream);
        // Context partitions (grid.z): each sequence's context is split evenly over them in the
        // kernel; the count comes from the longest context, >= min_tiles key tiles per partition.
        let splits = if base_ctas >= target {
            1
        } else {
            let want = target.div_ceil(base_ctas);
            let partition = max_ctx.div_ceil(want).div_ceil(KEY_TILE).max(min_tiles) * KEY_TILE;
            max_ctx.div_ceil(partition)
        };
        let parts = if paged && splits > 1 {
            Some(Partials::alloc(&dev, n * num_heads * splits, head_dim)?)
        } else {
            None
        };
        // The partitions merged in the kernel's last CTA per group when counters cover the grid
        // and there are at most KEY_TILE of them (the merge stages them in the key tile's shared
        // memory).
        let groups = tiles * num_kv_heads * head_groups;
        let counters = match &self.split_counters {
            Some(c)
                if parts.is_some()
                    && splits <= KEY_TILE
                    && in_kernel_combine()
                    && c.elem_count() >= groups =>
            {
                Some(c.storage_and_layout())
            }
            _ => None,
        };
        let counters_ptr = match &counters {
            Some((s, l)) => Some(device_ptr(cuda_storage(s, "split_counters")?, l, &stream)?),
            None => None,
        };

        let suffix = dtype_suffix(dtype)?;
        let inputs = [
            (q, q_l),
            (kc, kc_l),
            (vc, vc_l),
            (bt, bt_l),
            (cl, cl_l),
            (qsl, qs_l),
        ];
        let (ins, _guards) = input_ptrs(inputs, elem, &stream)?;
        let (out_ptr, _g6) = device_ptr_mut(out, out_l, &stream)?;
        let outs = Partials::out_ptrs(out_ptr, &parts, &stream);

        let (num_seqs_i, num_heads_i, kv_heads_i) =
            (num_seqs as i32, num_heads as i32, num_kv_heads as i32);
        let (block_size_i, max_blocks_i) = (block_size as i32, max_blocks as i32);
        if paged {
            let combine = if counters_ptr.is_some() {
                "_combine"
            } else {
                ""
            };
            let mut b = pdl::Launch::new(
                &dev,
                &format!("paged_attention_{suffix}_d{head_dim}{combine}"),
                "paged_attention",
                ptx::PAGED_ATTENTION,
            )?;
            let (qt_i, gh_i) = (qt as i32, gh as i32);
            let scale = self.scale;
            let cfg = LaunchConfig {
                grid_dim: (
                    tiles as u32,
                    (num_kv_heads * head_groups) as u32,
                    splits as u32,
                ),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            for p in outs.iter().chain(&ins) {
                b.arg(p);
            }
            if let Some((p, _)) = &counters_ptr {
                b.arg(p);
            }
            b.arg(&num_seqs_i)
                .arg(&num_heads_i)
                .arg(&kv_heads_i)
                .arg(&block_size_i);
            b.arg(&max_blocks_i)
                .arg(&qt_i)
                .arg(&gh_i)
                .arg(&qlen_hi)
                .arg(&scale);
            unsafe { b.launch(cfg) }?;

            if splits > 1 && counters_ptr.is_none() {
                let mut b = pdl::Launch::new(
                    &dev,
                    &format!("paged_attention_combine_{suffix}_d{head_dim}"),
                    "paged_attention",
                    ptx::PAGED_ATTENTION,
                )?;
                let splits_i = splits as i32;
                let cfg = LaunchConfig {
                    grid_dim: ((n * num_heads) as u32, 1, 1),
                    block_dim: (head_dim as u32, 1, 1),
                    shared_mem_bytes: 0,
                };
                for p in &outs {
                    b.arg(p);
                }
                b.arg(&splits_i);
                unsafe { b.launch(cfg) }?;
            }
        }
        // Last: the combine above also wrote (meaningless) rows of the prefill kernel's sequences.
        if flash {
            let t = if flash_wide_tiles() {
                FLASH_WIDE
            } else {
                FLASH_NARROW
            };
            let func = dev.get_or_load_custom_func(
                &t.kernel(suffix, head_dim),
                "flash_prefill",
                ptx::FLASH_PREFILL,
            )?;
            let shared = t.shared_bytes(head_dim);
            allow_shared_bytes(&func, shared)?;
            // Bound of the sum over sequences of ceil(qlen / rows); grid.y (at most 65535).
            let tiles = n.div_ceil(t.rows) + num_seqs;
            if tiles > 65535 {
                bail!("paged_attention: {n} query tokens in {num_seqs} sequences exceed the prefill kernel's grid")
            }
            let qlen_lo = FLASH_MIN_QUERY_LEN as i32;
            let scale_log2 = self.scale * std::f32::consts::LOG2_E;
            let cfg = LaunchConfig {
                // Head fastest: CTAs start tile by tile, each sequence's last (longest) first.
                grid_dim: (num_heads as u32, tiles as u32, 1),
                block_dim: (FLASH_THREADS, 1, 1),
                shared_mem_bytes: shared as u32,
            };
            let mut b = func.builder();
            b.arg(&out_ptr);
            for p in &ins {
                b.arg(p);
            }
            b.arg(&num_seqs_i)
                .arg(&num_heads_i)
                .arg(&kv_heads_i)
                .arg(&block_size_i)
                .arg(&max_blocks_i)
                .arg(&qlen_lo)
                .arg(&scale_log2);
            unsafe { b.launch(cfg) }
                .w()
                .map_err(|e| e.context(format!("prefill kernel launch, {shared} B shared")))?;
        }
        drop(parts); // freed in stream order after the kernels
        Ok(())
    }

    /// Launches the decode kernel (and its combine when contexts are split) for a step in which
    /// every sequence has one query token; `launch` has checked every input. `inputs` are the key
    /// cache, value cache, block tables, context lengths and query starts; `dims` are (num_heads,
    /// num_kv_heads, head_dim, block_size, max_blocks_per_seq). Scalar kernel arguments only, and
    /// the split depends on host values alone: capturable in a CUDA graph.
    fn launch_decode(
        &self,
        q: &CudaStorage,
        q_l: &Layout,
        out: &mut CudaStorage,
        out_l: &Layout,
        inputs: [(&CudaStorage, &Layout); 5],
        dims: (usize, usize, usize, usize, usize),
    ) -> Result<()> {
        let [(kc, kc_l), (vc, vc_l), (bt, bt_l), (cl, cl_l), (qsl, qs_l)] = inputs;
        let (num_heads, num_kv_heads, head_dim, block_size, max_blocks) = dims;
        let num_seqs = bt_l.shape().dims2()?.0;
        let dtype = q.dtype();
        let dev = q.device.clone();
        let stream = dev.cuda_stream();

        let group = num_heads / num_kv_heads;
        let sms = multiprocessor_count(&stream);
        let max_ctx = self.max_context_len.clamp(1, max_blocks * block_size);
        // The tensor-core kernel takes a whole group per CTA.
        let tc = takes_flash_decode(dtype, group, head_dim);
        let g = match tc {
            true => group,
            false => decode_head_tile(group, num_seqs, num_heads, sms),
        };
        let head_tiles = group.div_ceil(g);
        let base_ctas = num_seqs * num_kv_heads * head_tiles;
        let (ctas_per_sm, min_partition) = if tc {
            flash_decode_split()
        } else {
            decode_split()
        };
        let target = ctas_per_sm * sms;
        let splits = decode_splits(base_ctas, max_ctx, target, min_partition);
        // A launch of at most one CTA per SM: the cluster merge (either kernel) and the L2
        // warm-up (CUDA cores only) pay there.
        let small = base_ctas * splits <= sms;
        let cluster = takes_decode_cluster(small, splits) && has_clusters(&stream);
        // Weight ranges into L2 (pointer, bytes), with the guards that keep them valid. Not with
        // the tensor-core kernel: its small launches (18 CTAs at batch 1, Qwen2.5-1.5B shape)
        // issue the whole warm-up from a few SMs, and the H200 batch-1 step took 2.079 ms with
        // it against 1.380 without (CUDA graphs, days/gpu-engine/run39; the CUDA-core kernel's
        // 108 CTAs: 1.424 with, 1.429 without).
        let ranges: Vec<_> = match small && WARM_L2.on() && !tc {
            true => self
                .warm
                .iter()
                .map(|(t, first, bytes)| (t.storage_and_layout(), *first, *bytes))
                .collect(),
            false => Vec::new(),
        };
        let mut warm = [(0u64, 0u64); WARM_RANGES];
        let mut warm_guards = Vec::with_capacity(ranges.len());
        for (slot, ((st, l), first, bytes)) in warm.iter_mut().zip(&ranges) {
            let (p, g) = device_ptr(cuda_storage(st, "L2 range")?, l, &stream)?;
            // device_ptr points at the layout's start; `first` counts from there.
            *slot = (p + *first as u64, *bytes as u64);
            warm_guards.push(g);
        }
        let parts = if splits > 1 && !cluster {
            Some(Partials::alloc(
                &dev,
                num_seqs * num_heads * splits,
                head_dim,
            )?)
        } else {
            None
        };

        let suffix = dtype_suffix(dtype)?;
        let inputs = [
            (q, q_l),
            (kc, kc_l),
            (vc, vc_l),
            (bt, bt_l),
            (cl, cl_l),
            (qsl, qs_l),
        ];
        let (ins, _guards) = input_ptrs(inputs, dtype.size_in_bytes(), &stream)?;
        let (out_ptr, _g6) = device_ptr_mut(out, out_l, &stream)?;
        let outs = Partials::out_ptrs(out_ptr, &parts, &stream);

        let (num_heads_i, kv_heads_i) = (num_heads as i32, num_kv_heads as i32);
        let (block_size_i, max_blocks_i) = (block_size as i32, max_blocks as i32);
        let scale_log2 = self.scale * std::f32::consts::LOG2_E;
        let early_kv = i32::from(DECODE_EARLY_KV.on());
        let variant = if cluster { "_cluster" } else { "" };
        let (name, module, code) = match tc {
            true => (
                format!("flash_decode_{suffix}_d{head_dim}{variant}"),
                "flash_decode",
                ptx::FLASH_DECODE,
            ),
            false => (
                format!("paged_decode_{suffix}_d{head_dim}_g{g}{variant}"),
                "paged_decode",
                ptx::PAGED_DECODE,
            ),
        };
        let shared = if tc {
            flash_decode_shared_bytes(head_dim)
        } else {
            0
        };
        let mut b = pdl::Launch::new(&dev, &name, module, code)?;
        allow_shared_bytes(b.function(), shared)?;
        if cluster {
            b.cluster((1, 1, splits as u32))?;
        }
        let cfg = LaunchConfig {
            grid_dim: (
                num_seqs as u32,
                (num_kv_heads * head_tiles) as u32,
                splits as u32,
            ),
            block_dim: (DECODE_THREADS, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        for p in outs.iter().chain(&ins) {
            b.arg(p);
        }
        b.arg(&num_heads_i)
            .arg(&kv_heads_i)
            .arg(&block_size_i)
            .arg(&max_blocks_i)
            .arg(&scale_log2);
        if tc {
            b.arg(&early_kv);
        } else {
            for (p, bytes) in &warm {
                b.arg(p).arg(bytes);
            }
        }
        unsafe { b.launch(cfg) }?;
        drop(warm_guards);

        if splits > 1 && !cluster {
            let mut b = pdl::Launch::new(
                &dev,
                &format!("paged_decode_combine_{suffix}_d{head_dim}"),
                "paged_decode",
                ptx::PAGED_DECODE,
            )?;
            let splits_i = splits as i32;
            let cfg = LaunchConfig {
                grid_dim: (num_seqs as u32, num_heads as u32, 1),
                block_dim: (head_dim as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            for p in &outs {
                b.arg(p);
            }
            let [.., cl_ptr, qs_ptr] = &ins;
            b.arg(cl_ptr).arg(qs_ptr).arg(&num_heads_i).arg(&splits_i);
            unsafe { b.launch(cfg) }?;
        }
        drop(parts); // freed in stream order after the kernels
        Ok(())
    }
}

impl CustomOp1 for PagedAttention {
    fn name(&self) -> &'static str {
        "paged_attention"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("paged_attention (CUDA) called with CPU tensors; use attention::paged_attention")
    }

    fn cuda_fwd(&self, q: &CudaStorage, q_l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = q.device.clone();
        let numel = q_l.shape().elem_count();
        // SAFETY: the kernels write every element of `out` before anything reads it.
        let mut out = unsafe { uninit_storage(&dev, q.dtype(), numel, "paged_attention")? };
        let out_l = Layout::contiguous(q_l.shape());
        self.launch(q, q_l, &mut out, &out_l)?;
        Ok((out, q_l.shape().clone()))
    }
}

/// The same op writing into an existing output tensor (`PagedAttention::q` is the query).
struct PagedAttentionInto {
    op: PagedAttention,
    q: Tensor,
}

impl InplaceOp1 for PagedAttentionInto {
    fn name(&self) -> &'static str {
        "paged_attention_into"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
        bail!("paged_attention (CUDA) called with CPU tensors; use attention::paged_attention")
    }

    fn cuda_fwd(&self, out: &mut CudaStorage, out_l: &Layout) -> Result<()> {
        let (q_s, q_l) = self.q.storage_and_layout();
        self.op.launch(cuda_storage(&q_s, "q")?, q_l, out, out_l)
    }
}

/// CUDA `paged_attention` (the dispatch target of `attention::paged_attention` for CUDA tensors).
pub fn paged_attention(
    q: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    meta: &AttentionMetadata,
    scale: f32,
    warm: &[L2Range],
) -> Result<Tensor> {
    let mut op = PagedAttention::new(
        key_cache,
        value_cache,
        &meta.block_tables,
        &meta.context_lens,
        &meta.query_start_loc,
        Some(meta.max_context_len),
        scale,
    )?;
    op.max_query_len = meta.max_query_len;
    op.min_query_len = meta.min_query_len;
    op.split_counters = meta.split_counters.clone();
    op.warm = l2_byte_ranges(warm, WARM_RANGES)?;
    q.contiguous()?.apply_op1_no_bwd(&op)
}

/// CUDA paged attention over explicit metadata tensors (u32, on the device of `q`).
/// `max_context_len` is any upper bound of the batch's context lengths (None: the block table
/// width times the block size); it only sizes the context partitions.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_with(
    q: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    block_tables: &Tensor,
    context_lens: &Tensor,
    query_start_loc: &Tensor,
    max_context_len: Option<usize>,
    scale: f32,
) -> Result<Tensor> {
    let op = PagedAttention::new(
        key_cache,
        value_cache,
        block_tables,
        context_lens,
        query_start_loc,
        max_context_len,
        scale,
    )?;
    q.contiguous()?.apply_op1_no_bwd(&op)
}

/// [`paged_attention_with`] writing into `out` (same shape and dtype as `q`, contiguous): lets a
/// caller reuse a buffer, and lets tests poison the output to prove every element is written.
/// `split_counters` (zeroed u32, see `AttentionMetadata::split_counters`) lets a split launch
/// merge its partitions in the kernel.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_into(
    out: &Tensor,
    q: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    block_tables: &Tensor,
    context_lens: &Tensor,
    query_start_loc: &Tensor,
    max_context_len: Option<usize>,
    scale: f32,
    split_counters: Option<&Tensor>,
) -> Result<()> {
    let mut op = PagedAttention::new(
        key_cache,
        value_cache,
        block_tables,
        context_lens,
        query_start_loc,
        max_context_len,
        scale,
    )?;
    op.split_counters = split_counters.cloned();
    out.inplace_op1(&PagedAttentionInto {
        op,
        q: q.contiguous()?,
    })
}

impl PagedAttention {
    fn new(
        key_cache: &Tensor,
        value_cache: &Tensor,
        block_tables: &Tensor,
        context_lens: &Tensor,
        query_start_loc: &Tensor,
        max_context_len: Option<usize>,
        scale: f32,
    ) -> Result<Self> {
        let (_, block_size, _, _) = key_cache.dims4()?;
        let bound = block_tables.dim(1)? * block_size;
        Ok(PagedAttention {
            warm: Vec::new(),
            key_cache: key_cache.clone(),
            value_cache: value_cache.clone(),
            block_tables: block_tables.contiguous()?,
            context_lens: context_lens.contiguous()?,
            query_start_loc: query_start_loc.contiguous()?,
            split_counters: None,
            max_context_len: max_context_len.unwrap_or(bound).min(bound),
            // Unknown: the token count bounds the longest, the shortest may be 1.
            max_query_len: usize::MAX,
            min_query_len: 1,
            scale,
        })
    }
}
