//! Skinny projections `x W^T` (1..=`MAX_ROWS` rows of x): one bandwidth-bound CUDA kernel (for one
//! row with the SiLU-gate product after it fused in where it fits, and on request the residual add
//! + RMSNorm before it), candle's matmul otherwise.

use candle_core::{Result, Tensor};

/// Most rows of x the CUDA kernel takes (`engine/kernels/gemv.cu` is instantiated for 1..=8).
pub const MAX_ROWS: usize = 8;
/// Most rows the model sends to the kernel: on an H200 at the Qwen2.5-1.5B projections it beat
/// cuBLAS at 1 row (42 against 48 us per layer) and lost at 8 (71 against 47 us;
/// `days/gpu-engine/run10/gemv-bw.log`). A thread's override `Some(true)` takes it up to `MAX_ROWS`.
pub const SERVED_ROWS: usize = 1;

crate::switch! {
    static GEMV = true;
}

crate::switch! {
    /// One row of x on the warp-per-row kernel (on) or on the CTA-per-rows kernel the other row
    /// counts use (off).
    static WARP_ROWS = true;
}

crate::switch! {
    /// The MLP's SiLU-gate product as the epilogue of a 1-row gate/up projection (on) or as its own
    /// `fused::silu_mul` launch (off).
    static SILU_EPILOGUE = true;
}

crate::switch! {
    /// The 1-row gate/up projection with the SiLU-gate epilogue on its one-step variant
    /// (`w2u6`: a lane's six chunks of a row pair in flight at once, 6 CTAs per SM) (on) or on
    /// `w2u4` (four chunks per step, 8 CTAs per SM: two dependent steps per pair of 1,536-element
    /// rows) (off). Same bits either way.
    static SILU_ONE_STEP = true;
}

crate::switch! {
    /// One row of x over rows of `ONE_STEP_CHUNKS` on the CTA-per-rows kernel's one-step variant
    /// (`m1_v9`: nine chunks per thread and row in flight) (on) or on `m1_v` (four per step:
    /// three dependent steps over Qwen2.5-1.5B's 8,960-element down rows) (off). Same bits either
    /// way.
    static LONG_ROWS_ONE_STEP = true;
}

/// Row lengths (16-byte chunks) that take `m1_v9`: more than two steps of `m1_v` (1,024 chunks)
/// and at most one of `m1_v9` (1,152). On an H200 it saved 0.02 ms of a Qwen2.5-1.5B batch-1
/// step (1,120-chunk down rows) and cost 0.26 ms of a CodeLlama-34B one when it took every
/// projection there (1,024- and 2,752-chunk rows: 6 CTAs per SM drop to 4 for its registers).
pub const ONE_STEP_CHUNKS: std::ops::RangeInclusive<usize> = 1025..=1152;

crate::switch! {
    /// The bias, rotary and KV-cache write as the epilogue of a 1-row fused q/k/v projection (on) or
    /// as their own `fused::qkv_rope_cache` launch (off).
    static ROPE_EPILOGUE = true;
}

crate::switch! {
    /// The residual add + RMSNorm before a 1-row q/k/v or gate/up projection with an epilogue
    /// folded into that projection (on, the default) or as its own `fused::add_rms_norm` launch
    /// (off). Folded, every warp sums the squares of the row it reads anyway and scales its dot
    /// products once at the end (gemv.cu, `NORM`): nothing is added before the first weight
    /// loads, where the earlier prologue (the normed row computed per CTA before the projection,
    /// bit for bit add_rms_norm) cost about what the launch it replaced did (run34, run35). A
    /// graphed batch-1 step at the Qwen2.5-1.5B shape (H200, context 1k, days/gpu-engine/run60,
    /// two rounds): 1.297 / 1.304 ms folded, 1.332 / 1.336 with the launches. Within rounding of
    /// add_rms_norm then the projection, not bit for bit: the normed row is not rounded to the
    /// dtype.
    static NORM_FOLD = true;
}

/// Turns the folded RMSNorm of 1-row q/k/v and gate/up projections on or off process-wide.
pub fn set_gemv_norm_fold(enabled: bool) {
    NORM_FOLD.set(enabled);
}

/// [`set_gemv_norm_fold`] for calls on this thread (`None`: the process-wide value).
pub fn set_gemv_norm_fold_on_this_thread(enabled: Option<bool>) {
    NORM_FOLD.set_on_this_thread(enabled);
}

/// Whether a 1-row projection on this thread that takes an epilogue also takes the folded RMSNorm
/// (when it fits).
pub fn gemv_norm_fold() -> bool {
    NORM_FOLD.on()
}

/// Turns the rotary epilogue of 1-row q/k/v projections on or off process-wide.
pub fn set_gemv_rope_epilogue(enabled: bool) {
    ROPE_EPILOGUE.set(enabled);
}

/// [`set_gemv_rope_epilogue`] for calls on this thread (`None`: the process-wide value).
pub fn set_gemv_rope_epilogue_on_this_thread(enabled: Option<bool>) {
    ROPE_EPILOGUE.set_on_this_thread(enabled);
}

/// Whether a 1-row q/k/v projection on this thread takes the rotary epilogue (when it fits).
pub fn gemv_rope_epilogue() -> bool {
    ROPE_EPILOGUE.on()
}

/// Turns the SiLU-gate epilogue of 1-row gate/up projections on or off process-wide.
pub fn set_gemv_silu_epilogue(enabled: bool) {
    SILU_EPILOGUE.set(enabled);
}

/// Turns the one-step variant of the 1-row gate/up + SiLU-gate kernel on or off process-wide.
pub fn set_gemv_silu_one_step(enabled: bool) {
    SILU_ONE_STEP.set(enabled);
}

/// [`set_gemv_silu_one_step`] for calls on this thread (`None`: the process-wide value).
pub fn set_gemv_silu_one_step_on_this_thread(enabled: Option<bool>) {
    SILU_ONE_STEP.set_on_this_thread(enabled);
}

/// Turns the one-step variant of the 1-row CTA-per-rows kernel on or off process-wide.
pub fn set_gemv_long_rows_one_step(enabled: bool) {
    LONG_ROWS_ONE_STEP.set(enabled);
}

/// [`set_gemv_long_rows_one_step`] for calls on this thread (`None`: the process-wide value).
pub fn set_gemv_long_rows_one_step_on_this_thread(enabled: Option<bool>) {
    LONG_ROWS_ONE_STEP.set_on_this_thread(enabled);
}

/// The suffix of the CTA-per-rows kernel for `m` rows of x over rows of `chunks` 16-byte chunks
/// (`_v`, or `_v9` for one row of `ONE_STEP_CHUNKS` with the one-step switch on); the caller
/// adds the element-wise kernel's "".
pub fn cta_rows_variant(m: usize, chunks: usize) -> &'static str {
    match m == 1 && ONE_STEP_CHUNKS.contains(&chunks) && LONG_ROWS_ONE_STEP.on() {
        true => "_v9",
        false => "_v",
    }
}

/// The kernel variant (`w<rows per warp>u<unroll>` in gemv.cu) and CTAs per SM of the 1-row
/// gate/up + SiLU-gate kernel on this thread.
pub fn silu_variant() -> (&'static str, usize) {
    match SILU_ONE_STEP.on() {
        true => ("w2u6", 6),
        false => ("w2u4", WARP_ROW_CTAS),
    }
}

/// [`set_gemv_silu_epilogue`] for calls on this thread (`None`: the process-wide value).
pub fn set_gemv_silu_epilogue_on_this_thread(enabled: Option<bool>) {
    SILU_EPILOGUE.set_on_this_thread(enabled);
}

/// Picks the kernel for 1-row projections on this thread (`None`: the process-wide value, the
/// warp-per-row kernel unless `set_gemv_warp_rows` turned it off): side-by-side benchmarks.
pub fn set_gemv_warp_rows_on_this_thread(enabled: Option<bool>) {
    WARP_ROWS.set_on_this_thread(enabled);
}

/// Turns the warp-per-row kernel for 1-row projections on or off process-wide.
pub fn set_gemv_warp_rows(enabled: bool) {
    WARP_ROWS.set(enabled);
}

/// Whether a 1-row projection on this thread takes the warp-per-row kernel.
pub fn gemv_warp_rows() -> bool {
    WARP_ROWS.on()
}

/// Turns the skinny-matmul CUDA kernel on or off process-wide (on by default); off, every
/// projection takes candle's matmul (cuBLAS). For side-by-side benchmarks.
pub fn set_gemv_kernel(enabled: bool) {
    GEMV.set(enabled);
}

/// Overrides the process-wide switch for calls on this thread (`None`: follow it); for tests
/// that compare both paths while other threads run models.
pub fn set_gemv_kernel_on_this_thread(enabled: Option<bool>) {
    GEMV.set_on_this_thread(enabled);
}

/// Whether projections called on this thread may take the kernel.
pub fn gemv_kernel_enabled() -> bool {
    max_kernel_rows() > 0
}

/// Most rows of x that take the kernel on this thread: `SERVED_ROWS` when the switch is on,
/// `MAX_ROWS` under a thread override `Some(true)`, none when off.
fn max_kernel_rows() -> usize {
    match GEMV.this_thread() {
        Some(true) => MAX_ROWS,
        Some(false) => 0,
        None if GEMV.process() => SERVED_ROWS,
        None => 0,
    }
}

/// Longest rows (16-byte chunks) the warp-per-row kernel takes: 2,048 16-bit elements. On an
/// H200 it beat the CTA-per-rows kernel at Qwen2.5-1.5B's 1,536-element rows and lost at
/// 8,960 (`days/gpu-engine/run13/gemv-bw.log`) and at CodeLlama-34B's 8,192 (`run14`).
pub const WARP_ROWS_MAX_CHUNKS: usize = 256;

/// CTAs per SM of the warp-per-row kernels (`WARP_ROW_CTAS` in gemv.cu; its rotary-pair variant
/// takes 4, the one-step SiLU-pair variant 6).
pub const WARP_ROW_CTAS: usize = 8;

/// Kernel variant (`w<rows per warp>u<unroll>` in gemv.cu) and CTA count of the warp-per-row
/// kernel for `n` rows on `sms` SMs with `warps_per_cta` (8 CTAs per SM): 2 rows per warp when
/// that still fills half the resident warps, else 1 with deeper unrolling (more warps and bytes
/// in flight where there are few rows). The grid is the fewest CTAs that take as many rounds of
/// row groups as a full GPU would, so that every warp gets the same number of groups (no tail
/// wave).
pub fn warp_rows_plan(n: usize, sms: usize, warps_per_cta: usize) -> (&'static str, u32) {
    let resident = sms * WARP_ROW_CTAS * warps_per_cta;
    let (variant, wr) = if n.div_ceil(2) >= resident / 2 {
        ("w2u4", 2)
    } else {
        ("w1u8", 1)
    };
    (
        variant,
        even_rounds_ctas(n.div_ceil(wr), resident, warps_per_cta),
    )
}

/// Fewest CTAs of `warps_per_cta` warps that take `groups` row groups in as many rounds as
/// `resident` warps would.
fn even_rounds_ctas(groups: usize, resident: usize, warps_per_cta: usize) -> u32 {
    let rounds = groups.div_ceil(resident).max(1);
    groups.div_ceil(rounds).div_ceil(warps_per_cta) as u32
}

/// CTA count of the SiLU-pair variant of the warp-per-row kernel for `inter` outputs (pairs of
/// a gate and an up row) on `sms` SMs with `ctas_per_sm` resident: like [`warp_rows_plan`] with
/// one pair per warp and round.
pub fn silu_pairs_plan(inter: usize, sms: usize, warps_per_cta: usize, ctas_per_sm: usize) -> u32 {
    even_rounds_ctas(inter, sms * ctas_per_sm * warps_per_cta, warps_per_cta)
}

/// CTA count of the rotary-pair variant of the warp-per-row kernel (4 CTAs per SM) for `pairs`
/// row pairs on `sms` SMs: as few CTAs as take the pairs in the rounds a full GPU would need.
pub fn rope_pairs_plan(pairs: usize, sms: usize, warps_per_cta: usize) -> u32 {
    even_rounds_ctas(pairs, sms * 4 * warps_per_cta, warps_per_cta)
}

/// The MLP's `silu(x W_gate^T) * (x W_up^T)` from the fused `[gate | up]` weight W
/// `[2 * inter, k]`: on CUDA one row of x takes the warp-per-row kernel with the SiLU-gate
/// product as its epilogue (one launch instead of two, same bits) when the fused kernels, the
/// warp-per-row kernel and the epilogue switch are on and the rows fit it; everything else is [`matmul_t`] then
/// `fused::silu_mul`.
pub fn gate_up_silu(x: &Tensor, w: &Tensor, inter: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if takes_silu_kernel(x, w, inter) {
        return super::gemv_cuda::gemv_silu(x, w, inter);
    }
    super::fused::silu_mul(&matmul_t(x, w)?, inter)
}

/// [`gate_up_silu`] of `add_rms_norm(addend, residual, norm_w, eps)` (`fused::add_rms_norm`: the
/// normed rows and their sum `addend + residual`, the next residual), returning the activation
/// `[n, inter]` and the sum `[n, k]`. On CUDA a row that takes the SiLU-gate epilogue also takes
/// the add and norm folded into the projection when the fold switch is on and the residual and
/// norm weight fit it (one launch instead of two, within rounding); everything else is
/// `fused::add_rms_norm` then [`gate_up_silu`].
pub fn add_rms_norm_gate_up_silu(
    addend: &Tensor,
    residual: &Tensor,
    norm_w: &Tensor,
    eps: f32,
    w: &Tensor,
    inter: usize,
) -> Result<(Tensor, Tensor)> {
    super::fused::check_add_rms_norm("add_rms_norm_gate_up_silu", addend, residual, norm_w)?;
    #[cfg(feature = "cuda")]
    if takes_silu_kernel(addend, w, inter) && takes_norm_fold(addend, residual, norm_w) {
        return super::gemv_cuda::gemv_silu_norm(addend, residual, norm_w, eps, w, inter);
    }
    let (h, sum) = super::fused::add_rms_norm(addend, residual, norm_w, eps)?;
    Ok((gate_up_silu(&h, w, inter)?, sum))
}

#[cfg(feature = "cuda")]
fn takes_silu_kernel(x: &Tensor, w: &Tensor, inter: usize) -> bool {
    w.dims().first() == Some(&(2 * inter)) && SILU_EPILOGUE.on() && takes_pair_epilogue(x, w)
}

/// Whether a 1-row projection of `add_rms_norm(addend, residual, norm_w)` that takes a paired-rows
/// epilogue (the caller checks that with `addend` as x) may also take the folded RMSNorm: the
/// switch on, and the residual `[1, k]` and the norm weight `[k]` contiguous, 16-byte aligned, of
/// `addend`'s dtype and device.
#[cfg(feature = "cuda")]
pub(crate) fn takes_norm_fold(addend: &Tensor, residual: &Tensor, norm_w: &Tensor) -> bool {
    let elem = addend.dtype().size_in_bytes();
    let fits = |t: &Tensor| {
        t.dtype() == addend.dtype()
            && t.device().same_device(addend.device())
            && t.is_contiguous()
            && (t.layout().start_offset() * elem).is_multiple_of(16)
    };
    NORM_FOLD.on()
        && residual.dims() == addend.dims()
        && norm_w.dims() == addend.dims().get(1..).unwrap_or_default()
        && fits(residual)
        && fits(norm_w)
}

/// Whether the 1-row projection `x W^T` may take a paired-rows epilogue of the warp-per-row
/// kernel (`gemv_*_m1_w2u*_{silu,rope}[_norm]`): one contiguous 16-byte aligned row of x on CUDA whose
/// length is a whole number of at most `WARP_ROWS_MAX_CHUNKS` 16-byte chunks, the GEMV kernel,
/// its warp-per-row variant and the fused kernels all on. The caller checks its own switch and
/// W's rows.
#[cfg(feature = "cuda")]
pub(crate) fn takes_pair_epilogue(x: &Tensor, w: &Tensor) -> bool {
    let elem = x.dtype().size_in_bytes();
    let chunk = 16 / elem;
    let aligned = |t: &Tensor| (t.layout().start_offset() * elem).is_multiple_of(16);
    match x.dims() {
        &[1, k] => {
            k.is_multiple_of(chunk)
                && k / chunk <= WARP_ROWS_MAX_CHUNKS
                && aligned(x)
                && aligned(w)
                && takes_kernel(x, w)
                && gemv_warp_rows()
                && super::fused::fused_kernels()
        }
        _ => false,
    }
}

/// `x W^T` for x `[m, k]` and a weight W `[n, k]` (the Linear layout). CUDA tensors with
/// 1..=`SERVED_ROWS` (a thread override: `MAX_ROWS`) contiguous rows and a contiguous weight of the same dtype (f32, f16, bf16) take
/// the kernel (f32 accumulation, one rounding); everything else is exactly `x.matmul(&w.t()?)`.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if takes_kernel(x, w) {
        return super::gemv_cuda::gemv(x, w);
    }
    x.matmul(&w.t()?)
}

#[cfg(feature = "cuda")]
fn takes_kernel(x: &Tensor, w: &Tensor) -> bool {
    use candle_core::DType;
    let shapes_fit = match (x.dims(), w.dims()) {
        (&[m, k], &[n, k2]) => (1..=max_kernel_rows()).contains(&m) && k == k2 && k > 0 && n > 0,
        _ => false,
    };
    shapes_fit
        && x.device().is_cuda()
        && x.device().same_device(w.device())
        && x.dtype() == w.dtype()
        && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && x.is_contiguous()
        && w.is_contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn bits(t: &Tensor) -> Vec<u32> {
        let v = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        v.to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    }

    #[test]
    fn cpu_is_candle_matmul_bit_for_bit() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for m in [1, 3, 8, 9] {
                let x = Tensor::randn(0f32, 1f32, (m, 40), &Device::Cpu)
                    .and_then(|t| t.to_dtype(dtype))
                    .unwrap();
                let w = Tensor::randn(0f32, 1f32, (24, 40), &Device::Cpu)
                    .and_then(|t| t.to_dtype(dtype))
                    .unwrap();
                let got = matmul_t(&x, &w).unwrap();
                let want = x.matmul(&w.t().unwrap()).unwrap();
                assert_eq!((got.dims(), got.dtype()), (want.dims(), dtype));
                assert_eq!(bits(&got), bits(&want));
            }
        }
    }

    #[test]
    fn warp_rows_plan_fills_the_gpu_in_even_rounds() {
        // 132 SMs x 8 CTAs x 4 warps = 4,224 resident warps.
        // Qwen2.5-1.5B: qkv 2,048 rows -> one row per warp, one round.
        assert_eq!(warp_rows_plan(2048, 132, 4), ("w1u8", 512));
        // gate_up 17,920 rows -> 8,960 pairs: 3 rounds of 2,987 warps (747 CTAs).
        assert_eq!(warp_rows_plan(17920, 132, 4), ("w2u4", 747));
        // Tiny: one warp.
        assert_eq!(warp_rows_plan(1, 132, 4), ("w1u8", 1));
        for n in [1, 5, 1536, 4223, 4224, 4225, 44032, 151936] {
            let (variant, ctas) = warp_rows_plan(n, 132, 4);
            let wr = if variant == "w2u4" { 2 } else { 1 };
            let (groups, warps) = (n.div_ceil(wr), ctas as usize * 4);
            let rounds = groups.div_ceil(warps);
            // Every row is covered, in no more rounds than a full GPU needs, and no warp idles in
            // a round but the last CTA's (rounding to whole CTAs) and one per round (rounding
            // groups over rounds).
            assert!(warps * rounds >= groups, "n {n}");
            assert_eq!(rounds, groups.div_ceil(4224), "n {n}");
            assert!(
                warps * rounds - groups < 5 * rounds,
                "n {n}: {warps} warps, {rounds} rounds"
            );
        }
    }

    #[test]
    fn silu_pairs_plan_matches_the_two_row_plan() {
        // Qwen2.5-1.5B's 8,960 gate/up pairs: the grid of the plain kernel over its 17,920 rows.
        assert_eq!(silu_pairs_plan(8960, 132, 4, 8), 747);
        for inter in [1, 7, 1536, 2112, 4224, 4225, 11008, 22016] {
            let ctas = silu_pairs_plan(inter, 132, 4, 8) as usize;
            let rounds = inter.div_ceil(ctas * 4);
            assert_eq!(rounds, inter.div_ceil(4224), "inter {inter}");
            assert!(ctas * 4 * rounds - inter < 5 * rounds, "inter {inter}");
        }
        // The one-step variant at 6 CTAs per SM (3,168 warps): the same three rounds at 8,960,
        // 747 CTAs of the 792 that fit.
        assert_eq!(silu_pairs_plan(8960, 132, 4, 6), 747);
        for inter in [1, 3168, 3169, 11008] {
            let ctas = silu_pairs_plan(inter, 132, 4, 6) as usize;
            assert_eq!(
                inter.div_ceil(ctas * 4),
                inter.div_ceil(3168),
                "inter {inter}"
            );
        }
    }

    #[test]
    fn cta_rows_variant_is_one_step_for_one_row_only() {
        set_gemv_long_rows_one_step_on_this_thread(Some(true));
        // Qwen2.5-1.5B's down rows (8,960 bf16: 1,120 chunks); not CodeLlama-34B's 8,192 or
        // 22,016 elements (1,024 / 2,752 chunks), not two rows.
        assert_eq!(cta_rows_variant(1, 1120), "_v9");
        assert_eq!(cta_rows_variant(1, 1152), "_v9");
        assert_eq!(cta_rows_variant(1, 1024), "_v");
        assert_eq!(cta_rows_variant(1, 2752), "_v");
        assert_eq!(cta_rows_variant(2, 1120), "_v");
        set_gemv_long_rows_one_step_on_this_thread(Some(false));
        assert_eq!(cta_rows_variant(1, 1120), "_v");
        set_gemv_long_rows_one_step_on_this_thread(None);
    }

    #[test]
    fn silu_variant_follows_its_switch() {
        set_gemv_silu_one_step_on_this_thread(Some(false));
        assert_eq!(silu_variant(), ("w2u4", 8));
        set_gemv_silu_one_step_on_this_thread(Some(true));
        assert_eq!(silu_variant(), ("w2u6", 6));
        set_gemv_silu_one_step_on_this_thread(None);
    }

    #[test]
    fn rope_pairs_plan_takes_every_pair_in_the_fewest_rounds() {
        // Qwen2.5-1.5B's q/k/v: (12 + 2 x 2) heads x 64 pairs = 1,024 pairs, one round of 256 CTAs
        // (2,112 warps resident at 4 CTAs per SM).
        assert_eq!(rope_pairs_plan(1024, 132, 4), 256);
        for pairs in [1, 64, 2112, 2113, 5120] {
            let ctas = rope_pairs_plan(pairs, 132, 4) as usize;
            let rounds = pairs.div_ceil(ctas * 4);
            assert_eq!(rounds, pairs.div_ceil(2112), "pairs {pairs}");
            assert!(ctas * 4 * rounds - pairs < 5 * rounds, "pairs {pairs}");
        }
    }

    #[test]
    fn add_rms_norm_gate_up_silu_cpu_is_the_unfused_sequence() {
        let (hidden, inter) = (40, 24);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let randn = |shape: &[usize]| {
                Tensor::randn(0f32, 1f32, shape, &Device::Cpu)
                    .and_then(|t| t.to_dtype(dtype))
                    .unwrap()
            };
            let (out, x, norm_w) = (randn(&[1, hidden]), randn(&[1, hidden]), randn(&[hidden]));
            let w = randn(&[2 * inter, hidden]);
            let (act, sum) = add_rms_norm_gate_up_silu(&out, &x, &norm_w, 1e-6, &w, inter).unwrap();
            let (h, want_sum) = crate::model::fused::add_rms_norm(&out, &x, &norm_w, 1e-6).unwrap();
            let want_act = gate_up_silu(&h, &w, inter).unwrap();
            assert_eq!(
                (act.dims(), sum.dims()),
                (&[1, inter][..], &[1, hidden][..])
            );
            assert_eq!(bits(&sum), bits(&want_sum));
            assert_eq!(bits(&act), bits(&want_act));
            // A residual of another shape is refused with the shapes.
            let err =
                add_rms_norm_gate_up_silu(&out, &randn(&[2, hidden]), &norm_w, 1e-6, &w, inter)
                    .unwrap_err()
                    .to_string();
            assert!(err.contains("residual [2, 40]"), "{err}");
        }
    }

    #[test]
    fn norm_fold_thread_override_wins_over_the_switch() {
        set_gemv_norm_fold_on_this_thread(Some(false));
        assert!(!gemv_norm_fold());
        set_gemv_norm_fold_on_this_thread(Some(true));
        assert!(gemv_norm_fold());
        set_gemv_norm_fold_on_this_thread(None);
    }

    #[test]
    fn thread_override_wins_over_the_switch() {
        set_gemv_kernel_on_this_thread(Some(false));
        assert!(!gemv_kernel_enabled());
        set_gemv_kernel_on_this_thread(Some(true));
        assert!(gemv_kernel_enabled());
        set_gemv_kernel_on_this_thread(None);
    }
}
