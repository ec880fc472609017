//! Golden tests on the real SmolLM2-135M-Instruct GGUF: tokenizer, chat template, greedy decoding
//! through the dense reference and the paged (batched) forward.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use candle_core::{DType, Device};
use engine::model::{CausalLM, ForwardBatch, KvCache, SeqInput};
use engine::tokenizer::{ChatMessage, Tokenizer};
use engine::weights::{load_model, LoadFormat};

const TEMPLATE_IDS: [u32; 37] = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
    19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531,
    198,
];
const ANSWER_37: [u32; 8] = [504, 3575, 282, 4649, 314, 7042, 30, 2];
const ANSWER_36: [u32; 9] = [198, 504, 3575, 282, 4649, 314, 7042, 30, 2];
const BLOCK_SIZE: usize = 16;

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The SmolLM2 GGUF from `SMOLLM2_GGUF` or `.cache/models/`; None (with a loud message) if absent.
fn gguf_path() -> Option<PathBuf> {
    let p = match std::env::var_os("SMOLLM2_GGUF") {
        Some(p) => PathBuf::from(p),
        None => workspace_root().join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    };
    if p.is_file() {
        Some(p)
    } else {
        eprintln!(
            "\n*** SKIPPED: SmolLM2 GGUF not found at {} (set SMOLLM2_GGUF or run scripts/fetch-model.sh) ***\n",
            p.display()
        );
        None
    }
}

type Shared = Mutex<Box<dyn CausalLM>>;

fn model() -> Option<&'static Shared> {
    static MODEL: OnceLock<Option<Shared>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let p = gguf_path()?;
            let m = load_model(&p, LoadFormat::Auto, DType::F32, &Device::Cpu, 0)
                .expect("SmolLM2 GGUF loads");
            Some(Mutex::new(m))
        })
        .as_ref()
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

fn greedy_full(m: &dyn CausalLM, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut tokens = prompt.to_vec();
    for _ in 0..n {
        let logits = m.forward_full(&tokens).unwrap();
        let last: Vec<f32> = logits.get(tokens.len() - 1).unwrap().to_vec1().unwrap();
        tokens.push(argmax(&last));
    }
    tokens[prompt.len()..].to_vec()
}

/// A sequence driven through the paged forward.
struct PagedSeq {
    tokens: Vec<u32>,
    prompt_len: usize,
    num_computed_tokens: usize,
    block_table: Vec<u32>,
    last_logits: Option<Vec<f32>>,
}

impl PagedSeq {
    /// A sequence with `prompt` and nothing computed or cached yet.
    fn new(prompt: &[u32]) -> Self {
        PagedSeq {
            tokens: prompt.to_vec(),
            prompt_len: prompt.len(),
            num_computed_tokens: 0,
            block_table: vec![],
            last_logits: None,
        }
    }
}

/// Blocks handed out from the top down, so a sequence's blocks are not contiguous.
struct Blocks {
    next: u32,
}

impl Blocks {
    fn take(&mut self) -> u32 {
        self.next -= 1;
        self.next
    }
}

/// One step: sequence i computes `chunk[i]` new tokens (0 = not scheduled). Sequences whose chunk
/// reaches the end of their tokens get logits and append their greedy token.
fn paged_step(
    m: &dyn CausalLM,
    cache: &mut KvCache,
    blocks: &mut Blocks,
    seqs: &mut [PagedSeq],
    chunk: &[usize],
) {
    let mut batch = ForwardBatch::default();
    let mut with_logits = Vec::new();
    for (i, (s, &n)) in seqs.iter_mut().zip(chunk).enumerate() {
        if n == 0 {
            continue;
        }
        let start = s.num_computed_tokens;
        let ctx = start + n;
        assert!(ctx <= s.tokens.len());
        while s.block_table.len() * BLOCK_SIZE < ctx {
            s.block_table.push(blocks.take());
        }
        let query_start = batch.token_ids.len();
        for p in start..ctx {
            batch.token_ids.push(s.tokens[p]);
            batch.positions.push(p as u32);
            let slot = s.block_table[p / BLOCK_SIZE] as usize * BLOCK_SIZE + p % BLOCK_SIZE;
            batch.slot_mapping.push(slot as i64);
        }
        let compute_logits = ctx == s.tokens.len();
        batch.seqs.push(SeqInput {
            query_start,
            query_len: n,
            context_len: ctx,
            block_table: s.block_table.clone(),
            compute_logits,
        });
        if compute_logits {
            with_logits.push(i);
        }
        s.num_computed_tokens = ctx;
    }
    let logits = m.forward(&batch, cache).unwrap();
    assert_eq!(logits.dims(), &[with_logits.len(), m.config().vocab_size]);
    for (row, &i) in with_logits.iter().enumerate() {
        let l: Vec<f32> = logits.get(row).unwrap().to_vec1().unwrap();
        seqs[i].tokens.push(argmax(&l));
        seqs[i].last_logits = Some(l);
    }
}

/// One single-sequence step computing `n` tokens; returns its last-token logits.
fn paged_logits(
    m: &dyn CausalLM,
    cache: &mut KvCache,
    blocks: &mut Blocks,
    seqs: &mut [PagedSeq],
    n: usize,
) -> Vec<f32> {
    paged_step(m, cache, blocks, seqs, &[n]);
    // paged_step appended its own argmax; take it back and return the logits instead.
    let s = &mut seqs[0];
    s.tokens.pop();
    s.last_logits.take().expect("logits of the last step")
}

fn new_cache(m: &dyn CausalLM, num_blocks: usize) -> (KvCache, Blocks) {
    let cache = KvCache::new(m.config(), num_blocks, BLOCK_SIZE, DType::F32, m.device()).unwrap();
    (
        cache,
        Blocks {
            next: num_blocks as u32,
        },
    )
}

fn greedy_paged(m: &dyn CausalLM, prompt: &[u32], n: usize) -> Vec<u32> {
    let (mut cache, mut blocks) = new_cache(m, 64);
    let mut seqs = vec![PagedSeq::new(prompt)];
    paged_step(m, &mut cache, &mut blocks, &mut seqs, &[prompt.len()]);
    for _ in 1..n {
        paged_step(m, &mut cache, &mut blocks, &mut seqs, &[1]);
    }
    seqs[0].tokens[prompt.len()..].to_vec()
}

#[test]
fn smollm2_chat_template_tokenizes_to_golden_ids() {
    let Some(p) = gguf_path() else { return };
    let tk = Tokenizer::from_model_path(&p).unwrap();
    let msgs = [ChatMessage {
        role: "user".into(),
        content: "What is the capital of France?".into(),
    }];
    let text = tk.apply_chat_template(&msgs, true).unwrap();
    assert!(text.ends_with("<|im_start|>assistant\n"), "{text:?}");
    assert_eq!(tk.encode(&text, false).unwrap(), TEMPLATE_IDS);
    assert_eq!(
        tk.decode(&ANSWER_37, false).unwrap(),
        "The capital of France is Paris.<|im_end|>"
    );
    assert_eq!(tk.eos_token_ids(), &[2]);
    let mut dec = tk.incremental_decoder();
    let streamed: String = ANSWER_37.iter().filter_map(|id| dec.push(*id)).collect();
    assert_eq!(streamed, "The capital of France is Paris.");
}

#[test]
fn smollm2_greedy_forward_full_matches_golden() {
    let Some(m) = model() else { return };
    let m = m.lock().unwrap();
    assert_eq!(greedy_full(m.as_ref(), &TEMPLATE_IDS, 8), ANSWER_37);
    assert_eq!(greedy_full(m.as_ref(), &TEMPLATE_IDS[..36], 9), ANSWER_36);
}

#[test]
fn smollm2_greedy_paged_matches_golden() {
    let Some(m) = model() else { return };
    let m = m.lock().unwrap();
    assert_eq!(greedy_paged(m.as_ref(), &TEMPLATE_IDS, 8), ANSWER_37);
    assert_eq!(greedy_paged(m.as_ref(), &TEMPLATE_IDS[..36], 9), ANSWER_36);
}

#[test]
fn smollm2_batched_paged_decoding_matches_forward_full() {
    let Some(m) = model() else { return };
    let Some(p) = gguf_path() else { return };
    let m = m.lock().unwrap();
    let tk = Tokenizer::from_model_path(&p).unwrap();
    let texts = [
        "Once upon a time",
        "def fibonacci(n):",
        "The quick brown fox jumps over the lazy dog. The quick brown fox",
        "1, 2, 3, 4,",
        "Paris is",
    ];
    let mut prompts: Vec<Vec<u32>> = texts.iter().map(|t| tk.encode(t, false).unwrap()).collect();
    prompts.push(TEMPLATE_IDS.to_vec());
    prompts.push(TEMPLATE_IDS[..20].to_vec());
    prompts.push(vec![TEMPLATE_IDS[0]]);
    assert_eq!(prompts.len(), 8);
    const STEPS: usize = 6;
    let want: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| greedy_full(m.as_ref(), p, STEPS))
        .collect();

    let (mut cache, mut blocks) = new_cache(m.as_ref(), 128);
    let mut seqs: Vec<PagedSeq> = prompts.iter().map(|p| PagedSeq::new(p)).collect();
    // Step 1: all prefills at once, except the long template prompt (index 5), which prefills in
    // two chunks (chunked prefill), the second one batched with the others' first decode step.
    let mut chunk: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
    chunk[5] = 21;
    paged_step(m.as_ref(), &mut cache, &mut blocks, &mut seqs, &chunk);
    loop {
        let chunk: Vec<usize> = seqs
            .iter()
            .map(|s| {
                let generated = s.tokens.len() - s.prompt_len;
                if generated >= STEPS {
                    0
                } else {
                    s.tokens.len() - s.num_computed_tokens
                }
            })
            .collect();
        if chunk.iter().all(|c| *c == 0) {
            break;
        }
        paged_step(m.as_ref(), &mut cache, &mut blocks, &mut seqs, &chunk);
    }
    for (i, s) in seqs.iter().enumerate() {
        assert_eq!(
            s.tokens[s.prompt_len..],
            want[i][..],
            "prompt {i} ({:?})",
            prompts[i]
        );
    }
}

/// A prompt prefilled alone in three chunks: the first two steps return no logits at all, yet
/// must write their K/V, so that the last chunk's logits equal the cache-free forward's.
#[test]
fn smollm2_chunks_without_logits_still_fill_the_cache() {
    let Some(m) = model() else { return };
    let m = m.lock().unwrap();
    let prompt = TEMPLATE_IDS.to_vec();
    let full = m.as_ref().forward_full(&prompt).unwrap();
    let want: Vec<f32> = full.get(prompt.len() - 1).unwrap().to_vec1().unwrap();
    let (mut cache, mut blocks) = new_cache(m.as_ref(), 16);
    let mut seqs = vec![PagedSeq::new(&prompt)];
    for chunk in [10, 15, prompt.len() - 25] {
        paged_step(m.as_ref(), &mut cache, &mut blocks, &mut seqs, &[chunk]);
    }
    let got = seqs[0]
        .last_logits
        .take()
        .expect("logits of the last chunk");
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-3, "chunked prefill logits off by {worst}");
}

#[derive(serde::Deserialize)]
struct GoldenCase {
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    /// (token id, logit) of the first generated position, best first.
    top5_first: Vec<(u32, f32)>,
}

#[derive(serde::Deserialize)]
struct GoldenMeta {
    /// The reference ran with min_new_tokens: these ids never win the argmax.
    eos_suppressed_ids: Vec<u32>,
}

#[derive(serde::Deserialize)]
struct Goldens {
    meta: GoldenMeta,
    cases: Vec<GoldenCase>,
}

#[test]
fn smollm2_matches_reference_fixture() {
    let fixture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_goldens.json");
    if !fixture.is_file() {
        eprintln!(
            "\n*** SKIPPED: {} absent (make it with scripts/reference/make_goldens.py) ***\n",
            fixture.display()
        );
        return;
    }
    let Some(m) = model() else { return };
    let m = m.lock().unwrap();
    let goldens: Goldens =
        serde_json::from_str(&std::fs::read_to_string(&fixture).unwrap()).unwrap();
    assert!(!goldens.cases.is_empty());
    for (i, case) in goldens.cases.iter().enumerate() {
        let logits = m.forward_full(&case.prompt_ids).unwrap();
        let last: Vec<f32> = logits
            .get(case.prompt_ids.len() - 1)
            .unwrap()
            .to_vec1()
            .unwrap();
        for (id, logit) in &case.top5_first {
            let got = last[*id as usize];
            assert!(
                (got - logit).abs() < 2e-2,
                "case {i}: logit of {id}: {got} vs {logit}"
            );
        }
        // Greedy with the suppressed ids masked, through the paged path.
        let (mut cache, mut blocks) = new_cache(m.as_ref(), 64);
        let mut tokens = case.prompt_ids.clone();
        let mut seq = vec![PagedSeq::new(&tokens)];
        for _ in 0..case.greedy_ids.len() {
            let n = seq[0].tokens.len() - seq[0].num_computed_tokens;
            let mut batch_logits = paged_logits(m.as_ref(), &mut cache, &mut blocks, &mut seq, n);
            for id in &goldens.meta.eos_suppressed_ids {
                batch_logits[*id as usize] = f32::NEG_INFINITY;
            }
            let next = argmax(&batch_logits);
            seq[0].tokens.push(next);
            tokens.push(next);
        }
        assert_eq!(
            tokens[case.prompt_ids.len()..],
            case.greedy_ids[..],
            "case {i}"
        );
    }
}

/// CPU decode speed of one sequence (paged path), median of 3 runs of 32 tokens. Run with
/// `cargo test --release -p engine --test it smollm2_decode_speed -- --ignored --nocapture`.
#[test]
#[ignore]
fn smollm2_decode_speed() {
    let Some(m) = model() else { return };
    let m = m.lock().unwrap();
    let mut rates = Vec::new();
    for _ in 0..3 {
        let (mut cache, mut blocks) = new_cache(m.as_ref(), 64);
        let mut seqs = vec![PagedSeq::new(&TEMPLATE_IDS)];
        paged_step(
            m.as_ref(),
            &mut cache,
            &mut blocks,
            &mut seqs,
            &[TEMPLATE_IDS.len()],
        );
        let t = std::time::Instant::now();
        for _ in 0..32 {
            paged_step(m.as_ref(), &mut cache, &mut blocks, &mut seqs, &[1]);
        }
        rates.push(32.0 / t.elapsed().as_secs_f64());
    }
    rates.sort_by(|a, b| a.partial_cmp(b).unwrap());
    eprintln!(
        "SmolLM2 CPU greedy decode: {:.1} tokens/s (median of {rates:?})",
        rates[1]
    );
}
