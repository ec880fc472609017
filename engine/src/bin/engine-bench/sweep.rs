//! The context-split sweep (`--attn-splits`, `--decode-splits`): decode attention over every layer
//! at each batch size under each split of the paged and decode kernels.

use super::timing::QueuedTimer;
use super::{decode_step, parts, Cli};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use engine::config::ModelConfig;
use engine::model::KvCache;

/// Decode attention (every layer, queued GPU ms) at each batch size under each `--attn-splits`
/// setting of the paged kernel (decode kernel off) and each `--decode-splits` setting of the
/// decode kernel: rows of (setting, [(batch, ms)]).
pub(crate) fn split_sweep(
    device: &Device,
    dtype: DType,
    cfg: &ModelConfig,
    cli: &Cli,
    cache: &KvCache,
) -> Result<Vec<(String, Vec<(usize, f64)>)>> {
    use engine::model::attention_cuda::{
        decode_split, flash_decode_split, paged_split, set_decode_cluster_on_this_thread,
        set_decode_head_tile, set_decode_kernel_on_this_thread, set_decode_split,
        set_decode_tensor_cores_on_this_thread, set_flash_decode_split, set_paged_split,
    };
    let defaults = (paged_split(), decode_split(), flash_decode_split());
    let mut q = QueuedTimer::new(device)?;
    let mut rows = Vec::new();
    let settings = cli
        .attn_splits
        .iter()
        .map(|s| ("paged", s))
        .chain(cli.decode_splits.iter().map(|s| ("decode", s)));
    for (kernel, setting) in settings {
        let (ab, opts) = match setting.match_indices(':').nth(1) {
            Some((i, _)) => (&setting[..i], &setting[i + 1..]),
            None => (setting.as_str(), ""),
        };
        let (a, b) = parse_split(ab)?;
        let fields = opts.split(':').map(str::trim).filter(|f| !f.is_empty());
        // Decode kernel options after A:B: `g<N>` query heads per CTA, `combine`, `tc`.
        let (mut tile, mut combine, mut tc) = (cli.decode_head_tile, false, false);
        for f in fields {
            match (f, f.strip_prefix('g')) {
                ("combine", _) if kernel == "decode" => combine = true,
                ("tc", _) if kernel == "decode" => tc = true,
                (_, Some(g)) if kernel == "decode" => tile = Some(g.parse()?),
                _ => bail!(
                    "split {setting:?}: unknown option {f:?} (decode splits take g<N>, combine, tc)"
                ),
            }
        }
        set_decode_head_tile(tile)?;
        set_decode_cluster_on_this_thread(combine.then_some(false));
        set_decode_tensor_cores_on_this_thread(Some(tc));
        if tc {
            set_flash_decode_split(a, b);
        }
        // Each kernel at every batch size (the engine picks by size: DECODE_MIN_SEQS).
        if kernel == "paged" {
            set_decode_kernel_on_this_thread(Some(false));
            set_paged_split(a, b);
        } else {
            set_decode_kernel_on_this_thread(Some(true));
            set_decode_split(a, b);
        }
        let mut row = Vec::new();
        let mut time = |f: &mut dyn FnMut() -> Result<()>| q.time(device, f);
        for &batch in &cli.batch_sizes {
            let step = decode_step(batch, cli.context, cli.block_size, cfg.vocab_size);
            let fb = engine::runner::build_forward_batch(&step, cli.block_size)?;
            let ms =
                parts::attention_ms(device, dtype, cfg, &fb, cache, cli.iters.max(1), &mut time)?;
            eprintln!("attention {kernel} {setting}, batch {batch}: {ms:.3} ms");
            row.push((batch, ms));
        }
        rows.push((format!("{kernel} {setting}"), row));
    }
    set_paged_split(defaults.0 .0, defaults.0 .1);
    set_decode_split(defaults.1 .0, defaults.1 .1);
    set_flash_decode_split(defaults.2 .0, defaults.2 .1);
    set_decode_kernel_on_this_thread(None);
    set_decode_cluster_on_this_thread(None);
    set_decode_tensor_cores_on_this_thread(None);
    set_decode_head_tile(cli.decode_head_tile)?;
    Ok(rows)
}

/// `A:B` as two counts (a context split: CTAs per SM and the least partition).
pub(crate) fn parse_split(s: &str) -> Result<(usize, usize)> {
    let (a, b) = s
        .split_once(':')
        .with_context(|| format!("split {s:?}: want A:B"))?;
    Ok((a.trim().parse()?, b.trim().parse()?))
}
