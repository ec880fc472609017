//! The HTTP API end to end: real engine (tiny dummy model, or SmolLM2 when present) behind a real
//! server on 127.0.0.1:0.

use engine::api::server::{router, ApiState};
use engine::args::EngineArgs;
use engine::launch::{launch, LaunchError};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A byte-level BPE tokenizer.json (256 byte tokens, no merges) plus ChatML special tokens.
fn write_tiny_model(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    // GPT-2 byte -> printable char table.
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut pairs: Vec<(u32, u32)> = bs.into_iter().zip(cs).collect();
    pairs.sort();
    let vocab: serde_json::Map<String, Value> = pairs
        .iter()
        .map(|(b, c)| (char::from_u32(*c).unwrap().to_string(), json!(b)))
        .collect();
    let added = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [added(256, "<|im_start|>"), added(257, "<|im_end|>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"eos_token":"<|im_end|>","bos_token":null}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type":"llama","vocab_size":258,"hidden_size":32,"intermediate_size":64,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
            "max_position_embeddings":128,"tie_word_embeddings":true,"eos_token_id":257}"#,
    )
    .unwrap();
}

fn tiny_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("engine-api-tiny-{}", std::process::id()));
    if !dir.join("config.json").is_file() {
        write_tiny_model(&dir);
    }
    dir
}

fn tiny_args(extra: &[&str]) -> EngineArgs {
    let dir = tiny_dir();
    let mut argv: Vec<String> = vec![
        "engine".into(),
        dir.to_string_lossy().into(),
        "--load-format".into(),
        "dummy".into(),
        "--tokenizer".into(),
        dir.join("tokenizer.json").to_string_lossy().into(),
        "--served-model-name".into(),
        "tiny".into(),
        "--device".into(),
        "cpu".into(),
        "--kv-cache-memory".into(),
        "4MiB".into(),
    ];
    argv.extend(extra.iter().map(|s| s.to_string()));
    EngineArgs::parse_from_argv(argv).unwrap()
}

struct Server {
    base: String,
    client: reqwest::Client,
}

async fn start(args: EngineArgs) -> Server {
    let state = ApiState::new(args.served_model_name().unwrap(), args.api_key.clone());
    let launched = tokio::task::spawn_blocking(move || launch(&args, Instant::now()))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("launch failed: {e}"));
    state.set_ready(launched.served);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router(state)).await });
    Server {
        base,
        client: reqwest::Client::new(),
    }
}

impl Server {
    async fn post(&self, path: &str, body: &str) -> (u16, Value) {
        let r = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .timeout(Duration::from_secs(120))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn get_text(&self, path: &str) -> (u16, String) {
        let r = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// Stream a request and parse it with an independent SSE parser: the JSON chunks, and
    /// whether `[DONE]` ended the stream.
    async fn stream(&self, path: &str, body: Value) -> (Vec<Value>, bool) {
        let r = self
            .client
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let mut events = r.bytes_stream().eventsource();
        let mut chunks = Vec::new();
        let mut done = false;
        while let Some(ev) = events.next().await {
            let ev = ev.expect("SSE parse error");
            assert!(!done, "data after [DONE]: {}", ev.data);
            if ev.data == "[DONE]" {
                done = true;
            } else {
                chunks.push(serde_json::from_str(&ev.data).expect(&ev.data));
            }
        }
        (chunks, done)
    }

    async fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get_text("/metrics").await;
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_tiny_completion_and_chat_streams() {
    let s = start(tiny_args(&[])).await;
    let (st, v) = s
        .post(
            "/v1/completions",
            r#"{"model":"tiny","prompt":"hello","max_tokens":5,"ignore_eos":true,"temperature":0}"#,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert!(v["usage"]["timings"]["prefill_s"].as_f64().unwrap() >= 0.0);

    let (chunks, done) = s
        .stream(
            "/v1/chat/completions",
            json!({"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":6,
                   "ignore_eos":true,"stream":true,"stream_options":{"include_usage":true}}),
        )
        .await;
    assert!(done, "stream did not end with [DONE]");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 6);
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "length"
    );

    let (chunks, done) = s
        .stream(
            "/v1/completions",
            json!({"prompt":[1,2,3],"max_tokens":4,"ignore_eos":true,"stream":true}),
        )
        .await;
    assert!(done);
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "text_completion" && c.get("usage").is_none()));

    let (st, body) = s.get_text("/v1/engine/startup").await;
    assert_eq!(st, 200);
    let startup: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(startup["device"], "cpu");
    assert_eq!(startup["block_size"], 16);
    assert!(startup["kv_cache_tokens"].as_u64().unwrap() >= 128);
    assert!(startup["phases"]["weights_load"].as_f64().unwrap() > 0.0);
    let (_, metrics) = s.get_text("/metrics").await;
    assert!(
        metrics.contains("engine_startup_phase_seconds{"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_bad_inputs_are_answered_and_server_survives() {
    let s = start(tiny_args(&["--max-model-len", "64"])).await;
    let long: Vec<u32> = (0..60).collect();
    let over = json!({"prompt": long, "max_tokens": 10}).to_string();
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("/v1/completions", "{\"prompt\": ".into(), 400, "invalid request body"),
        ("/v1/completions", "[1,2]".into(), 400, "invalid request body"),
        ("/v1/chat/completions", r#"{"model":"tiny"}"#.into(), 400, "messages"),
        ("/v1/completions", r#"{"max_tokens":3}"#.into(), 400, "prompt"),
        ("/v1/completions", r#"{"model":"nope","prompt":"a"}"#.into(), 404, "nope"),
        ("/v1/completions", r#"{"prompt":""}"#.into(), 400, "empty"),
        ("/v1/completions", r#"{"prompt":[999999]}"#.into(), 400, "token ids"),
        ("/v1/completions", r#"{"prompt":"a","temperature":-1}"#.into(), 400, "temperature"),
        ("/v1/completions", r#"{"prompt":"a","top_p":0}"#.into(), 400, "top_p"),
        ("/v1/completions", r#"{"prompt":"a","n":3}"#.into(), 400, "n must be 1"),
        ("/v1/completions", r#"{"prompt":"a","max_tokens":0}"#.into(), 400, "max_tokens"),
        ("/v1/chat/completions", r#"{"messages":[{"role":"user","content":"a"}],"max_completion_tokens":-5}"#.into(), 400, "max_completion_tokens"),
        ("/v1/completions", over, 400, "This model's maximum context length is 64 tokens. However, you requested 70 tokens (60 in the prompt, 10 in the completion)"),
    ];
    for (path, body, status, msg) in &cases {
        let (st, v) = s.post(path, body).await;
        assert_eq!(st, *status, "{body} -> {v}");
        let e = &v["error"];
        assert!(
            e["message"].as_str().unwrap().contains(msg),
            "{body} -> {v}"
        );
        assert!(e["type"].is_string() && e.get("param").is_some() && e.get("code").is_some());
    }
    let (st, v) = s
        .post("/v1/completions", r#"{"model":"x","prompt":"a"}"#)
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    let (st, v) = s
        .post(
            "/v1/completions",
            r#"{"prompt":"ok","max_tokens":2,"ignore_eos":true}"#,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(s.get_text("/health").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_dropped_stream_frees_the_request() {
    let s = start(tiny_args(&[])).await;
    let r = s
        .client
        .post(format!("{}/v1/completions", s.base))
        .json(&json!({"prompt":"drop me","max_tokens":100,"ignore_eos":true,"stream":true}))
        .send()
        .await
        .unwrap();
    let mut body = r.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    drop(body);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let running = s.metric("vllm:num_requests_running").await;
        let kv = s.metric("vllm:kv_cache_usage_perc").await;
        if running == 0.0 && kv == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still running {running}, kv {kv}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(s.metric("vllm:generation_tokens_total").await < 100.0);
}

#[test]
fn api_launch_refuses_what_cannot_fit() {
    let e = launch(&tiny_args(&["--kv-cache-memory", "8KiB"]), Instant::now())
        .err()
        .expect("tiny KV budget must be refused");
    let msg = e.to_string();
    assert!(matches!(e, LaunchError::KvCacheTooSmall { .. }), "{msg}");
    assert!(msg.contains("use --max-model-len"), "{msg}");
    let e = launch(&tiny_args(&["--max-model-len", "4096"]), Instant::now())
        .err()
        .expect("max-model-len past the model's limit must be refused");
    assert!(
        e.to_string().contains("max_position_embeddings (128)"),
        "{e}"
    );
}

fn smollm2_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SMOLLM2_GGUF") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    Some(root.join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")).filter(|p| p.is_file())
}

/// The engine on SmolLM2 (CPU, max-model-len 512) plus `extra` flags; None (test skipped, said
/// on stderr) when the GGUF is absent.
async fn smollm2_server(test: &str, extra: &[&str]) -> Option<Server> {
    let Some(path) = smollm2_path() else {
        eprintln!("SKIPPED {test}: SmolLM2 GGUF not found (set SMOLLM2_GGUF or run scripts/fetch-model.sh)");
        return None;
    };
    let mut argv = vec![
        "engine",
        path.to_str().unwrap(),
        "--served-model-name",
        "smol",
        "--device",
        "cpu",
        "--max-model-len",
        "512",
    ];
    argv.extend_from_slice(extra);
    Some(start(EngineArgs::parse_from_argv(argv).unwrap()).await)
}

/// Greedy chat answer to "What is the capital of France?" (status 200 checked).
async fn ask_france(s: &Server) -> Value {
    let (st, v) = s
        .post(
            "/v1/chat/completions",
            r#"{"model":"smol","messages":[{"role":"user","content":"What is the capital of France?"}],"temperature":0,"max_tokens":20}"#,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "The capital of France is Paris."
    );
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_smollm2_chat_greedy_answers_paris() {
    let Some(s) = smollm2_server(
        "api_smollm2_chat_greedy_answers_paris",
        &["--kv-cache-memory", "64MiB"],
    )
    .await
    else {
        return;
    };
    let v = ask_france(&s).await;
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], 37);
    assert_eq!(v["usage"]["completion_tokens"], 8);

    let (chunks, done) = s
        .stream(
            "/v1/chat/completions",
            json!({"model":"smol","messages":[{"role":"user","content":"What is the capital of France?"}],
                   "temperature":0,"max_tokens":20,"stream":true,"stream_options":{"include_usage":true}}),
        )
        .await;
    assert!(done);
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "The capital of France is Paris.");
    let (st, v) = s
        .post(
            "/v1/chat/completions",
            r#"{"model":"smol","messages":[{"role":"user","content":"What is the capital of France?"}],"temperature":0,"max_tokens":20,"stop":" is"}"#,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "The capital of France"
    );
    assert_eq!(v["choices"][0]["stop_reason"], " is");
}

/// Greedy completions of several prompts sent at once (one batch), as (text, completion tokens).
async fn greedy_texts(s: &Server, model: &str, n: usize) -> Vec<(String, u64)> {
    let bodies: Vec<String> = (0..n)
        .map(|i| {
            json!({"model": model, "prompt": format!("prompt number {i}: "),
                   "max_tokens": 10 + i, "ignore_eos": true, "temperature": 0})
            .to_string()
        })
        .collect();
    let reqs = bodies.iter().map(|b| s.post("/v1/completions", b));
    futures::future::join_all(reqs)
        .await
        .into_iter()
        .map(|(st, v)| {
            assert_eq!(st, 200, "{v}");
            let text = v["choices"][0]["text"].as_str().unwrap().to_string();
            (text, v["usage"]["completion_tokens"].as_u64().unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_tensor_parallel_2_serves_what_one_rank_serves() {
    let one = start(tiny_args(&[])).await;
    let two = start(tiny_args(&["--tensor-parallel-size", "2"])).await;
    let want = greedy_texts(&one, "tiny", 3).await;
    assert_eq!(greedy_texts(&two, "tiny", 3).await, want);
    assert_eq!(want[2].1, 12);

    let a: Value = serde_json::from_str(&one.get_text("/v1/engine/startup").await.1).unwrap();
    let b: Value = serde_json::from_str(&two.get_text("/v1/engine/startup").await.1).unwrap();
    assert_eq!(a["tensor_parallel_size"], 1);
    assert_eq!(b["tensor_parallel_size"], 2);
    // --kv-cache-memory is per rank: each rank holds half of every block, so twice the tokens.
    assert_eq!(
        b["kv_cache_tokens"].as_u64().unwrap(),
        2 * a["kv_cache_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        b["kv_cache_bytes"],
        2 * a["kv_cache_bytes"].as_u64().unwrap()
    );
    assert_eq!(two.metric("engine_tensor_parallel_size").await, 2.0);
    assert_eq!(one.metric("engine_tensor_parallel_size").await, 1.0);
}

#[test]
fn api_tensor_parallel_size_must_divide_the_heads() {
    let e = launch(&tiny_args(&["--tensor-parallel-size", "3"]), Instant::now())
        .err()
        .expect("4 heads over 3 ranks must be refused");
    let msg = e.to_string();
    assert!(
        msg.contains("exceeds num_key_value_heads 2") || msg.contains("divisible"),
        "{msg}"
    );
    assert!(msg.starts_with("weights load failed"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_smollm2_tensor_parallel_3_answers_paris() {
    // SmolLM2-135M: 9 heads, 3 KV heads, intermediate 1536, vocab 49152: all divide by 3.
    let Some(s) = smollm2_server(
        "api_smollm2_tensor_parallel_3_answers_paris",
        &["--kv-cache-memory", "16MiB", "-tp", "3"],
    )
    .await
    else {
        return;
    };
    let v = ask_france(&s).await;
    assert_eq!(v["usage"]["completion_tokens"], 8);
}

/// The `engine` binary stops on Ctrl-C (SIGINT) with exit status 0 while a request is streaming:
/// the in-flight response completes, the core thread finishes its step and is joined.
#[test]
fn binary_exits_cleanly_on_sigint_mid_stream() {
    let dir = tiny_dir();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_engine"))
        .arg(&dir)
        .args([
            "--load-format",
            "dummy",
            "--device",
            "cpu",
            "--served-model-name",
            "tiny",
        ])
        .args(["--kv-cache-memory", "4MiB", "--port", &port.to_string()])
        .arg("--tokenizer")
        .arg(dir.join("tokenizer.json"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !client
            .get(format!("{base}/health"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            assert!(Instant::now() < deadline, "engine not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let resp = client
            .post(format!("{base}/v1/completions"))
            .json(&json!({"prompt": "hi", "max_tokens": 100, "ignore_eos": true, "stream": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.bytes_stream();
        body.next().await.expect("a first chunk").unwrap();
        let status = std::process::Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        // The stream still ends properly.
        let mut rest = Vec::new();
        while let Some(chunk) = body.next().await {
            rest.extend_from_slice(&chunk.unwrap());
        }
        assert!(String::from_utf8_lossy(&rest).contains("[DONE]"));
    });
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}\n{log}", out.status);
}
