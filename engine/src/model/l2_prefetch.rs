//! L2 prefetch on a side stream: while a decode layer's latency-bound kernels (norm, q/k/v,
//! attention, o) leave HBM nearly idle, a kernel on a second stream fetches the first part of every
//! row of the layer's o, gate/up and down weights into L2 (engine/kernels/l2_prefetch.cu), so the
//! projections read part of their bytes from L2.
//!
//! Off by default (`set_l2_prefetch`): on an H200 at the Qwen2.5-1.5B shape it gained at most
//! 0.5-1.2% at batch 1 and nothing at batch 8, because the one-row GEMVs take about as long with
//! their weights in L2 as in HBM (days/gpu-engine, runs 49-52). When on, it is taken for steps
//! of at most `gemv::MAX_ROWS` tokens on CUDA. The prefetch writes nothing: outputs are the same bits with it or
//! without. In a CUDA graph capture the side stream is forked from the model's stream at each
//! layer and joined back at the end of the layers, so the graph holds a branch per layer.

use std::cell::Cell;
use std::sync::Mutex;

/// Fractions of each row fetched ahead, per matrix (0: none, 1: whole rows), and the CTAs of the
/// prefetch launch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct L2Prefetch {
    pub gate_up: f32,
    pub down: f32,
    pub o: f32,
    pub ctas: u32,
}

/// CTAs of a prefetch launch unless a setting says otherwise: a few SMs' worth, beside the
/// layer's own kernels.
pub const DEFAULT_CTAS: u32 = 16;

impl L2Prefetch {
    /// `GATE_UP:DOWN[:O[:CTAS]]`: fractions in 0..=1 and a CTA count in 1..=1024 (`0.5:0.25`,
    /// `0.4:0.2:1`, `0.4:0:1:132`).
    pub fn parse(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').map(str::trim).collect();
        if !(2..=4).contains(&parts.len()) {
            return Err(format!(
                "L2 prefetch {s:?}: want GATE_UP:DOWN[:O[:CTAS]] (fractions, a CTA count)"
            ));
        }
        let mut f = [0f32; 3];
        for (slot, p) in f.iter_mut().zip(&parts) {
            *slot = p
                .parse::<f32>()
                .ok()
                .filter(|v| (0.0..=1.0).contains(v))
                .ok_or_else(|| format!("L2 prefetch {s:?}: {p:?} is not a fraction in 0..=1"))?;
        }
        let ctas = match parts.get(3) {
            None => DEFAULT_CTAS,
            Some(p) => p
                .parse::<u32>()
                .ok()
                .filter(|v| (1..=1024).contains(v))
                .ok_or_else(|| {
                    format!("L2 prefetch {s:?}: {p:?} is not a CTA count in 1..=1024")
                })?,
        };
        Ok(Self {
            gate_up: f[0],
            down: f[1],
            o: f[2],
            ctas,
        })
    }
}

impl std::fmt::Display for L2Prefetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.gate_up, self.down, self.o)?;
        if self.ctas != DEFAULT_CTAS {
            write!(f, ":{}", self.ctas)?;
        }
        Ok(())
    }
}

static SETTING: Mutex<Option<L2Prefetch>> = Mutex::new(None);

thread_local! {
    /// This thread's override (`None`: follow the process-wide setting).
    static HERE: Cell<Option<Option<L2Prefetch>>> = const { Cell::new(None) };
}

/// Sets the prefetch for later steps process-wide (`None`: off, the default). Captured decode
/// graphs are dropped, to be captured again under the new setting.
pub fn set_l2_prefetch(p: Option<L2Prefetch>) {
    *SETTING.lock().unwrap_or_else(|e| e.into_inner()) = p;
    #[cfg(feature = "cuda")]
    super::cuda_graph::invalidate_graphs();
}

/// [`set_l2_prefetch`] for forwards called on this thread (`None`: the process-wide setting);
/// for tests that compare both paths while other threads run models.
pub fn set_l2_prefetch_on_this_thread(p: Option<Option<L2Prefetch>>) {
    HERE.with(|h| h.set(p));
    #[cfg(feature = "cuda")]
    super::cuda_graph::invalidate_graphs();
}

/// The setting for forwards called on this thread.
pub fn l2_prefetch() -> Option<L2Prefetch> {
    HERE.with(Cell::get)
        .unwrap_or_else(|| *SETTING.lock().unwrap_or_else(|e| e.into_inner()))
}

/// What the kernel fetches of one matrix: `prefix` bytes at the start of each of `rows` rows,
/// `pitch` bytes apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowPrefix {
    pub rows: usize,
    pub pitch: usize,
    pub prefix: usize,
}

/// The prefix of `fraction` of each row of a contiguous `[rows, cols]` matrix of `elem_bytes`
/// elements, rounded down to the 16 bytes a bulk prefetch takes; `None` when that is nothing or
/// the rows are not 16-byte aligned.
pub fn row_prefix(rows: usize, cols: usize, elem_bytes: usize, fraction: f32) -> Option<RowPrefix> {
    let pitch = cols * elem_bytes;
    if rows == 0 || !pitch.is_multiple_of(16) || fraction.is_nan() || fraction <= 0.0 {
        return None;
    }
    let prefix = ((pitch as f64 * fraction.min(1.0) as f64) as usize) / 16 * 16;
    (prefix > 0).then_some(RowPrefix {
        rows,
        pitch,
        prefix,
    })
}

#[cfg(feature = "cuda")]
pub(crate) use gpu::{join, prefetch_rows, SideStream};

#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::{Arc, OnceLock};

    use candle_core::cuda_backend::cudarc::driver::{CudaStream, LaunchConfig};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{Device, Result, Tensor};

    use super::row_prefix;
    use crate::model::attention_cuda::{cuda_storage, device_ptr, ptx};
    use crate::model::pdl;

    /// Threads per CTA of a prefetch launch (each issues a handful of bulk prefetches and is done).
    const THREADS: u32 = 256;

    /// The second stream of a model's device, made on first use.
    #[derive(Debug, Default)]
    pub(crate) struct SideStream(OnceLock<Arc<CudaStream>>);

    impl SideStream {
        fn get(&self, device: &Device) -> Result<&Arc<CudaStream>> {
            if let Some(s) = self.0.get() {
                return Ok(s);
            }
            let main = device.as_cuda_device()?.cuda_stream();
            let s = main.context().new_stream().w()?;
            Ok(self.0.get_or_init(|| s))
        }
    }

    /// Forks the side stream from `device`'s stream (everything queued so far) and queues the
    /// prefetch of each `(matrix, fraction)` (at most three) on it, `ctas` CTAs; whether it did
    /// (nothing when every fraction comes to no bytes), i.e. whether a `join` must follow.
    pub(crate) fn prefetch_rows(
        side: &SideStream,
        device: &Device,
        mats: &[(&Tensor, f32)],
        ctas: u32,
    ) -> Result<bool> {
        let mut plans = Vec::with_capacity(3);
        for (t, f) in mats.iter().take(3) {
            let (rows, cols) = t.dims2()?;
            if !t.is_contiguous() {
                continue;
            }
            if let Some(p) = row_prefix(rows, cols, t.dtype().size_in_bytes(), *f) {
                plans.push((*t, p));
            }
        }
        if plans.is_empty() {
            return Ok(false);
        }
        let stream = side.get(device)?;
        let main = device.as_cuda_device()?.cuda_stream();
        stream.join(&main).w()?;
        let storages: Vec<_> = plans.iter().map(|(t, _)| t.storage_and_layout()).collect();
        let mut args = [(0u64, 0u64, 0u64, 0u32); 3];
        let mut guards = Vec::with_capacity(3);
        for ((st, l), (slot, (_, p))) in storages.iter().zip(args.iter_mut().zip(&plans)) {
            let (ptr, g) = device_ptr(cuda_storage(st, "prefetched weight")?, l, stream)?;
            *slot = (ptr, p.rows as u64, p.pitch as u64, p.prefix as u32);
            guards.push(g);
        }
        let dev = device.as_cuda_device()?;
        let mut b = pdl::Launch::new(dev, "l2_prefetch_rows", "l2_prefetch", ptx::L2_PREFETCH)?;
        b.on_stream(stream.clone()).ordinary();
        for (base, rows, pitch, prefix) in &args {
            b.arg(base).arg(rows).arg(pitch).arg(prefix);
        }
        let cfg = LaunchConfig {
            grid_dim: (ctas.max(1), 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: twelve arguments in the kernel's order (three matrices of pointer, rows, pitch,
        // prefix); it reads nothing and writes nothing (bulk prefetches of live weights only), so
        // it needs no wait for earlier kernels.
        unsafe { b.launch(cfg) }?;
        Ok(true)
    }

    /// Makes `device`'s stream wait for the side stream's work: the end of a forward that forked
    /// it (a graph capture needs every fork joined, and may join only a stream it forked).
    pub(crate) fn join(side: &SideStream, device: &Device) -> Result<()> {
        if let Some(s) = side.0.get() {
            device.as_cuda_device()?.cuda_stream().join(s).w()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_takes_two_or_three_fractions() {
        assert_eq!(
            L2Prefetch::parse("0.5:0.25").unwrap(),
            L2Prefetch {
                gate_up: 0.5,
                down: 0.25,
                o: 0.0,
                ctas: DEFAULT_CTAS,
            }
        );
        let p = L2Prefetch::parse(" 0.4 : 0 : 1 ").unwrap();
        assert_eq!(
            (p.gate_up, p.down, p.o, p.ctas),
            (0.4, 0.0, 1.0, DEFAULT_CTAS)
        );
        assert_eq!(p.to_string(), "0.4:0:1");
        let p = L2Prefetch::parse("0.4:0:1:132").unwrap();
        assert_eq!((p.ctas, p.to_string().as_str()), (132, "0.4:0:1:132"));
        for bad in [
            "0.5",
            "1:2",
            "a:0",
            "0:0:0:0",
            "0:0:0:1:1",
            "-0.1:0",
            "NaN:0",
        ] {
            let e = L2Prefetch::parse(bad).unwrap_err();
            assert!(e.contains(bad.trim()), "{bad}: {e}");
        }
    }

    #[test]
    fn row_prefix_rounds_down_to_sixteen_bytes() {
        // Qwen2.5-1.5B gate/up rows: 1536 bf16 = 3072 bytes; 0.3 of that is 921.6 -> 912.
        let p = row_prefix(17920, 1536, 2, 0.3).unwrap();
        assert_eq!((p.rows, p.pitch, p.prefix), (17920, 3072, 912));
        // down rows: 8960 bf16, whole rows.
        assert_eq!(row_prefix(1536, 8960, 2, 1.0).unwrap().prefix, 17920);
        assert_eq!(row_prefix(1536, 8960, 2, 2.0).unwrap().prefix, 17920);
        // Nothing: no fraction, under 16 bytes, unaligned rows, no rows.
        assert_eq!(row_prefix(10, 1536, 2, 0.0), None);
        assert_eq!(row_prefix(10, 64, 2, 0.1), None);
        assert_eq!(row_prefix(10, 7, 2, 1.0), None);
        assert_eq!(row_prefix(0, 1536, 2, 1.0), None);
        assert_eq!(row_prefix(10, 1536, 2, f32::NAN), None);
    }
}
