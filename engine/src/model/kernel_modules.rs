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

#[cfg(feature = "cuda")]
pub use cuda::load_all;

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::{kernels, CudaDevice};
    use candle_core::{bail, Result};

    use super::super::attention_cuda::ptx;
    use super::ptx_entries;

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

    /// Loads every module of `engine/kernels` and of `CANDLE` on `dev`, each function too;
    /// returns (modules, functions).
    pub fn load_all(dev: &CudaDevice) -> Result<(usize, usize)> {
        let mut functions = 0;
        for (module, code) in ptx::ALL {
            let names = ptx_entries(code);
            if names.is_empty() {
                bail!("kernel module {module}: no .entry in its PTX")
            }
            for name in names {
                dev.get_or_load_custom_func(name, module, code)?;
                functions += 1;
            }
        }
        for (module, m) in &CANDLE {
            let names = ptx_entries(m.ptx());
            if names.is_empty() {
                bail!("candle kernel module {module}: no .entry in its PTX")
            }
            for name in names {
                dev.get_or_load_func(name, m)?;
                functions += 1;
            }
        }
        Ok((ptx::ALL.len() + CANDLE.len(), functions))
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
}
