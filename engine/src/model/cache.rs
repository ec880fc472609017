//! The paged KV-cache tensors (one K and one V tensor per layer) and block swap to host memory.

use candle_core::{bail, DType, Device, Result, Tensor};

use crate::config::ModelConfig;

/// Per-layer K and V tensors `[num_blocks, block_size, num_kv_heads, head_dim]`.
#[derive(Debug)]
pub struct KvCache {
    pub block_size: usize,
    pub num_blocks: usize,
    /// (K, V) of each layer.
    pub layers: Vec<(Tensor, Tensor)>,
    dtype: DType,
    device: Device,
}

/// Blocks copied out of a `KvCache` into host memory: per layer (K, V) `[n, block_size, kvh, hd]`.
#[derive(Debug)]
pub struct HostBlocks {
    pub layers: Vec<(Tensor, Tensor)>,
}

impl HostBlocks {
    pub fn num_blocks(&self) -> usize {
        self.layers.first().map_or(0, |(k, _)| k.dims()[0])
    }
}

impl KvCache {
    /// Allocate a zeroed cache of `num_blocks` blocks of `block_size` tokens on `device`.
    pub fn new(
        cfg: &ModelConfig,
        num_blocks: usize,
        block_size: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if num_blocks == 0 || block_size == 0 {
            bail!("KV cache needs at least one block of at least one token");
        }
        let shape = (
            num_blocks,
            block_size,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| {
                Ok((
                    Tensor::zeros(shape, dtype, device)?,
                    Tensor::zeros(shape, dtype, device)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            block_size,
            num_blocks,
            layers,
            dtype,
            device: device.clone(),
        })
    }

    /// Bytes one block takes over all layers (K and V).
    pub fn bytes_per_block(cfg: &ModelConfig, block_size: usize, dtype: DType) -> usize {
        cfg.kv_bytes_per_token(dtype) * block_size
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    fn check_blocks(&self, blocks: &[u32]) -> Result<()> {
        if let Some(b) = blocks.iter().find(|b| **b as usize >= self.num_blocks) {
            bail!("block {b} out of the cache's {} blocks", self.num_blocks);
        }
        Ok(())
    }

    /// Copy `blocks` of every layer into host memory (for preemption by swapping).
    pub fn swap_out(&self, blocks: &[u32]) -> Result<HostBlocks> {
        self.check_blocks(blocks)?;
        let ids = Tensor::new(blocks, &self.device)?;
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| {
                Ok((
                    k.index_select(&ids, 0)?.to_device(&Device::Cpu)?,
                    v.index_select(&ids, 0)?.to_device(&Device::Cpu)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(HostBlocks { layers })
    }

    /// Copy host blocks back into `blocks` (one destination block per host block), in place.
    pub fn swap_in(&mut self, host: &HostBlocks, blocks: &[u32]) -> Result<()> {
        self.check_blocks(blocks)?;
        if host.layers.len() != self.layers.len() || host.num_blocks() != blocks.len() {
            bail!(
                "swap_in: {} host blocks x {} layers do not fit {} blocks x {} layers",
                host.num_blocks(),
                host.layers.len(),
                blocks.len(),
                self.layers.len()
            );
        }
        for ((k, v), (hk, hv)) in self.layers.iter().zip(&host.layers) {
            let hk = hk.to_device(&self.device)?.to_dtype(self.dtype)?;
            let hv = hv.to_device(&self.device)?.to_dtype(self.dtype)?;
            for (i, &b) in blocks.iter().enumerate() {
                k.slice_set(&hk.narrow(0, i, 1)?, 0, b as usize)?;
                v.slice_set(&hv.narrow(0, i, 1)?, 0, b as usize)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Architecture;

    fn cfg() -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            vocab_size: 16,
            hidden_size: 8,
            intermediate_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 4,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_ids: vec![],
            attention_bias: false,
            sliding_window: None,
        }
    }

    #[test]
    fn swap_out_then_in_moves_block_contents() {
        let dev = Device::Cpu;
        let mut cache = KvCache::new(&cfg(), 4, 2, DType::F32, &dev).unwrap();
        assert_eq!(
            KvCache::bytes_per_block(&cfg(), 2, DType::F32),
            2 * 2 * 4 * 4 * 2
        );
        // Fill each block with its id (K) and -id (V), layer offset 10*layer.
        for (l, (k, v)) in cache.layers.iter().enumerate() {
            for b in 0..4 {
                let val = (10 * l + b) as f32;
                k.slice_set(&Tensor::full(val, (1, 2, 1, 4), &dev).unwrap(), 0, b)
                    .unwrap();
                v.slice_set(&Tensor::full(-val, (1, 2, 1, 4), &dev).unwrap(), 0, b)
                    .unwrap();
            }
        }
        let host = cache.swap_out(&[3, 1]).unwrap();
        assert_eq!(host.num_blocks(), 2);
        cache.swap_in(&host, &[0, 2]).unwrap();
        let firsts = |t: &Tensor| -> Vec<f32> {
            (0..4)
                .map(|b| {
                    t.get(b)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()[0]
                })
                .collect()
        };
        assert_eq!(firsts(&cache.layers[0].0), vec![3.0, 1.0, 1.0, 3.0]);
        assert_eq!(firsts(&cache.layers[1].1), vec![-13.0, -11.0, -11.0, -13.0]);
        assert!(cache.swap_out(&[4]).is_err());
        assert!(cache.swap_in(&host, &[0]).is_err());
    }
}
