#!/usr/bin/env python3
"""Write engine/tests/fixtures/smollm2_goldens.json: greedy continuations and first-step top-5
logits of SmolLM2-135M-Instruct Q4_1 from HF transformers (GGUF dequantized to f32).

Run where torch + transformers + gguf are installed:
    python3 scripts/reference/make_goldens.py DIR SmolLM2-135M-Instruct.Q4_1.gguf [OUT]
(DIR holds the GGUF file; OUT defaults to engine/tests/fixtures/smollm2_goldens.json.)
"""
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

NEW_TOKENS = 32
CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in one sentence.",
    "List three prime numbers.",
]
RAW = [
    "Once upon a time",
    "def fibonacci(n):",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "1, 2, 3, 4,",
]


def main():
    d, f = sys.argv[1], sys.argv[2]
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    out = sys.argv[3] if len(sys.argv) > 3 else os.path.join(root, "engine/tests/fixtures/smollm2_goldens.json")
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    prompts = []
    for q in CHATS:
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        prompts.append((f"chat: {q}", tok(text, add_special_tokens=False)["input_ids"]))
    for t in RAW:
        prompts.append((f"raw: {t}", tok(t, add_special_tokens=False)["input_ids"]))
    cases = []
    for name, ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            first = model(x).logits[0, -1]
            top = torch.topk(first, 5)
            gen = model.generate(x, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        cases.append({
            "name": name,
            "prompt_ids": ids,
            "greedy_ids": gen[0, len(ids):].tolist(),
            "greedy_text": tok.decode(gen[0, len(ids):]),
            "top5_first": [[int(i), float(v)] for v, i in zip(top.values, top.indices)],
        })
        print(name, "->", repr(cases[-1]["greedy_text"]))
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    meta = {"model": f, "source": "transformers (GGUF dequantized to f32), greedy", "new_tokens": NEW_TOKENS,
            "eos_suppressed_ids": eos,
            "note": "generated with min_new_tokens = new_tokens: EOS is suppressed in greedy_ids"}
    with open(out, "w") as fh:
        json.dump({"meta": meta, "cases": cases}, fh, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
