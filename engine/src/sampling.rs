//! Token sampling from logits: greedy, temperature, top-k, top-p, seeded per request.

/// Per-request sampling settings (already validated by `api`).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub max_tokens: usize,
    /// 0.0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 or negative = disabled.
    pub top_k: i32,
    pub seed: Option<u64>,
    /// Generation stops at these token ids (EOS is added by `api` unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    /// Stop strings are matched by `api` on the detokenized text; the core stops on token ids only.
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: 16,
            temperature: 1.0,
            top_p: 1.0,
            top_k: -1,
            seed: None,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// Below this temperature sampling is greedy (vLLM's `_SAMPLING_EPS`).
pub const SAMPLING_EPS: f32 = 1e-5;

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature < SAMPLING_EPS
    }
}

/// Index of the largest logit; the lowest index wins ties, NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

/// Draws one token from `logits` under `params` with `rng` (ignored when greedy).
///
/// Order as in vLLM: temperature scaling, top-k, softmax, top-p (the smallest set of most likely
/// tokens whose probability mass reaches `top_p`, always at least one), then a categorical draw.
pub fn sample_token<R: rand::Rng + ?Sized>(
    logits: &[f32],
    params: &SamplingParams,
    rng: &mut R,
) -> u32 {
    if params.is_greedy() || logits.is_empty() {
        return argmax(logits);
    }
    let mut cand: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, v)| v.is_finite())
        .map(|(i, &v)| (i as u32, v / params.temperature))
        .collect();
    if cand.is_empty() {
        return argmax(logits);
    }
    // Highest first; ties by lower id so the order (and so the draw) is deterministic.
    cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if params.top_k > 0 {
        cand.truncate(params.top_k as usize);
    }
    let max = cand[0].1;
    let mut probs: Vec<f64> = cand.iter().map(|(_, v)| ((v - max) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if params.top_p < 1.0 {
        let mut mass = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            mass += p;
            if mass >= params.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        cand.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut x = rng.gen::<f64>() * total;
    for (i, p) in probs.iter().enumerate() {
        if x < *p {
            return cand[i].0;
        }
        x -= p;
    }
    cand[cand.len() - 1].0
}

/// Per-request random generators: seeded from `seed` when given (reproducible output), else from
/// the OS. Lives as long as the request does.
#[derive(Debug, Default)]
pub struct Sampler {
    generators: std::collections::HashMap<String, rand::rngs::StdRng>,
}

impl Sampler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Samples the next token of `request_id`.
    pub fn sample(&mut self, request_id: &str, logits: &[f32], params: &SamplingParams) -> u32 {
        use rand::SeedableRng;
        if params.is_greedy() {
            return argmax(logits);
        }
        let rng = self
            .generators
            .entry(request_id.to_string())
            .or_insert_with(|| match params.seed {
                Some(seed) => rand::rngs::StdRng::seed_from_u64(seed),
                None => rand::rngs::StdRng::from_entropy(),
            });
        sample_token(logits, params, rng)
    }

    /// Drops a finished request's generator.
    pub fn remove(&mut self, request_id: &str) {
        self.generators.remove(request_id);
    }

    pub fn num_generators(&self) -> usize {
        self.generators.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn params(temperature: f32, top_k: i32, top_p: f32, seed: Option<u64>) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed,
            ..Default::default()
        }
    }

    fn counts(logits: &[f32], p: &SamplingParams, n: usize) -> Vec<usize> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut c = vec![0; logits.len()];
        for _ in 0..n {
            c[sample_token(logits, p, &mut rng) as usize] += 1;
        }
        c
    }

    #[test]
    fn greedy_takes_lowest_id_on_ties_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, f32::NAN]), 1);
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let g = params(0.0, -1, 1.0, None);
        assert_eq!(sample_token(&[0.0, 5.0, 5.0], &g, &mut rng), 1);
    }

    #[test]
    fn temperature_follows_softmax() {
        // p = softmax([0, ln 3]) = [0.25, 0.75]
        let c = counts(&[0.0, 3f32.ln()], &params(1.0, -1, 1.0, None), 20_000);
        let frac = c[1] as f64 / 20_000.0;
        assert!((frac - 0.75).abs() < 0.02, "{frac}");
        // a low temperature sharpens towards the max
        let c = counts(&[0.0, 3f32.ln()], &params(0.1, -1, 1.0, None), 2_000);
        assert!(c[1] > 1_990, "{c:?}");
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        let logits = [3.0, 2.0, 1.0, 0.0];
        let c = counts(&logits, &params(1.0, 2, 1.0, None), 5_000);
        assert_eq!(c[2] + c[3], 0, "{c:?}");
        assert!(c[0] > 0 && c[1] > 0);
        // probs ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.8 keeps the first two
        let c = counts(&logits, &params(1.0, -1, 0.8, None), 5_000);
        assert_eq!(c[2] + c[3], 0, "{c:?}");
        assert!(c[1] > 0);
        // top_p smaller than the top probability keeps exactly one
        let c = counts(&logits, &params(1.0, -1, 0.1, None), 500);
        assert_eq!(c[0], 500);
    }

    #[test]
    fn seeded_requests_reproduce_and_unseeded_vary() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let p = params(1.0, -1, 1.0, Some(1234));
        let run = |id: &str| {
            let mut s = Sampler::new();
            (0..32)
                .map(|_| s.sample(id, &logits, &p))
                .collect::<Vec<_>>()
        };
        assert_eq!(run("a"), run("b"));
        let q = params(1.0, -1, 1.0, None);
        let mut s = Sampler::new();
        let a: Vec<u32> = (0..32).map(|_| s.sample("x", &logits, &q)).collect();
        let b: Vec<u32> = (0..32).map(|_| s.sample("y", &logits, &q)).collect();
        assert_ne!(a, b);
        s.remove("x");
        assert_eq!(s.num_generators(), 1);
    }
}
