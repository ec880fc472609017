//! Paged attention and KV-cache writes as candle custom ops; the CPU versions are the reference.
//!
//! CONTRACT (the CPU ops here and the CUDA kernels in `attention_cuda.rs` implement the same math):
//! - `write_kv_cache(k, v, key_cache, value_cache, slot_mapping)`: k, v `[n, num_kv_heads, head_dim]`;
//!   caches `[num_blocks, block_size, num_kv_heads, head_dim]` (same dtype as k/v), written IN PLACE:
//!   token i goes to block `slot/block_size`, offset `slot%block_size`; slot -1 is skipped.
//! - `paged_attention(q, key_cache, value_cache, meta, scale)`: q `[n, num_heads, head_dim]` ->
//!   out `[n, num_heads, head_dim]`. GQA: head h reads kv head `h / (num_heads/num_kv_heads)`.
//!   Token j (0-based within its sequence's chunk) of sequence s attends causally to context
//!   positions `0 ..= context_len[s] - query_len[s] + j`, read through `block_tables[s]`.
//!   Softmax accumulates in f32 whatever the storage dtype.
//! - `AttentionMetadata` tensors live on the model's device: `block_tables` u32 `[num_seqs,
//!   max_blocks_per_seq]` (padded with 0), `context_lens` u32 `[num_seqs]`, `query_start_loc` u32
//!   `[num_seqs + 1]` (prefix sums of query_len).
//! - `slot_mapping` is an i64 tensor `[n]` on the model's device.

use candle_core::{
    bail, CpuStorage, DType, Device, InplaceOp3, Layout, Result, Shape, Tensor, WithDType,
};

use super::SeqInput;

/// Per-step attention inputs, built once per forward and shared by all layers.
#[derive(Debug, Clone)]
pub struct AttentionMetadata {
    /// u32 `[num_seqs, max_blocks_per_seq]`, padded with 0.
    pub block_tables: Tensor,
    /// u32 `[num_seqs]`: cached tokens + this step's tokens.
    pub context_lens: Tensor,
    /// u32 `[num_seqs + 1]`: prefix sums of query lengths.
    pub query_start_loc: Tensor,
    /// Largest `context_len` in the batch (host value, for kernel launch sizing).
    pub max_context_len: usize,
    /// Largest and smallest `query_len` in the batch.
    pub max_query_len: usize,
    pub min_query_len: usize,
    /// Host copies of the same data (the CPU reference reads these).
    pub host: HostMetadata,
    /// u32 `[num_seqs * SPLIT_COUNTERS_PER_SEQ]` zeros on CUDA for decode-only steps while the
    /// in-kernel combine is on (`attention_cuda::set_in_kernel_combine`): lets the paged kernel
    /// merge its context partitions in its last CTA instead of a combine launch (each launch
    /// leaves them zeroed, so every layer of the step reuses them). None elsewhere.
    pub split_counters: Option<Tensor>,
}

/// Split counters per sequence: enough for a decode step's CTA groups (at most two tiles per
/// sequence times one group per query head) up to 128 heads.
pub const SPLIT_COUNTERS_PER_SEQ: usize = 256;

/// The zeroed split counters of a decode-only step of `num_seqs` sequences on `device` (None on
/// the CPU, and while the in-kernel combine is off: nothing would read them).
pub fn split_counters(num_seqs: usize, device: &Device) -> Result<Option<Tensor>> {
    if !device.is_cuda() || num_seqs == 0 {
        return Ok(None);
    }
    if !super::attention_select::in_kernel_combine() {
        return Ok(None);
    }
    Tensor::zeros(num_seqs * SPLIT_COUNTERS_PER_SEQ, DType::U32, device).map(Some)
}

/// Host-side copy of `AttentionMetadata`'s tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostMetadata {
    pub block_tables: Vec<Vec<u32>>,
    pub context_lens: Vec<u32>,
    pub query_start_loc: Vec<u32>,
}

impl AttentionMetadata {
    /// Build the metadata for a flattened batch; the sequences must be laid out in order
    /// (`query_start` = sum of previous `query_len`), as the runner flattens them.
    pub fn new(seqs: &[SeqInput], device: &Device) -> Result<Self> {
        let mut query_start_loc = Vec::with_capacity(seqs.len() + 1);
        query_start_loc.push(0u32);
        for s in seqs {
            let start = *query_start_loc.last().unwrap_or(&0) as usize;
            if s.query_start != start {
                bail!("sequence query_start {} != expected {start}", s.query_start);
            }
            if s.query_len == 0 || s.query_len > s.context_len {
                bail!(
                    "query_len {} must be in 1..=context_len {}",
                    s.query_len,
                    s.context_len
                );
            }
            query_start_loc.push((start + s.query_len) as u32);
        }
        let max_blocks = seqs
            .iter()
            .map(|s| s.block_table.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut flat = vec![0u32; seqs.len() * max_blocks];
        for (i, s) in seqs.iter().enumerate() {
            flat[i * max_blocks..i * max_blocks + s.block_table.len()]
                .copy_from_slice(&s.block_table);
        }
        let context_lens: Vec<u32> = seqs.iter().map(|s| s.context_len as u32).collect();
        let decode_only = seqs.iter().all(|s| s.query_len == 1);
        Ok(Self {
            split_counters: if decode_only {
                split_counters(seqs.len(), device)?
            } else {
                None
            },
            block_tables: Tensor::from_vec(flat, (seqs.len(), max_blocks), device)?,
            context_lens: Tensor::new(context_lens.as_slice(), device)?,
            query_start_loc: Tensor::new(query_start_loc.as_slice(), device)?,
            max_context_len: seqs.iter().map(|s| s.context_len).max().unwrap_or(0),
            max_query_len: seqs.iter().map(|s| s.query_len).max().unwrap_or(0),
            min_query_len: seqs.iter().map(|s| s.query_len).min().unwrap_or(0),
            host: HostMetadata {
                block_tables: seqs.iter().map(|s| s.block_table.clone()).collect(),
                context_lens,
                query_start_loc,
            },
        })
    }
}

/// Write each token's K and V into its cache slot, in place.
pub fn write_kv_cache(
    k: &Tensor,
    v: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    slot_mapping: &Tensor,
) -> Result<()> {
    #[cfg(feature = "cuda")]
    if k.device().is_cuda() {
        return super::attention_cuda::write_kv_cache(k, v, key_cache, value_cache, slot_mapping);
    }
    let (n, kvh, hd) = k.dims3()?;
    let (_, block_size, ckvh, chd) = key_cache.dims4()?;
    if v.dims3()? != (n, kvh, hd) || (ckvh, chd) != (kvh, hd) {
        bail!(
            "write_kv_cache: k {:?} v {:?} do not fit cache {:?}",
            k.shape(),
            v.shape(),
            key_cache.shape()
        );
    }
    if key_cache.shape() != value_cache.shape() || slot_mapping.dims1()? != n {
        bail!("write_kv_cache: cache or slot_mapping shape mismatch");
    }
    let slots = slot_mapping.to_dtype(DType::I64)?;
    let op = WriteCache { block_size };
    key_cache.inplace_op3(&k.contiguous()?, &slots, &op)?;
    value_cache.inplace_op3(&v.contiguous()?, &slots, &op)?;
    Ok(())
}

struct WriteCache {
    block_size: usize,
}

fn contiguous<'a, T>(data: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{what} must be contiguous"),
    }
}

fn write_slots<T: Copy>(cache: &mut [T], src: &[T], slots: &[i64], row: usize) -> Result<()> {
    let capacity = cache.len() / row;
    for (i, &slot) in slots.iter().enumerate() {
        if slot < 0 {
            continue;
        }
        let slot = slot as usize;
        if slot >= capacity {
            bail!("slot {slot} out of the cache's {capacity} slots");
        }
        cache[slot * row..(slot + 1) * row].copy_from_slice(&src[i * row..(i + 1) * row]);
    }
    Ok(())
}

impl InplaceOp3 for WriteCache {
    fn name(&self) -> &'static str {
        "write-kv-cache"
    }

    fn cpu_fwd(
        &self,
        cache: &mut CpuStorage,
        cl: &Layout,
        src: &CpuStorage,
        sl: &Layout,
        slots: &CpuStorage,
        ml: &Layout,
    ) -> Result<()> {
        let dims = cl.dims();
        let row = dims[2] * dims[3];
        debug_assert_eq!(dims[1], self.block_size);
        let (a, b) = cl
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("cache must be contiguous".into()))?;
        let slots = match slots {
            CpuStorage::I64(s) => contiguous(s, ml, "slot_mapping")?,
            _ => bail!("slot_mapping must be i64"),
        };
        match (cache, src) {
            (CpuStorage::F32(c), CpuStorage::F32(s)) => {
                write_slots(&mut c[a..b], contiguous(s, sl, "k/v")?, slots, row)
            }
            (CpuStorage::F16(c), CpuStorage::F16(s)) => {
                write_slots(&mut c[a..b], contiguous(s, sl, "k/v")?, slots, row)
            }
            (CpuStorage::BF16(c), CpuStorage::BF16(s)) => {
                write_slots(&mut c[a..b], contiguous(s, sl, "k/v")?, slots, row)
            }
            _ => bail!("write_kv_cache: cache and k/v must share a float dtype (f32/f16/bf16)"),
        }
    }
}

/// Attention of every token in the flattened batch over its sequence's paged context.
pub fn paged_attention(
    q: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    meta: &AttentionMetadata,
    scale: f32,
) -> Result<Tensor> {
    paged_attention_warming(q, key_cache, value_cache, meta, scale, &[])
}

/// Part of a weight the kernels after an attention op will read: `len` elements of `tensor`
/// (contiguous) from element `offset`.
#[derive(Debug, Clone, Copy)]
pub struct L2Range<'a> {
    pub tensor: &'a Tensor,
    pub offset: usize,
    pub len: usize,
}

/// `ranges` (at most `max`) as (tensor, first byte counted from the start of its layout, bytes),
/// each shrunk to whole 16-byte units at 16-byte aligned addresses (what a bulk L2 prefetch takes;
/// a range with none is dropped). Errors on a range past its tensor or of a non-contiguous one.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn l2_byte_ranges(
    ranges: &[L2Range],
    max: usize,
) -> Result<Vec<(Tensor, usize, usize)>> {
    if ranges.len() > max {
        bail!("paged_attention: {} L2 ranges, at most {max}", ranges.len())
    }
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        if !r.tensor.is_contiguous() || r.offset + r.len > r.tensor.elem_count() {
            bail!(
                "paged_attention: L2 range {}+{} of a {:?} tensor (contiguous: {})",
                r.offset,
                r.len,
                r.tensor.shape(),
                r.tensor.is_contiguous()
            )
        }
        let elem = r.tensor.dtype().size_in_bytes();
        let base = r.tensor.layout().start_offset() * elem;
        let start = base + r.offset * elem;
        let (first, end) = (start.next_multiple_of(16), (start + r.len * elem) / 16 * 16);
        if end > first {
            out.push((r.tensor.clone(), first - base, end - first));
        }
    }
    Ok(out)
}

/// [`paged_attention`] that, on CUDA, also fetches `warm` into L2 while a short decode launch
/// leaves HBM idle (see `attention_cuda::set_warm_l2`); the ranges change nothing else.
pub fn paged_attention_warming(
    q: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    meta: &AttentionMetadata,
    scale: f32,
    warm: &[L2Range],
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        return super::attention_cuda::paged_attention(
            q,
            key_cache,
            value_cache,
            meta,
            scale,
            warm,
        );
    }
    let _ = warm;
    let (n, heads, hd) = q.dims3()?;
    let (_, _, kvh, chd) = key_cache.dims4()?;
    if chd != hd || kvh == 0 || heads % kvh != 0 || key_cache.shape() != value_cache.shape() {
        bail!(
            "paged_attention: q {:?} incompatible with cache {:?}",
            q.shape(),
            key_cache.shape()
        );
    }
    if meta.host.query_start_loc.last().copied().unwrap_or(0) as usize != n {
        bail!("paged_attention: query_start_loc does not cover {n} tokens");
    }
    let op = PagedAttention {
        meta: meta.host.clone(),
        scale,
    };
    q.contiguous()?
        .apply_op3_no_bwd(key_cache, value_cache, &op)
}

struct PagedAttention {
    meta: HostMetadata,
    scale: f32,
}

impl PagedAttention {
    fn run<T: WithDType>(
        &self,
        q: &[T],
        kc: &[T],
        vc: &[T],
        q_dims: &[usize],
        c_dims: &[usize],
    ) -> Result<Vec<T>> {
        let (n, heads, hd) = (q_dims[0], q_dims[1], q_dims[2]);
        let (num_blocks, block_size, kvh) = (c_dims[0], c_dims[1], c_dims[2]);
        let group = heads / kvh;
        let mut out = vec![T::from_f64(0.0); n * heads * hd];
        let mut scores: Vec<f32> = Vec::new();
        let mut acc = vec![0f32; hd];
        let mut qf = vec![0f32; hd];
        let m = &self.meta;
        for s in 0..m.context_lens.len() {
            let (start, end) = (
                m.query_start_loc[s] as usize,
                m.query_start_loc[s + 1] as usize,
            );
            let ctx = m.context_lens[s] as usize;
            let qlen = end - start;
            if qlen > ctx {
                bail!("sequence {s}: query_len {qlen} > context_len {ctx}");
            }
            let table = &m.block_tables[s];
            if table.len() * block_size < ctx {
                bail!("sequence {s}: block table too short for {ctx} tokens");
            }
            // Offset of each context position's row in the cache.
            let mut rows = Vec::with_capacity(ctx);
            for pos in 0..ctx {
                let block = table[pos / block_size] as usize;
                if block >= num_blocks {
                    bail!("sequence {s}: block {block} out of {num_blocks}");
                }
                rows.push((block * block_size + pos % block_size) * kvh * hd);
            }
            for j in 0..qlen {
                let token = start + j;
                let visible = ctx - qlen + j + 1;
                for h in 0..heads {
                    let kv_off = (h / group) * hd;
                    let qrow = &q[(token * heads + h) * hd..][..hd];
                    for (d, x) in qf.iter_mut().zip(qrow) {
                        *d = x.to_f64() as f32 * self.scale;
                    }
                    scores.clear();
                    let mut max = f32::NEG_INFINITY;
                    for &row in &rows[..visible] {
                        let krow = &kc[row + kv_off..][..hd];
                        let dot: f32 = qf
                            .iter()
                            .zip(krow)
                            .map(|(a, b)| a * b.to_f64() as f32)
                            .sum();
                        max = max.max(dot);
                        scores.push(dot);
                    }
                    let mut sum = 0f32;
                    for sc in scores.iter_mut() {
                        *sc = (*sc - max).exp();
                        sum += *sc;
                    }
                    acc.iter_mut().for_each(|a| *a = 0.0);
                    for (&row, &p) in rows[..visible].iter().zip(&scores) {
                        let vrow = &vc[row + kv_off..][..hd];
                        for (a, x) in acc.iter_mut().zip(vrow) {
                            *a += p * x.to_f64() as f32;
                        }
                    }
                    let o = &mut out[(token * heads + h) * hd..][..hd];
                    for (o, a) in o.iter_mut().zip(&acc) {
                        *o = T::from_f64((a / sum) as f64);
                    }
                }
            }
        }
        Ok(out)
    }
}

impl candle_core::CustomOp3 for PagedAttention {
    fn name(&self) -> &'static str {
        "paged-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        kc: &CpuStorage,
        kl: &Layout,
        vc: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (qd, cd) = (ql.dims(), kl.dims());
        let out = match (q, kc, vc) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                CpuStorage::F32(self.run(
                    contiguous(q, ql, "q")?,
                    contiguous(k, kl, "key_cache")?,
                    contiguous(v, vl, "value_cache")?,
                    qd,
                    cd,
                )?)
            }
            (CpuStorage::F16(q), CpuStorage::F16(k), CpuStorage::F16(v)) => {
                CpuStorage::F16(self.run(
                    contiguous(q, ql, "q")?,
                    contiguous(k, kl, "key_cache")?,
                    contiguous(v, vl, "value_cache")?,
                    qd,
                    cd,
                )?)
            }
            (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                CpuStorage::BF16(self.run(
                    contiguous(q, ql, "q")?,
                    contiguous(k, kl, "key_cache")?,
                    contiguous(v, vl, "value_cache")?,
                    qd,
                    cd,
                )?)
            }
            _ => bail!("paged_attention: q and caches must share a float dtype (f32/f16/bf16)"),
        };
        Ok((out, ql.shape().clone()))
    }
}

#[cfg(test)]
mod tests;
