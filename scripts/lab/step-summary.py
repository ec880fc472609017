#!/usr/bin/env python3
"""Summarises the engine's per-step debug lines (RUST_LOG=engine::core=debug) of a serve log.

Usage: step-summary.py SERVE_LOG [PROMPT_TOKENS]

Prints where the steps' time went until the prompts were prefilled (all of them, or the first
PROMPT_TOKENS prefill tokens): steps with prefill vs decode-only steps, prefill tokens per second
of execute time, and host time (schedule + emit) between forwards.
"""
import re
import sys
from datetime import datetime

STEP = re.compile(
    r"^(?P<ts>\S+Z).*step: (?P<seqs>\d+) seqs, (?P<tokens>\d+) tokens \((?P<prefill>\d+) prefill, "
    r"(?P<decode>\d+) decode rows\), swap out/in (?P<out>\d+)/(?P<inn>\d+) blocks, (?P<pre>\d+) "
    r"preempted; schedule (?P<sched>[\d.]+) ms, execute (?P<exec>[\d.]+) ms, emit (?P<emit>[\d.]+) ms; "
    r"running (?P<running>\d+), waiting (?P<waiting>\d+)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    path = sys.argv[1]
    steps = []
    for line in open(path, errors="replace"):
        m = STEP.search(ANSI.sub("", line))
        if not m:
            continue
        d = m.groupdict()
        ts = d.pop("ts")
        t = datetime.strptime(ts[:26], "%Y-%m-%dT%H:%M:%S.%f")
        steps.append((t, {k: float(v) for k, v in d.items()}))
    if not steps:
        sys.exit(f"{path}: no step lines (was the engine run with RUST_LOG=engine::core=debug?)")
    total_prefill = sum(s["prefill"] for _, s in steps)
    target = float(sys.argv[2]) if len(sys.argv) > 2 else total_prefill
    first = steps[0][1]
    first_ms = first["sched"] + first["exec"] + first["emit"]
    t0 = steps[0][0]
    acc = {"prefill_steps": 0, "decode_steps": 0, "prefill_exec": 0.0, "decode_exec": 0.0,
           "host": 0.0, "tokens": 0.0, "decode_rows": 0.0}
    big = []
    end = None
    for t, s in steps:
        if acc["tokens"] >= target:
            break
        kind = "prefill" if s["prefill"] > 0 else "decode"
        acc[kind + "_steps"] += 1
        acc[kind + "_exec"] += s["exec"]
        acc["host"] += s["sched"] + s["emit"]
        acc["tokens"] += s["prefill"]
        acc["decode_rows"] += s["decode"]
        if s["prefill"] >= 1900:
            big.append(s["exec"] / s["prefill"])
        end = t
    span = (end - t0).total_seconds() + first_ms / 1e3 if end else 0.0
    print(f"{path}: {len(steps)} steps in all; until {acc['tokens']:.0f} prefill tokens "
          f"{span:.2f} s from the first step's start:")
    print(f"  steps with prefill: {acc['prefill_steps']}, execute {acc['prefill_exec'] / 1e3:.2f} s, "
          f"{acc['tokens'] / max(acc['prefill_exec'], 1e-9) * 1e3:.0f} prefill tokens/s; "
          f"decode rows riding along: {acc['decode_rows']:.0f}")
    print(f"  decode-only steps: {acc['decode_steps']}, execute {acc['decode_exec'] / 1e3:.2f} s")
    print(f"  host (schedule + emit): {acc['host'] / 1e3:.3f} s")
    if big:
        big.sort()
        print(f"  steps with >= 1900 prefill tokens: {len(big)}, median {big[len(big) // 2] * 1e3:.1f} "
              f"us per prefill token")


if __name__ == "__main__":
    main()
