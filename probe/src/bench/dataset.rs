//! Benchmark prompts: random, shared-prefix and file datasets, with token counts that are exact
//! when a tokenizer (local `tokenizer.json` or the server's `/tokenize`) is available.
//!
//! Without a tokenizer, counts are approximate by a fixed rule ([`approx_token_count`]):
//! each whitespace-separated word counts `ceil(chars / 6)` tokens (at least 1). Generated prompts are
//! made of common English words of at most 6 letters that are one token each in byte-level BPE
//! vocabularies, so for them the rule is close; reports say which counting was used.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("cannot load tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("tokenizing failed: {0}")]
    Encode(String),
    #[error("server /tokenize failed: {0}")]
    Server(String),
    #[error("cannot read dataset {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("dataset {path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("dataset {path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("invalid dataset parameter: {0}")]
    Param(String),
}

/// One prompt to send, with its (measured) prompt length and the output length to ask for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchPrompt {
    pub prompt: String,
    pub prompt_len: usize,
    pub output_len: usize,
    /// Shared-prefix group, if any.
    pub group: Option<usize>,
}

/// How prompt lengths were counted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "method", content = "source")]
pub enum TokenCounting {
    Tokenizer(String),
    Server(String),
    Approximate,
}

impl TokenCounting {
    pub fn describe(&self) -> String {
        match self {
            TokenCounting::Tokenizer(p) => format!("exact, local tokenizer {p}"),
            TokenCounting::Server(u) => format!("exact, server tokenizer {u}"),
            TokenCounting::Approximate => {
                "APPROXIMATE: no tokenizer; tokens = sum over words of ceil(chars / 6)".to_string()
            }
        }
    }
}

/// Counts tokens of a prompt.
pub enum TokenCounter {
    Local {
        tokenizer: Box<tokenizers::Tokenizer>,
        path: PathBuf,
    },
    Server {
        client: reqwest::Client,
        url: String,
        model: String,
    },
    Approximate,
}

/// The approximate rule used when no tokenizer is available.
pub fn approx_token_count(text: &str) -> usize {
    text.split_whitespace()
        .map(|w| w.chars().count().div_ceil(6).max(1))
        .sum()
}

impl TokenCounter {
    pub fn from_tokenizer_file(path: &Path) -> Result<Self, DatasetError> {
        let tokenizer =
            tokenizers::Tokenizer::from_file(path).map_err(|e| DatasetError::Tokenizer {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        Ok(TokenCounter::Local {
            tokenizer: Box::new(tokenizer),
            path: path.to_path_buf(),
        })
    }

    /// Uses the server's `/tokenize` (vLLM: `{"prompt"}` -> `{"count"}`; llama-server:
    /// `{"content"}` -> `{"tokens"}`) if it answers; None otherwise.
    pub async fn from_server(client: reqwest::Client, base_url: &str, model: &str) -> Option<Self> {
        let counter = TokenCounter::Server {
            client,
            url: format!("{}/tokenize", base_url.trim_end_matches('/')),
            model: model.to_string(),
        };
        match counter.count("hello world").await {
            Ok(n) if n > 0 => Some(counter),
            _ => None,
        }
    }

    pub fn counting(&self) -> TokenCounting {
        match self {
            TokenCounter::Local { path, .. } => {
                TokenCounting::Tokenizer(path.display().to_string())
            }
            TokenCounter::Server { url, .. } => TokenCounting::Server(url.clone()),
            TokenCounter::Approximate => TokenCounting::Approximate,
        }
    }

    pub async fn count(&self, text: &str) -> Result<usize, DatasetError> {
        match self {
            TokenCounter::Local { tokenizer, .. } => tokenizer
                .encode(text, false)
                .map(|e| e.len())
                .map_err(|e| DatasetError::Encode(e.to_string())),
            TokenCounter::Server { client, url, model } => {
                let body = serde_json::json!({
                    "model": model, "prompt": text, "content": text, "add_special_tokens": false
                });
                let resp = client
                    .post(url)
                    .json(&body)
                    .send()
                    .await
                    .map_err(|e| DatasetError::Server(e.to_string()))?;
                if !resp.status().is_success() {
                    return Err(DatasetError::Server(format!("HTTP {}", resp.status())));
                }
                let v: serde_json::Value = resp
                    .json()
                    .await
                    .map_err(|e| DatasetError::Server(e.to_string()))?;
                if let Some(n) = v.get("count").and_then(|c| c.as_u64()) {
                    return Ok(n as usize);
                }
                v.get("tokens")
                    .and_then(|t| t.as_array())
                    .map(|t| t.len())
                    .ok_or_else(|| {
                        DatasetError::Server("answer has neither count nor tokens".into())
                    })
            }
            TokenCounter::Approximate => Ok(approx_token_count(text)),
        }
    }
}

/// Words that are a single token (with their leading space) in common byte-level BPE vocabularies.
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by",
    "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an",
    "had", "they", "you", "were", "their", "one", "all", "we", "can", "her", "has", "there",
    "been", "if", "more", "when", "will", "would", "who", "so", "no", "time", "people", "new",
    "first", "year", "work", "world", "life", "day", "part", "place", "case", "week", "system",
    "number", "group", "fact", "water", "house", "point", "home", "room", "money", "story", "book",
    "word", "car", "city", "school", "state", "family", "name", "light", "music", "game", "line",
    "end", "power", "food", "level", "order", "team", "market", "data", "model", "table", "river",
    "tree", "road", "paper", "field", "sound", "color",
];

fn random_words(rng: &mut StdRng, n: usize) -> Vec<&'static str> {
    (0..n)
        .map(|_| WORDS[rng.gen_range(0..WORDS.len())])
        .collect()
}

/// Random text of exactly `target` tokens when the counter is exact and convergence allows;
/// returns the text and its measured length.
async fn fit_text(
    counter: &TokenCounter,
    rng: &mut StdRng,
    prefix: &str,
    target: usize,
) -> Result<(String, usize), DatasetError> {
    let join = |words: &[&str]| {
        let body = words.join(" ");
        if prefix.is_empty() {
            body
        } else {
            format!("{prefix} {body}")
        }
    };
    let base = if prefix.is_empty() {
        0
    } else {
        counter.count(prefix).await?
    };
    let mut words = random_words(rng, target.saturating_sub(base));
    let mut text = join(&words);
    let mut len = counter.count(&text).await?;
    for _ in 0..16 {
        if len == target {
            break;
        }
        if len > target {
            let drop = (len - target).min(words.len());
            if drop == 0 {
                break;
            }
            words.truncate(words.len() - drop);
        } else {
            words.extend(random_words(rng, target - len));
        }
        text = join(&words);
        len = counter.count(&text).await?;
    }
    Ok((text, len))
}

/// vLLM's `--random-range-ratio`: uniform integer in [len*(1-r), len*(1+r)], at least 1.
fn ranged(rng: &mut StdRng, len: usize, ratio: f64) -> usize {
    let lo = ((len as f64) * (1.0 - ratio)).floor().max(1.0) as usize;
    let hi = (((len as f64) * (1.0 + ratio)).floor() as usize).max(lo);
    rng.gen_range(lo..=hi)
}

/// Which prompts to build.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DatasetSpec {
    /// vLLM's random dataset: lengths uniform within `range_ratio` of the targets, plus an optional
    /// random prefix of `prefix_len` tokens shared by every prompt.
    Random {
        num_prompts: usize,
        input_len: usize,
        output_len: usize,
        #[serde(default)]
        range_ratio: f64,
        #[serde(default)]
        prefix_len: usize,
    },
    /// inference-perf's shared-prefix dataset: `num_groups` system prompts, each followed by
    /// `num_prompts_per_group` distinct questions; prompts are shuffled by the seed.
    SharedPrefix {
        num_groups: usize,
        num_prompts_per_group: usize,
        system_prompt_len: usize,
        question_len: usize,
        output_len: usize,
    },
    /// A JSON file: a list of strings, or ShareGPT conversations (`[{"conversations": [{"from",
    /// "value"}, ...]}]`). ShareGPT output lengths come from the reply unless `output_len` is set.
    File {
        path: PathBuf,
        num_prompts: Option<usize>,
        output_len: Option<usize>,
    },
}

pub struct Dataset {
    pub prompts: Vec<BenchPrompt>,
    pub counting: TokenCounting,
}

/// Builds the prompts of `spec` with `seed`, counting tokens with `counter`.
pub async fn build(
    spec: &DatasetSpec,
    counter: &TokenCounter,
    seed: u64,
) -> Result<Dataset, DatasetError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut prompts = Vec::new();
    match spec {
        DatasetSpec::Random {
            num_prompts,
            input_len,
            output_len,
            range_ratio,
            prefix_len,
        } => {
            if !(0.0..1.0).contains(range_ratio) {
                return Err(DatasetError::Param(format!(
                    "random range ratio must be in [0, 1), got {range_ratio}"
                )));
            }
            let prefix = if *prefix_len > 0 {
                fit_text(counter, &mut rng, "", *prefix_len).await?.0
            } else {
                String::new()
            };
            for _ in 0..*num_prompts {
                let inp = ranged(&mut rng, *input_len, *range_ratio);
                let out = ranged(&mut rng, *output_len, *range_ratio);
                let (prompt, prompt_len) =
                    fit_text(counter, &mut rng, &prefix, prefix_len + inp).await?;
                prompts.push(BenchPrompt {
                    prompt,
                    prompt_len,
                    output_len: out,
                    group: None,
                });
            }
        }
        DatasetSpec::SharedPrefix {
            num_groups,
            num_prompts_per_group,
            system_prompt_len,
            question_len,
            output_len,
        } => {
            for g in 0..*num_groups {
                let (system, _) = fit_text(counter, &mut rng, "", *system_prompt_len).await?;
                for _ in 0..*num_prompts_per_group {
                    let (prompt, prompt_len) =
                        fit_text(counter, &mut rng, &system, system_prompt_len + question_len)
                            .await?;
                    prompts.push(BenchPrompt {
                        prompt,
                        prompt_len,
                        output_len: *output_len,
                        group: Some(g),
                    });
                }
            }
            prompts.shuffle(&mut rng);
        }
        DatasetSpec::File {
            path,
            num_prompts,
            output_len,
        } => {
            prompts = from_file(path, counter, *output_len, &mut rng).await?;
            if let Some(n) = num_prompts {
                if prompts.len() < *n {
                    return Err(DatasetError::Format {
                        path: path.clone(),
                        message: format!("{} usable prompts, {n} requested", prompts.len()),
                    });
                }
                prompts.truncate(*n);
            }
        }
    }
    Ok(Dataset {
        prompts,
        counting: counter.counting(),
    })
}

async fn from_file(
    path: &Path,
    counter: &TokenCounter,
    output_len: Option<usize>,
    rng: &mut StdRng,
) -> Result<Vec<BenchPrompt>, DatasetError> {
    let fmt = |message: String| DatasetError::Format {
        path: path.to_path_buf(),
        message,
    };
    let raw = std::fs::read_to_string(path).map_err(|source| DatasetError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let value: serde_json::Value =
        serde_json::from_str(&raw).map_err(|source| DatasetError::Json {
            path: path.to_path_buf(),
            source,
        })?;
    let items = value
        .as_array()
        .ok_or_else(|| fmt("top level must be a JSON list".into()))?;
    let mut out = Vec::new();
    let mut order: Vec<usize> = (0..items.len()).collect();
    let is_sharegpt = items.iter().any(|v| v.get("conversations").is_some());
    if is_sharegpt {
        // vLLM shuffles ShareGPT with the seed before taking prompts.
        order.shuffle(rng);
    }
    for i in order {
        let item = &items[i];
        if let Some(s) = item.as_str() {
            let prompt_len = counter.count(s).await?;
            let output_len =
                output_len.ok_or_else(|| fmt("a list of strings needs an output length".into()))?;
            out.push(BenchPrompt {
                prompt: s.to_string(),
                prompt_len,
                output_len,
                group: None,
            });
            continue;
        }
        let turns = item
            .get("conversations")
            .and_then(|c| c.as_array())
            .ok_or_else(|| fmt(format!("item {i} is neither a string nor a conversation")))?;
        let text =
            |t: &serde_json::Value| t.get("value").and_then(|v| v.as_str()).map(str::to_string);
        // vLLM: first turn is the prompt, second the reference reply; shorter ones are skipped.
        let (Some(prompt), Some(reply)) =
            (turns.first().and_then(text), turns.get(1).and_then(text))
        else {
            continue;
        };
        let prompt_len = counter.count(&prompt).await?;
        let out_len = match output_len {
            Some(n) => n,
            None => counter.count(&reply).await?,
        };
        // vLLM's ShareGPT filter: drop too-short and too-long pairs.
        if prompt_len < 4 || (output_len.is_none() && out_len < 4) {
            continue;
        }
        if prompt_len > 1024 || prompt_len + out_len > 2048 {
            continue;
        }
        out.push(BenchPrompt {
            prompt,
            prompt_len,
            output_len: out_len,
            group: None,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn local_tokenizer() -> Option<TokenCounter> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let p = std::env::var("QWEN_TOKENIZER_JSON")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join(".cache/tokenizers/qwen2.5/tokenizer.json"));
        if !p.exists() {
            eprintln!(
                "SKIPPING exact-count check: no tokenizer.json at {} (scripts fetch it)",
                p.display()
            );
            return None;
        }
        Some(TokenCounter::from_tokenizer_file(&p).unwrap())
    }

    #[test]
    fn approx_rule() {
        assert_eq!(approx_token_count("the cat sat"), 3);
        assert_eq!(approx_token_count("abcdefghijklm nopq"), 4);
        assert!(WORDS.iter().all(|w| approx_token_count(w) == 1));
        assert_eq!(approx_token_count(""), 0);
    }

    #[test]
    fn random_lengths_respect_range_ratio_and_seed() {
        let spec = DatasetSpec::Random {
            num_prompts: 200,
            input_len: 100,
            output_len: 50,
            range_ratio: 0.5,
            prefix_len: 0,
        };
        let rt = rt();
        let a = rt
            .block_on(build(&spec, &TokenCounter::Approximate, 1))
            .unwrap();
        assert_eq!(a.prompts.len(), 200);
        assert_eq!(a.counting, TokenCounting::Approximate);
        for p in &a.prompts {
            assert!((50..=150).contains(&p.prompt_len), "{}", p.prompt_len);
            assert!((25..=75).contains(&p.output_len));
            assert_eq!(approx_token_count(&p.prompt), p.prompt_len);
        }
        let spread = a.prompts.iter().map(|p| p.prompt_len).max().unwrap()
            - a.prompts.iter().map(|p| p.prompt_len).min().unwrap();
        assert!(spread > 60, "lengths should vary, spread {spread}");
        let b = rt
            .block_on(build(&spec, &TokenCounter::Approximate, 1))
            .unwrap();
        assert_eq!(a.prompts, b.prompts);
        let bad = DatasetSpec::Random {
            num_prompts: 1,
            input_len: 1,
            output_len: 1,
            range_ratio: 1.5,
            prefix_len: 0,
        };
        assert!(rt
            .block_on(build(&bad, &TokenCounter::Approximate, 1))
            .is_err());
    }

    #[test]
    fn random_exact_with_real_tokenizer() {
        let Some(tok) = local_tokenizer() else { return };
        let spec = DatasetSpec::Random {
            num_prompts: 20,
            input_len: 128,
            output_len: 16,
            range_ratio: 0.0,
            prefix_len: 32,
        };
        let d = rt().block_on(build(&spec, &tok, 5)).unwrap();
        assert!(matches!(d.counting, TokenCounting::Tokenizer(_)));
        for p in &d.prompts {
            assert_eq!(p.prompt_len, 160);
            assert_eq!(rt().block_on(tok.count(&p.prompt)).unwrap(), 160);
        }
        let prefix: Vec<_> = d.prompts[0].prompt.split(' ').take(20).collect();
        assert!(d
            .prompts
            .iter()
            .all(|p| p.prompt.starts_with(&prefix.join(" "))));
    }

    #[test]
    fn shared_prefix_groups_share_their_system_prompt() {
        let spec = DatasetSpec::SharedPrefix {
            num_groups: 3,
            num_prompts_per_group: 4,
            system_prompt_len: 40,
            question_len: 10,
            output_len: 7,
        };
        let d = rt()
            .block_on(build(&spec, &TokenCounter::Approximate, 2))
            .unwrap();
        assert_eq!(d.prompts.len(), 12);
        for g in 0..3 {
            let members: Vec<_> = d.prompts.iter().filter(|p| p.group == Some(g)).collect();
            assert_eq!(members.len(), 4);
            let sys: Vec<_> = members[0].prompt.split(' ').take(40).collect();
            assert!(members.iter().all(|p| p.prompt.starts_with(&sys.join(" "))));
            assert!(members
                .iter()
                .all(|p| p.prompt_len == 50 && p.output_len == 7));
        }
        // Shuffled: not in group-major order.
        let groups: Vec<_> = d.prompts.iter().map(|p| p.group.unwrap()).collect();
        let mut sorted = groups.clone();
        sorted.sort();
        assert_ne!(groups, sorted);
    }

    #[test]
    fn file_datasets_strings_and_sharegpt() {
        let dir = std::env::temp_dir().join(format!("probe-ds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let strings = dir.join("s.json");
        std::fs::write(&strings, r#"["one two three", "four five"]"#).unwrap();
        let rt = rt();
        let spec = DatasetSpec::File {
            path: strings.clone(),
            num_prompts: None,
            output_len: Some(9),
        };
        let d = rt
            .block_on(build(&spec, &TokenCounter::Approximate, 0))
            .unwrap();
        assert_eq!(d.prompts.len(), 2);
        assert_eq!((d.prompts[0].prompt_len, d.prompts[0].output_len), (3, 9));
        let no_len = DatasetSpec::File {
            path: strings,
            num_prompts: None,
            output_len: None,
        };
        assert!(rt
            .block_on(build(&no_len, &TokenCounter::Approximate, 0))
            .is_err());

        let sg = dir.join("sg.json");
        std::fs::write(
            &sg,
            r#"[{"conversations":[{"from":"human","value":"a b c d e"},{"from":"gpt","value":"v w x y z q"}]},
                {"conversations":[{"from":"human","value":"too short"},{"from":"gpt","value":"r e p l y"}]},
                {"conversations":[{"from":"human","value":"only one turn here"}]}]"#,
        )
        .unwrap();
        let spec = DatasetSpec::File {
            path: sg.clone(),
            num_prompts: None,
            output_len: None,
        };
        let d = rt
            .block_on(build(&spec, &TokenCounter::Approximate, 0))
            .unwrap();
        assert_eq!(d.prompts.len(), 1);
        assert_eq!((d.prompts[0].prompt_len, d.prompts[0].output_len), (5, 6));
        let too_many = DatasetSpec::File {
            path: sg,
            num_prompts: Some(2),
            output_len: None,
        };
        assert!(rt
            .block_on(build(&too_many, &TokenCounter::Approximate, 0))
            .is_err());
        let bad = dir.join("bad.json");
        std::fs::write(&bad, "{not json").unwrap();
        let spec = DatasetSpec::File {
            path: bad,
            num_prompts: None,
            output_len: Some(1),
        };
        assert!(matches!(
            rt.block_on(build(&spec, &TokenCounter::Approximate, 0)),
            Err(DatasetError::Json { .. })
        ));
        std::fs::remove_dir_all(&dir).ok();
    }
}
