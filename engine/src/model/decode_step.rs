//! The persistent decode step (engine/kernels/decode_step.cu): one sequence's one-token step through
//! every decoder layer in a single launch, for batch-1 decode on CUDA where the shapes fit.
//!
//! The per-op path spends five to seven launches a layer, each paying its start, first loads and
//! tail; at batch 1 those fixed costs, not the weight bytes, are most of the step. Here one CTA per
//! SM stays resident for the whole step and the phases of a layer (q/k/v with rotary and the cache
//! write; attention; the o projection; the gate/up projection with the SiLU gate; the down
//! projection) are separated by grid barriers, with the next phases' weights asked of L2 before
//! each wait. The shape checks and the shared-memory layout are plain arithmetic (tested on the
//! CPU); the launch is behind the `cuda` feature.
//!
//! Off by default, a lab path (engine-bench `--persistent-decode`, its variant column and phase
//! table): on the H200 at the Qwen2.5-1.5B shape it is slower than the per-op kernels replayed
//! from CUDA graphs (1.82 against 1.38 ms) though faster than eager per-op steps (1.9 against
//! 2.1-2.5 ms, bound by the host's ~200 launches), and it was never timed at the CodeLlama-34B or
//! Phi-3 shapes (days/gpu-engine/README.md, runs 42-48).

crate::switch! {
    /// Eager batch-1 decode steps through the persistent kernel (on) or the per-op launches (off).
    static PERSISTENT = false;
}

crate::switch! {
    /// Batch-1 decode steps captured into CUDA graphs through the persistent kernel (on) or the
    /// per-op launches (off).
    static PERSISTENT_IN_GRAPHS = false;
}

/// Turns the persistent decode step of eager steps on or off process-wide.
pub fn set_persistent_decode(on: bool) {
    PERSISTENT.set(on);
}

/// [`set_persistent_decode`] for calls on this thread (`None`: the process-wide value).
pub fn set_persistent_decode_on_this_thread(on: Option<bool>) {
    PERSISTENT.set_on_this_thread(on);
}

/// Turns the persistent decode step of captured (CUDA graph) steps on or off process-wide.
pub fn set_persistent_decode_in_graphs(on: bool) {
    PERSISTENT_IN_GRAPHS.set(on);
}

/// [`set_persistent_decode_in_graphs`] for captures on this thread (`None`: the process-wide value).
pub fn set_persistent_decode_in_graphs_on_this_thread(on: Option<bool>) {
    PERSISTENT_IN_GRAPHS.set_on_this_thread(on);
}

/// Whether batch-1 decode steps on this thread take the persistent kernel (while a graph is
/// captured on it, the graphs' setting: `CaptureSetting`).
pub fn persistent_decode() -> bool {
    PERSISTENT.on()
}

/// While alive (a CUDA graph capture on this thread), batch-1 steps follow the graphs' setting.
pub struct CaptureSetting(Option<bool>);

impl CaptureSetting {
    pub fn on_this_thread() -> Self {
        let before = PERSISTENT.this_thread();
        PERSISTENT.set_on_this_thread(Some(PERSISTENT_IN_GRAPHS.on()));
        Self(before)
    }
}

impl Drop for CaptureSetting {
    fn drop(&mut self) {
        PERSISTENT.set_on_this_thread(self.0);
    }
}

/// Layers one launch takes (`DS_MAX_LAYERS`: their pointers travel in the kernel's parameters).
pub const MAX_LAYERS: usize = 48;
/// Threads per CTA (`DS_THREADS`).
pub const THREADS: u32 = 512;
const WARPS: usize = 16;
/// Keys per attention unit (`DS_KEYS`).
const KEYS: usize = 64;
/// Query heads per KV head at most (`DS_MAX_GROUP`).
const MAX_GROUP: usize = 16;
/// Largest head size (a key row is at most one 16-byte load per lane).
const MAX_HEAD_DIM: usize = 256;
/// Dynamic shared memory a CTA may have on sm_90 (227 KiB).
pub const MAX_SHARED_BYTES: usize = 227 * 1024;

/// The shapes one launch is sized by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub layers: usize,
    /// Width of the block table (blocks a sequence may hold).
    pub max_blocks: usize,
    pub block_size: usize,
    /// CTAs of the launch: the SM count.
    pub ctas: usize,
}

/// Byte offsets into the kernel's dynamic shared memory (`StepArgs::smem_*`) and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmemLayout {
    /// Per-piece projection sums (and the attention's P V sums).
    pub part: usize,
    /// The query heads of one KV head, f32.
    pub q: usize,
    /// Scores of one unit, f32.
    pub s: usize,
    /// K rows (padded by one 16-byte chunk) then V rows of one unit.
    pub v: usize,
    /// Merge weights `[heads, max_units]`, f32.
    pub w: usize,
    /// Per-head max and sum of a unit; the RMSNorm's per-warp sums.
    pub ml: usize,
    pub total: usize,
    /// Attention units per KV head for the longest context.
    pub max_units: usize,
}

fn round16(n: usize) -> usize {
    n.div_ceil(16) * 16
}

/// 32-chunk pieces of a row of `k` 16-bit elements.
fn segments(k: usize) -> usize {
    (k / 8).div_ceil(32)
}

impl StepShape {
    /// Why the kernel cannot take this shape (`None`: it can).
    pub fn unsupported(&self) -> Option<String> {
        let (h, kv, hd) = (self.heads, self.kv_heads, self.head_dim);
        if self.layers == 0 || self.layers > MAX_LAYERS {
            return Some(format!("{} layers (1 to {MAX_LAYERS})", self.layers));
        }
        if kv == 0 || !h.is_multiple_of(kv) || h / kv > MAX_GROUP {
            return Some(format!(
                "{h} heads over {kv} KV heads (groups of at most {MAX_GROUP})"
            ));
        }
        if !hd.is_multiple_of(16) || hd > MAX_HEAD_DIM {
            return Some(format!(
                "head size {hd} (a multiple of 16, at most {MAX_HEAD_DIM})"
            ));
        }
        if !self.hidden.is_multiple_of(8) || !self.intermediate.is_multiple_of(8) {
            return Some(format!(
                "hidden {} and intermediate {} must be multiples of 8",
                self.hidden, self.intermediate
            ));
        }
        if self.ctas == 0 || self.block_size == 0 || self.max_blocks == 0 {
            return Some("no SMs, blocks or block size".into());
        }
        let total = self.layout().total;
        (total > MAX_SHARED_BYTES)
            .then(|| format!("{total} B of shared memory (at most {MAX_SHARED_BYTES})"))
    }

    /// Where each buffer of the kernel's shared memory starts, and the total.
    pub fn layout(&self) -> SmemLayout {
        let (ctas, hidden, inter) = (self.ctas.max(1), self.hidden, self.intermediate);
        let width = self.heads * self.head_dim;
        let group = self.heads / self.kv_heads.max(1);
        let pairs = (self.heads + 2 * self.kv_heads) * self.head_dim / 2;
        // The normed row, the merged attention or the MLP activation.
        let xs = round16(2 * hidden.max(width).max(inter));
        // Largest rows x pieces of one CTA over the four projections, and the P V sums.
        let part = [
            2 * pairs.div_ceil(ctas) * segments(hidden),
            hidden.div_ceil(ctas) * segments(width),
            2 * inter.div_ceil(ctas) * segments(hidden),
            hidden.div_ceil(ctas) * segments(inter),
            THREADS as usize * 8,
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        let max_units = (self.max_blocks * self.block_size).div_ceil(KEYS);
        let sizes = [
            xs,
            round16(4 * part),
            round16(4 * group * self.head_dim),
            round16(4 * group * KEYS),
            16 * KEYS * (2 * (self.head_dim / 8) + 1),
            round16(4 * self.heads * max_units),
            round16(4 * 2 * MAX_GROUP.max(WARPS)),
        ];
        let mut offsets = [0usize; 7];
        let mut at = 0;
        for (o, s) in offsets.iter_mut().zip(sizes) {
            *o = at;
            at += s;
        }
        SmemLayout {
            part: offsets[1],
            q: offsets[2],
            s: offsets[3],
            v: offsets[4],
            w: offsets[5],
            ml: offsets[6],
            total: at,
            max_units,
        }
    }
}

#[cfg(feature = "cuda")]
pub use launch::{ctas, run, set_phase_timing, LayerRefs, StepRefs};

#[cfg(feature = "cuda")]
mod launch {
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig};
    use candle_core::{bail, DType, Device, Result, Tensor};

    use super::super::attention_cuda::{allow_shared_bytes, multiprocessor_count, ptx};
    use super::super::fused_cuda::{empty, with_ptrs};
    use super::super::pdl::Launch;
    use super::{StepShape, MAX_LAYERS, THREADS};

    const MODULE: &str = "decode_step";

    /// Where launches record CTA 0's clock (ns) at each phase end and after each barrier, when set.
    static TIMING: std::sync::Mutex<Option<Tensor>> = std::sync::Mutex::new(None);

    /// Makes the following launches record their phase times into `buf` (i64, on the device, at
    /// least `1 + 10 x layers` entries: the start, then per layer the end of the wait before and
    /// of the work of q/k/v, attention, o, gate/up and down), or stops it (`None`).
    pub fn set_phase_timing(buf: Option<Tensor>) {
        *TIMING.lock().unwrap_or_else(|e| e.into_inner()) = buf;
    }

    /// One layer's tensors: weights `[out, in]` in the compute dtype and its paged caches.
    pub struct LayerRefs<'a> {
        pub qkv_w: &'a Tensor,
        pub qkv_b: Option<&'a Tensor>,
        pub input_norm: &'a Tensor,
        pub o_w: &'a Tensor,
        pub post_norm: &'a Tensor,
        pub gate_up_w: &'a Tensor,
        pub down_w: &'a Tensor,
        pub k_cache: &'a Tensor,
        pub v_cache: &'a Tensor,
    }

    /// The step's inputs on the device.
    pub struct StepRefs<'a> {
        /// `[1, hidden]`: the token's embedding.
        pub x: &'a Tensor,
        /// `[1, head_dim / 2]`: the token's rotary row.
        pub cos: &'a Tensor,
        pub sin: &'a Tensor,
        /// i64 `[1]`.
        pub slot_mapping: &'a Tensor,
        /// u32 `[1, max_blocks]`.
        pub block_tables: &'a Tensor,
        /// u32 `[1]`.
        pub context_lens: &'a Tensor,
        pub eps: f32,
        pub scale: f32,
        /// Slots of each layer's cache (`num_blocks * block_size`).
        pub num_slots: usize,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct LayerPtrs {
        qkv_w: u64,
        qkv_b: u64,
        in_norm: u64,
        o_w: u64,
        post_norm: u64,
        gate_up_w: u64,
        down_w: u64,
        k_cache: u64,
        v_cache: u64,
    }

    /// `StepArgs<T>` of decode_step.cu, field for field.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct StepArgs {
        x: u64,
        out: u64,
        resid: u64,
        q: u64,
        act: u64,
        part: u64,
        barrier: u64,
        cos: u64,
        sin: u64,
        slot: u64,
        block_table: u64,
        context_len: u64,
        timing: u64,
        num_slots: i64,
        hidden: i32,
        inter: i32,
        heads: i32,
        kv_heads: i32,
        head_dim: i32,
        block_size: i32,
        max_units: i32,
        layers: i32,
        eps: f32,
        scale: f32,
        smem: [i32; 8],
        layer: [LayerPtrs; MAX_LAYERS],
    }

    // SAFETY: plain old data, passed by value as the kernel's one parameter.
    unsafe impl DeviceRepr for StepArgs {}

    /// The number of SMs of `t`'s device (the launch's CTAs).
    pub fn ctas(t: &Tensor) -> Result<usize> {
        match t.device() {
            Device::Cuda(d) => Ok(multiprocessor_count(&d.cuda_stream())),
            other => bail!("persistent decode step on a {other:?} tensor"),
        }
    }

    /// The final residual stream `[1, hidden]` (before the final norm) of one token through
    /// every layer, writing each layer's K/V at the token's slot. `shape` must be supported
    /// (`StepShape::unsupported`) and its `ctas` this device's SM count.
    pub fn run(step: &StepRefs, layers: &[LayerRefs], shape: &StepShape) -> Result<Tensor> {
        if let Some(why) = shape.unsupported() {
            bail!("persistent decode step: {why}");
        }
        if layers.len() != shape.layers {
            bail!(
                "persistent decode step: {} layers for {}",
                layers.len(),
                shape.layers
            );
        }
        let dtype = step.x.dtype();
        let suffix = match dtype {
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            other => bail!("persistent decode step: {other:?} (bf16 or f16)"),
        };
        let dev = match step.x.device() {
            Device::Cuda(d) => d.clone(),
            other => bail!("persistent decode step on {other:?}"),
        };
        let lay = shape.layout();
        let (hidden, inter) = (shape.hidden, shape.intermediate);
        let group = shape.heads / shape.kv_heads;
        let out = empty(step.x, &[1, hidden])?;
        let resid = empty(step.x, &[2 * hidden])?;
        let q = empty(step.x, &[shape.heads * shape.head_dim])?;
        let act = empty(step.x, &[inter])?;
        let part_len = shape.kv_heads * lay.max_units * group * (shape.head_dim + 2);
        // SAFETY: each unit's partials are written before the merge reads them.
        let part = unsafe { Tensor::empty(part_len, DType::F32, step.x.device())? };
        let barrier = Tensor::zeros(1, DType::U32, step.x.device())?;

        let mut outs: Vec<&Tensor> = vec![&out, &resid, &q, &act, &part];
        for l in layers {
            outs.push(l.k_cache);
            outs.push(l.v_cache);
        }
        let mut ins: Vec<&Tensor> = vec![
            step.x,
            step.cos,
            step.sin,
            step.slot_mapping,
            step.block_tables,
            step.context_lens,
            &barrier,
        ];
        for l in layers {
            for t in [
                l.qkv_w,
                l.input_norm,
                l.o_w,
                l.post_norm,
                l.gate_up_w,
                l.down_w,
            ] {
                if t.dtype() != dtype {
                    bail!(
                        "persistent decode step: a {:?} weight in a {dtype:?} model",
                        t.dtype()
                    );
                }
                ins.push(t);
            }
            ins.extend(l.qkv_b);
        }
        let ins_len = ins.len();
        let timing = TIMING.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = timing.as_ref() {
            if t.dtype() != DType::I64 || t.elem_count() < 1 + 10 * layers.len() {
                bail!("phase timing: an i64 buffer of at least 1 + 10 x layers entries");
            }
            ins.push(t);
        }
        let name = format!("decode_step_{suffix}");
        with_ptrs(&outs, &ins, &|o, i| {
            // What the kernel reads or writes 16 bytes at a time (scratch, caches, x, weights).
            let wide = o.iter().chain(&i[..1]).chain(&i[7..ins_len]);
            if wide.into_iter().any(|p| p % 16 != 0) {
                bail!("persistent decode step: x, weights and caches must be 16-byte aligned");
            }
            let timing_ptr = if timing.is_some() { i[ins_len] } else { 0 };
            let mut args = StepArgs {
                x: i[0],
                out: o[0],
                resid: o[1],
                q: o[2],
                act: o[3],
                part: o[4],
                barrier: i[6],
                cos: i[1],
                sin: i[2],
                slot: i[3],
                block_table: i[4],
                context_len: i[5],
                timing: timing_ptr,
                num_slots: step.num_slots as i64,
                hidden: hidden as i32,
                inter: inter as i32,
                heads: shape.heads as i32,
                kv_heads: shape.kv_heads as i32,
                head_dim: shape.head_dim as i32,
                block_size: shape.block_size as i32,
                max_units: lay.max_units as i32,
                layers: shape.layers as i32,
                eps: step.eps,
                scale: step.scale,
                smem: [
                    lay.part as i32,
                    lay.q as i32,
                    lay.s as i32,
                    lay.v as i32,
                    lay.w as i32,
                    lay.ml as i32,
                    0,
                    0,
                ],
                layer: [LayerPtrs::default(); MAX_LAYERS],
            };
            let mut at = 7;
            for (n, l) in layers.iter().enumerate() {
                let w = &i[at..at + 6];
                at += 6;
                let qkv_b = if l.qkv_b.is_some() {
                    at += 1;
                    i[at - 1]
                } else {
                    0
                };
                args.layer[n] = LayerPtrs {
                    qkv_w: w[0],
                    qkv_b,
                    in_norm: w[1],
                    o_w: w[2],
                    post_norm: w[3],
                    gate_up_w: w[4],
                    down_w: w[5],
                    k_cache: o[5 + 2 * n],
                    v_cache: o[6 + 2 * n],
                };
            }
            let mut b = Launch::new(&dev, &name, MODULE, ptx::DECODE_STEP)?;
            allow_shared_bytes(b.function(), lay.total)?;
            // Without programmatic dependent launch: the grid barriers' count is zeroed by the
            // memset just before, and the launch must follow it in plain stream order.
            b.ordinary().arg(&args);
            let cfg = LaunchConfig {
                grid_dim: (shape.ctas as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: lay.total as u32,
            };
            // SAFETY: `args` matches `StepArgs<T>`; an ordinary launch follows everything before it
            // in the stream; one CTA per SM keeps every CTA resident.
            unsafe { b.launch(cfg) }
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen2.5-1.5B on an H200 (132 SMs), 16-token blocks, 2k-token block tables.
    fn qwen() -> StepShape {
        StepShape {
            hidden: 1536,
            intermediate: 8960,
            heads: 12,
            kv_heads: 2,
            head_dim: 128,
            layers: 28,
            max_blocks: 128,
            block_size: 16,
            ctas: 132,
        }
    }

    #[test]
    fn a_capture_follows_the_graphs_setting_and_restores_the_thread_s() {
        set_persistent_decode_on_this_thread(Some(false));
        set_persistent_decode_in_graphs_on_this_thread(Some(true));
        {
            let _capture = CaptureSetting::on_this_thread();
            assert!(persistent_decode(), "inside a capture: the graphs' setting");
        }
        assert!(!persistent_decode(), "after it: the thread's own again");
        set_persistent_decode_in_graphs_on_this_thread(None);
        {
            let _capture = CaptureSetting::on_this_thread();
            assert!(!persistent_decode(), "graphs are off by default");
        }
        set_persistent_decode_on_this_thread(None);
    }

    #[test]
    fn qwen_layout_at_the_h200() {
        let l = qwen().layout();
        // The activation (8,960 x 2 B) is the widest row; the gate/up projection's 2 x 68 rows
        // x 6 pieces are fewer floats than the P V sums (512 threads x 8).
        assert_eq!(l.part, 17920);
        assert_eq!(l.q - l.part, 4 * 4096);
        assert_eq!(l.s - l.q, 4 * 6 * 128);
        assert_eq!(l.v - l.s, 4 * 6 * 64);
        // 64 K rows of 16 + 1 chunks, 64 V rows of 16.
        assert_eq!(l.w - l.v, 16 * 64 * 33);
        assert_eq!(l.max_units, 32);
        assert_eq!(l.ml - l.w, 4 * 12 * 32);
        assert_eq!(l.total, l.ml + 128);
        assert_eq!(qwen().unsupported(), None);
    }

    #[test]
    fn codellama_34b_gate_up_pieces_set_the_part_buffer() {
        let s = StepShape {
            hidden: 8192,
            intermediate: 22016,
            heads: 64,
            kv_heads: 8,
            layers: 48,
            ..qwen()
        };
        // 2 x ceil(22016 / 132) = 334 rows x 32 pieces of the 8,192-wide rows.
        assert_eq!(s.layout().q - s.layout().part, 4 * 334 * 32);
        assert_eq!(s.unsupported(), None);
    }

    #[test]
    fn shapes_it_cannot_take_say_why() {
        let why = |s: StepShape| s.unsupported().unwrap_or_default();
        assert!(why(StepShape {
            layers: 49,
            ..qwen()
        })
        .contains("49 layers"));
        assert!(why(StepShape {
            heads: 64,
            kv_heads: 2,
            ..qwen()
        })
        .contains("groups"));
        assert!(why(StepShape {
            head_dim: 72,
            ..qwen()
        })
        .contains("head size 72"));
        assert!(why(StepShape {
            intermediate: 8964,
            ..qwen()
        })
        .contains("multiples of 8"));
        // 64k-token tables at 64 heads: the merge weights alone are 64 x 1,024 x 4 B.
        let long = StepShape {
            heads: 64,
            kv_heads: 8,
            max_blocks: 4096,
            ..qwen()
        };
        assert!(why(long).contains("shared memory"));
    }
}
