//! The optional paths a run compares side by side: the variant columns' names, turning each on or
//! off (process-wide switches of the engine), `--without` and the CUDA-graph counters.

use anyhow::{bail, Result};
use candle_core::Device;

/// 1-row projections of rows up to `WARP_ROWS_MAX_CHUNKS` on the CTA-per-rows GEMV kernel instead
/// of the warp-per-row kernel.
pub(crate) const ONE_ROW_CTA: &str = "1-row GEMV on CTA-per-rows kernel";

/// The MLP's SiLU-gate product as its own launch instead of the 1-row gate/up GEMV's epilogue.
pub(crate) const SILU_OWN_LAUNCH: &str = "SiLU-gate as own launch";

/// The 1-row gate/up + SiLU-gate GEMV in two dependent steps of loads per row pair (`w2u4`)
/// instead of one (`w2u6`).
pub(crate) const SILU_TWO_STEPS: &str = "gate/up GEMV in two steps (w2u4)";

/// The 1-row CTA-per-rows GEMV (down projections) in three dependent steps of loads (`m1_v`)
/// instead of one (`m1_v9`).
pub(crate) const LONG_ROWS_STEPS: &str = "down GEMV in steps (m1_v)";

/// The bias, rotary and KV-cache write as their own launch instead of the 1-row q/k/v GEMV's
/// epilogue.
pub(crate) const ROPE_OWN_LAUNCH: &str = "rotary + KV write as own launch";

/// The residual add + RMSNorm as its own launch instead of folded into the 1-row q/k/v and
/// gate/up GEMVs.
pub(crate) const NORM_OWN_LAUNCH: &str = "add + RMSNorm as own launch";

/// The split paged attention's partitions merged in the kernel's last CTA instead of by the
/// combine launch (off in the engine).
pub(crate) const COMBINE_IN_KERNEL: &str = "attention combine in the kernel";

/// The engine's kernels as ordinary launches instead of with programmatic dependent launch
/// (eager launches only: CUDA graphs are captured without it).
pub(crate) const NO_PDL: &str = "ordinary launches (no PDL)";

/// Split decode attention through partials and the combine launch instead of the cluster merge.
pub(crate) const NO_DECODE_CLUSTER: &str = "decode combine launch (no cluster)";

/// Decode attention of whole GQA groups on the CUDA-core decode kernel instead of the tensor-core
/// one.
pub(crate) const NO_DECODE_TC: &str = "CUDA-core decode attention";

/// The tensor-core decode kernel's key tiles copied after its wait for the kernel before instead
/// of before it (timed with `--without early-kv` only).
pub(crate) const NO_EARLY_KV: &str = "decode K/V copies after the wait";

/// CUDA graphs captured without programmatic dependent launch (timed with `--without pdl-graphs`
/// only: every variant but "as served" runs eagerly).
pub(crate) const NO_PDL_GRAPHS: &str = "graphs without programmatic edges";

/// Greedy steps' token ids from candle's `argmax` instead of the engine's argmax kernel (timed with
/// `--without argmax` only: it changes the runner step, not the forward).
pub(crate) const NO_ARGMAX_KERNEL: &str = "candle's argmax for greedy steps";

/// Short decode attention launches without their L2 warm-up of the next projections' weights.
pub(crate) const NO_WARM_L2: &str = "no L2 warm-up in attention";

/// Eager batch-1 decode steps through the persistent decode step (off in the engine) instead of
/// the per-op launches.
pub(crate) const PERSISTENT: &str = "persistent decode step";

/// The decode variant without CUDA graphs (timed only with `--cuda-graphs`).
pub(crate) const EAGER: &str = "eager (no CUDA graphs)";

/// Settings the decode forward is also timed under (beside the engine's own): each is turned on,
/// measured and turned back off. With CUDA graphs, every variant but "as served" runs eagerly.
pub(crate) fn variant_names(cuda_graphs: bool) -> Vec<&'static str> {
    let mut v = vec![
        "as served",
        PERSISTENT,
        "cuBLAS for every projection",
        ONE_ROW_CTA,
        SILU_OWN_LAUNCH,
        SILU_TWO_STEPS,
        LONG_ROWS_STEPS,
        ROPE_OWN_LAUNCH,
        NORM_OWN_LAUNCH,
        COMBINE_IN_KERNEL,
        NO_PDL,
        NO_DECODE_CLUSTER,
        NO_WARM_L2,
        NO_DECODE_TC,
        "paged kernel for decode",
        "unfused ops",
        "cudarc event tracking on",
    ];
    if cuda_graphs {
        v.insert(1, EAGER);
    }
    v
}

#[cfg(feature = "cuda")]
pub(crate) fn set_variant(
    device: &Device,
    variant: &str,
    on: bool,
    cuda_graphs: bool,
) -> Result<()> {
    if variant != "as served" {
        engine::model::cuda_graph::set_cuda_graphs(cuda_graphs && !on);
    }
    // The other per-op variants change kernels the persistent step does not launch: under
    // `--persistent-decode` their eager batch-1 steps run per-op (the caller restores the run's
    // own setting afterwards).
    if !matches!(
        variant,
        "as served" | EAGER | "cudarc event tracking on" | PERSISTENT
    ) && on
    {
        engine::model::decode_step::set_persistent_decode(false);
    }
    if variant == "cudarc event tracking on" {
        engine::gpu_memory::set_event_tracking(device, on)?;
    } else {
        set_path(variant, on);
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn set_variant(_: &Device, _: &str, _: bool, _: bool) -> Result<()> {
    Ok(())
}

/// Takes the variant `variant` of an engine path (`on`) or goes back to the engine's own (off);
/// false when `variant` names no path of this build.
pub(crate) fn set_path(variant: &str, on: bool) -> bool {
    match variant {
        "unfused ops" => engine::model::fused::set_fused_kernels(!on),
        "cuBLAS for every projection" => engine::model::gemv::set_gemv_kernel(!on),
        ONE_ROW_CTA => engine::model::gemv::set_gemv_warp_rows(!on),
        PERSISTENT => engine::model::decode_step::set_persistent_decode(on),
        SILU_OWN_LAUNCH => engine::model::gemv::set_gemv_silu_epilogue(!on),
        SILU_TWO_STEPS => engine::model::gemv::set_gemv_silu_one_step(!on),
        LONG_ROWS_STEPS => engine::model::gemv::set_gemv_long_rows_one_step(!on),
        ROPE_OWN_LAUNCH => engine::model::gemv::set_gemv_rope_epilogue(!on),
        NORM_OWN_LAUNCH => engine::model::gemv::set_gemv_norm_fold(!on),
        NO_ARGMAX_KERNEL => engine::model::greedy::set_argmax_kernel(!on),
        #[cfg(feature = "cuda")]
        COMBINE_IN_KERNEL => engine::model::attention_cuda::set_in_kernel_combine(on),
        #[cfg(feature = "cuda")]
        NO_PDL => engine::model::pdl::set_pdl(!on),
        #[cfg(feature = "cuda")]
        NO_WARM_L2 => engine::model::attention_cuda::set_warm_l2(!on),
        #[cfg(feature = "cuda")]
        NO_DECODE_CLUSTER => engine::model::attention_cuda::set_decode_cluster(!on),
        #[cfg(feature = "cuda")]
        NO_PDL_GRAPHS => engine::model::pdl::set_pdl_in_graphs(!on),
        #[cfg(feature = "cuda")]
        NO_EARLY_KV => engine::model::attention_cuda::set_decode_early_kv(!on),
        #[cfg(feature = "cuda")]
        NO_DECODE_TC => engine::model::attention_cuda::set_decode_tensor_cores(!on),
        #[cfg(feature = "cuda")]
        "paged kernel for decode" => engine::model::attention_cuda::set_decode_kernel(!on),
        _ => return false,
    }
    true
}

/// `--without` keys and the variant each takes for the whole run.
pub(crate) const WITHOUT: [(&str, &str); 15] = [
    ("silu", SILU_OWN_LAUNCH),
    ("rope", ROPE_OWN_LAUNCH),
    ("warp-rows", ONE_ROW_CTA),
    ("fused", "unfused ops"),
    ("silu-one-step", SILU_TWO_STEPS),
    ("norm", NORM_OWN_LAUNCH),
    ("down-one-step", LONG_ROWS_STEPS),
    ("argmax", NO_ARGMAX_KERNEL),
    ("decode-kernel", "paged kernel for decode"),
    ("pdl", NO_PDL),
    ("cluster", NO_DECODE_CLUSTER),
    ("warm", NO_WARM_L2),
    ("tensor-cores", NO_DECODE_TC),
    ("early-kv", NO_EARLY_KV),
    ("pdl-graphs", NO_PDL_GRAPHS),
];

/// Turns one optional path off for the whole run (`--without`).
pub(crate) fn turn_off(path: &str) -> Result<()> {
    match WITHOUT.iter().find(|(key, _)| *key == path) {
        Some((_, variant)) if set_path(variant, true) => Ok(()),
        _ => {
            let keys: Vec<&str> = WITHOUT.iter().map(|(key, _)| *key).collect();
            bail!(
                "--without {path}: not one of {} (the last seven need CUDA)",
                keys.join(", ")
            )
        }
    }
}

/// The CUDA-graph counters: (replays, failed captures, why the last capture failed).
#[cfg(feature = "cuda")]
pub(crate) fn graph_status() -> (usize, usize, Option<String>) {
    use engine::model::cuda_graph::{graph_counts, last_capture_error};
    let (replays, failed) = graph_counts();
    (replays, failed, last_capture_error())
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn graph_status() -> (usize, usize, Option<String>) {
    (0, 0, None)
}

#[cfg(feature = "cuda")]
pub(crate) fn set_flash_prefill(on: bool) {
    use engine::model::attention_cuda::{set_prefill_kernel, PrefillKernel};
    set_prefill_kernel(if on {
        PrefillKernel::TensorCore
    } else {
        PrefillKernel::Paged
    });
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn set_flash_prefill(_: bool) {}
