//! Tokenizer tests on a small byte-level BPE vocabulary written as a GGUF file.

use super::*;
use crate::gguf::{writer, GgufValue};

/// GPT-2's byte -> printable char table.
fn bytes_to_unicode() -> Vec<char> {
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
    let mut table = vec!['\0'; 256];
    for (b, c) in bs.iter().zip(cs) {
        table[*b as usize] = char::from_u32(c).unwrap();
    }
    table
}

fn small_gguf(chat_template: Option<&str>) -> GgufFile {
    let table = bytes_to_unicode();
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    tokens.extend(table.iter().map(|c| c.to_string()));
    let sp = table[b' ' as usize];
    let merges = vec![
        "h e".to_string(),
        "l l".to_string(),
        "he ll".to_string(),
        format!("{sp} w"),
    ];
    for m in &merges {
        tokens.push(m.replace(' ', ""));
    }
    let mut types = vec![3u32; 3];
    types.extend(std::iter::repeat_n(1, tokens.len() - 3));
    let s = |v: &str| GgufValue::String(v.into());
    let mut meta = vec![
        ("general.architecture", s("llama")),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s("smollm")),
        (
            "tokenizer.ggml.tokens",
            GgufValue::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.merges",
            GgufValue::Array(merges.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            GgufValue::Array(types.into_iter().map(GgufValue::U32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", GgufValue::U32(1)),
        ("tokenizer.ggml.eos_token_id", GgufValue::U32(2)),
        ("tokenizer.ggml.add_bos_token", GgufValue::Bool(true)),
    ];
    if let Some(t) = chat_template {
        meta.push(("tokenizer.chat_template", s(t)));
    }
    GgufFile::from_bytes(writer::write(&meta, &[])).unwrap()
}

fn byte_id(b: u8) -> u32 {
    3 + b as u32
}

#[test]
fn gguf_vocab_encodes_merges_specials_and_digits() {
    let tk = Tokenizer::from_gguf(&small_gguf(None)).unwrap();
    assert_eq!(tk.vocab_size(), 3 + 256 + 4);
    assert_eq!(tk.bos_token_id(), Some(1));
    assert_eq!(tk.eos_token_ids(), &[2]);
    let hell = tk.token_to_id("hell").unwrap();
    let sp_w = tk
        .token_to_id(&format!("{}w", bytes_to_unicode()[b' ' as usize]))
        .unwrap();
    let ids = tk.encode("hello world", false).unwrap();
    assert_eq!(ids[..3], [hell, byte_id(b'o'), sp_w]);
    assert_eq!(tk.decode(&ids, false).unwrap(), "hello world");
    // add_bos_token: BOS first only with special tokens.
    assert_eq!(tk.encode("h", true).unwrap(), vec![1, byte_id(b'h')]);
    // Control tokens are single ids, and are dropped by skip_special_tokens.
    let ids = tk.encode("<|im_start|>hell<|im_end|>", false).unwrap();
    assert_eq!(ids, vec![1, hell, 2]);
    assert_eq!(tk.decode(&ids, true).unwrap(), "hell");
    assert_eq!(
        tk.decode(&ids, false).unwrap(),
        "<|im_start|>hell<|im_end|>"
    );
    // SmolLM splits digits one by one.
    assert_eq!(
        tk.encode("123", false).unwrap(),
        vec![byte_id(b'1'), byte_id(b'2'), byte_id(b'3')]
    );
    // Multi-byte characters round-trip through byte tokens.
    let text = "héllo 世界 🎉";
    assert_eq!(
        tk.decode(&tk.encode(text, false).unwrap(), false).unwrap(),
        text
    );
    assert!(matches!(
        tk.decode(&[9999], false),
        Err(TokenizerError::UnknownId { .. })
    ));
}

#[test]
fn chat_template_from_gguf_or_chatml() {
    let tk = Tokenizer::from_gguf(&small_gguf(None)).unwrap();
    let msgs = [ChatMessage {
        role: "user".into(),
        content: "hi".into(),
    }];
    assert_eq!(
        tk.apply_chat_template(&msgs, true).unwrap(),
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    let tk = Tokenizer::from_gguf(&small_gguf(Some(
        "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}",
    )))
    .unwrap();
    assert_eq!(
        tk.apply_chat_template(&msgs, true).unwrap(),
        "<|im_start|>hi<|im_end|>"
    );
}

#[test]
fn incremental_decoder_never_splits_characters() {
    let tk = Tokenizer::from_gguf(&small_gguf(None)).unwrap();
    let text = "hello wörld 世界🎉 <|im_end|>hell";
    let ids = tk.encode(text, false).unwrap();
    let mut dec = tk.incremental_decoder();
    let mut streamed = String::new();
    let mut held = 0;
    for id in &ids {
        match dec.push(*id) {
            Some(delta) => {
                assert!(!delta.contains('\u{FFFD}'), "broken char in {delta:?}");
                streamed.push_str(&delta);
            }
            None => held += 1,
        }
    }
    streamed.extend(dec.flush());
    // Each byte token but the last of a multi-byte character (ö, 世, 界, 🎉) is held back, and the
    // special token yields nothing.
    assert_eq!(held, 1 + 2 + 2 + 3 + 1);
    assert_eq!(streamed, tk.decode(&ids, true).unwrap());
    assert_eq!(streamed, "hello wörld 世界🎉 hell");

    // A dangling partial character is released by flush as a full decode shows it.
    let mut dec = tk.incremental_decoder();
    let euro = "€".as_bytes();
    assert_eq!(dec.push(byte_id(b'a')), Some("a".to_string()));
    assert_eq!(dec.push(byte_id(euro[0])), None);
    assert_eq!(dec.push(byte_id(euro[1])), None);
    let full = tk.decode(dec.ids(), true).unwrap();
    assert!(full.ends_with('\u{FFFD}'));
    assert_eq!(format!("a{}", dec.flush().unwrap_or_default()), full);
    assert_eq!(dec.flush(), None);
}

#[test]
fn tokenizer_json_round_trip_and_missing_paths() {
    let tk = Tokenizer::from_gguf(&small_gguf(None)).unwrap();
    let dir = std::env::temp_dir().join(format!("tok-json-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("tokenizer.json");
    tk.inner.save(&json, false).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>", "chat_template": "{{ bos_token }}|{{ messages[0]['content'] }}"}"#,
    )
    .unwrap();
    let from_dir = Tokenizer::from_model_path(&dir).unwrap();
    assert_eq!(from_dir.bos_token_id(), Some(1));
    assert_eq!(from_dir.eos_token_ids(), &[2]);
    assert_eq!(
        from_dir.encode("hello <|im_end|>", false).unwrap(),
        tk.encode("hello <|im_end|>", false).unwrap()
    );
    let msgs = [ChatMessage {
        role: "user".into(),
        content: "x".into(),
    }];
    assert_eq!(
        from_dir.apply_chat_template(&msgs, false).unwrap(),
        "<|im_start|>|x"
    );
    assert!(matches!(
        Tokenizer::from_model_path(&dir.join("absent.gguf")),
        Err(TokenizerError::NotFound(_))
    ));
    std::fs::remove_dir_all(&dir).ok();
    assert!(Tokenizer::from_model_path(&dir).is_err());
}

/// The tokenizers scripts/fetch-tokenizer.sh and scripts/fetch-llama-tokenizer.sh cache, read
/// through `Tokenizer` as the engine does with `--tokenizer` (skipped when not fetched).
#[test]
fn fetched_qwen_and_llama2_tokenizers_encode_known_ids() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/tokenizers");
    let cases: [(&str, &str, Vec<u32>, usize); 2] = [
        // Llama-2: BOS, then "▁Hello", "▁world", "!" (llama-tokenizer-js's README example).
        ("llama2", "Hello world!", vec![1, 15043, 3186, 29991], 32000),
        // Qwen2.5: no BOS; " the" is one token.
        ("qwen2.5", "Hello the", vec![9707, 279], 151643),
    ];
    for (name, text, want, min_vocab) in cases {
        let dir = root.join(name);
        if !dir.join("tokenizer.json").is_file() {
            eprintln!("SKIPPED {name}: run scripts/fetch-tokenizer.sh / fetch-llama-tokenizer.sh");
            continue;
        }
        let t = Tokenizer::from_model_path(&dir).unwrap();
        assert_eq!(t.encode(text, true).unwrap(), want, "{name}");
        assert!(
            t.vocab_size() >= min_vocab,
            "{name}: vocab {}",
            t.vocab_size()
        );
        assert!(
            !t.eos_token_ids().is_empty(),
            "{name}: no EOS from tokenizer_config.json"
        );
    }
}
