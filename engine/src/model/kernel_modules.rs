//! Loads every CUDA kernel module the engine may launch, ours and candle's, with each of its
//! functions, before the server reports ready: the driver compiles a PTX module on its first load
//! (seconds per module on a machine whose JIT cache is cold), which no request should wait for.

/// The names of the kernels (`.entry` functions) of a PTX module, in order.
pub fn ptx_entries(ptx: &str) -> Vec<&str> {
    ptx.match_indices(".entry")
        .filter_map(|(at, _)| {
            let rest = ptx[at + ".entry".len()..].trim_start();
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '$'))
                .unwrap_or(rest.len());
            (end > 0).then(|| &rest[..end])
        })
        .collect()
}

/// What [`load_all`] loaded, and how long each module took (the driver compiles a module's PTX
/// on its first load unless its JIT cache holds it).
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub modules: usize,
    pub functions: usize,
    /// (module, seconds), slowest first.
    pub seconds: Vec<(&'static str, f64)>,
}

impl Loaded {
    /// "flash_decode 12.1 s, gemv 9.8 s, binary 5.2 s": the `n` slowest modules.
    pub fn slowest(&self, n: usize) -> String {
        let parts: Vec<String> = self
            .seconds
            .iter()
            .take(n)
            .map(|(m, s)| format!("{m} {s:.2} s"))
            .collect();
        parts.join(", ")
    }
}

#[cfg(feature = "cuda")]
pub use cuda::load_all;

#[cfg(feature = "cuda")]
mod cuda {
    use std::time::Instant;

    use candle_core::cuda_backend::{kernels, CudaDevice};
    use candle_core::{bail, Result};

    use super::super::attention_cuda::ptx;
    use super::{ptx_entries, Loaded};

    /// candle's modules the engine's ops can reach. Not `QUANTIZED` (GGUF weights are
    /// dequantized at load) nor `CONV` (no convolutions): the largest two, never launched.
    const CANDLE: [(&str, kernels::Module); 9] = [
        ("affine", kernels::AFFINE),
        ("binary", kernels::BINARY),
        ("cast", kernels::CAST),
        ("fill", kernels::FILL),
        ("indexing", kernels::INDEXING),
        ("reduce", kernels::REDUCE),
        ("sort", kernels::SORT),
        ("ternary", kernels::TERNARY),
        ("unary", kernels::UNARY),
    ];

    /// Loads every module of `engine/kernels` and of `CANDLE` on `dev`, each function too.
    pub fn load_all(dev: &CudaDevice) -> Result<Loaded> {
        let mut loaded = Loaded {
            modules: 0,
            functions: 0,
            seconds: Vec::new(),
        };
        let mut module = |name: &'static str, code: &str, load: &dyn Fn(&str) -> Result<()>| {
            let entries = ptx_entries(code);
            if entries.is_empty() {
                bail!("kernel module {name}: no .entry in its PTX")
            }
            let t = Instant::now();
            for entry in &entries {
                load(entry)?;
            }
            loaded.modules += 1;
            loaded.functions += entries.len();
            loaded.seconds.push((name, t.elapsed().as_secs_f64()));
            Ok(())
        };
        for (name, code) in ptx::ALL {
            module(name, code, &|f| {
                dev.get_or_load_custom_func(f, name, code).map(drop)
            })?;
        }
        for (name, m) in CANDLE {
            module(name, m.ptx(), &|f| dev.get_or_load_func(f, &m).map(drop))?;
        }
        loaded.seconds.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(loaded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_the_kernel_names_in_order() {
        let ptx = "//\n.version 9.0\n.target sm_90\n\
                   .visible .entry argmax_rows_f32(\n\t.param .u64 a\n)\n{\n ret;\n}\n\
                   .func helper()\n.visible .entry\tgemv_bf16_m1_w2u6_silu (\n)\n\
                   .entry $tricky_1(\n)\n";
        assert_eq!(
            ptx_entries(ptx),
            ["argmax_rows_f32", "gemv_bf16_m1_w2u6_silu", "$tricky_1"]
        );
        assert!(ptx_entries("// no kernels\n.version 9.0\n").is_empty());
    }

    #[test]
    fn slowest_modules_line() {
        let loaded = Loaded {
            modules: 3,
            functions: 9,
            seconds: vec![("flash_decode", 12.14), ("gemv", 9.8), ("binary", 0.5)],
        };
        assert_eq!(loaded.slowest(2), "flash_decode 12.14 s, gemv 9.80 s");
        assert_eq!(
            loaded.slowest(9),
            "flash_decode 12.14 s, gemv 9.80 s, binary 0.50 s"
        );
    }
}
