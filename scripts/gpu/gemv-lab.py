"""Kernel lab for the batch-1 projections at the Qwen2.5-1.5B shape (GPU machine, CuPy).

Times the engine's one-row GEMV kernels (engine/kernels/gemv.cu through scripts/gpu/gemv-lab.cu)
at several grids beside streaming reads of the same bytes, each launch in a CUDA graph of one
launch per layer over 28 distinct weight sets (from HBM) or over one set (from L2 where it fits),
and prints microseconds per launch (median of the graph replays). With --ncu it only launches the
chosen kernels a few times eagerly, for Nsight Compute.

usage: python3 scripts/gpu/gemv-lab.py CUBIN [--ncu] [--reps N] [--only SUBSTR]
"""
import argparse
import statistics
import sys

import cupy as cp
import numpy as np

LAYERS = 28
SMS = None
HIDDEN, INTER, QKV = 1536, 8960, 2048
# CTA-per-rows variants of the down projection in gemv-lab.cu: (rows per CTA, chunks per thread
# and row in flight, CTAs per SM).
DOWN_VARIANTS = ((1, 9, 8), (1, 9, 6), (1, 5, 8), (4, 3, 4), (4, 3, 6), (4, 2, 8), (8, 2, 4),
                 (4, 4, 4), (2, 5, 6), (8, 3, 2))


def bf16_random(n, rng):
    f = rng.standard_normal(n, dtype=cp.float32) * 0.02
    return (f.view(cp.uint32) >> 16).astype(cp.uint16)


def bf16_to_f32(a):
    return (a.astype(cp.uint32) << 16).view(cp.float32)


class Shape:
    def __init__(self, name, n, k, rng, sets):
        self.name, self.n, self.k = name, n, k
        self.w = [bf16_random(n * k, rng) for _ in range(sets)]
        self.x = bf16_random(k, rng)
        self.bytes = n * k * 2


def time_graph(launch_fns, reps):
    """Median us per launch of a graph holding launch_fns in order."""
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        for f in launch_fns:  # warm (module load)
            f()
        s.synchronize()
        s.begin_capture()
        for f in launch_fns:
            f()
        g = s.end_capture()
    for _ in range(3):
        g.launch(s)
    s.synchronize()
    e0, e1 = cp.cuda.Event(), cp.cuda.Event()
    ts = []
    for _ in range(reps):
        e0.record(s)
        g.launch(s)
        e1.record(s)
        e1.synchronize()
        ts.append(cp.cuda.get_elapsed_time(e0, e1) * 1000.0 / len(launch_fns))
    return statistics.median(ts), min(ts)


def main():
    global SMS
    ap = argparse.ArgumentParser()
    ap.add_argument("cubin")
    ap.add_argument("--ncu", action="store_true")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--only", default="")
    a = ap.parse_args()
    dev = cp.cuda.Device()
    SMS = dev.attributes["MultiProcessorCount"]
    print(f"# {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, {SMS} SMs", flush=True)
    mod = cp.RawModule(path=a.cubin)
    fn = {}

    def k(name):
        if name not in fn:
            fn[name] = mod.get_function(name)
        return fn[name]

    rng = cp.random.default_rng(7)
    sets = 2 if a.ncu else LAYERS
    shapes = {
        "gate_up": Shape("gate_up", 2 * INTER, HIDDEN, rng, sets),
        "down": Shape("down", HIDDEN, INTER, rng, sets),
        "qkv": Shape("qkv", QKV, HIDDEN, rng, sets),
        "o": Shape("o", HIDDEN, HIDDEN, rng, sets),
    }
    sink = cp.zeros(1 << 22, dtype=cp.uint32)
    y = cp.zeros(INTER * 2, dtype=cp.uint16)

    # The engine's grid plan for the warp-per-row kernels (gemv::even_rounds_ctas), for the
    # "served" rows.
    def even_rounds(groups, resident, warps=4):
        rounds = max(1, -(-groups // resident))
        return -(-(-(-groups // rounds)) // warps)

    # (label, shape, launch(w) -> None) for every item.
    items = []

    def gemv(label, sh, name, grid, n):
        items.append((label, sh, lambda w, g=grid, nm=name, n=n, sh=sh: k(nm)(
            (g,), (128,), (sh.x, w, y, np.int32(n), np.int32(sh.k)))))

    def read_gs(label, sh, u, th, grid):
        chunks = sh.bytes // 16
        items.append((label, sh, lambda w, nm=f"read_gs_u{u}_t{th}", g=grid, th=th: k(nm)(
            (g,), (th,), (w, np.int64(chunks), sink))))

    def read_pc(label, sh, u, th, grid):
        chunks = sh.bytes // 16
        per = -(-chunks // grid)
        items.append((label, sh, lambda w, nm=f"read_pc_u{u}_t{th}", g=grid, th=th, per=per: k(nm)(
            (g,), (th,), (w, np.int64(chunks), np.int64(per), sink))))

    gu, dn, qkv, o = shapes["gate_up"], shapes["down"], shapes["qkv"], shapes["o"]
    for name, sh in (("gate_up", gu), ("down", dn), ("qkv", qkv), ("o", o)):
        for u, th, minb in ((4, 256, 4), (8, 256, 4), (16, 256, 2), (8, 512, 2), (4, 1024, 1)):
            for waves in (1, 2):
                g = SMS * minb * waves
                read_gs(f"{name} read grid-stride u{u} t{th} grid {g}", sh, u, th, g)
        for u, th, grids in ((8, 128, (SMS * 8, SMS * 16)), (9, 128, (SMS * 4, SMS * 8)),
                             (16, 256, (SMS * 2, SMS * 4))):
            for g in grids:
                read_pc(f"{name} read pieces u{u} t{th} grid {g}", sh, u, th, g)
    # gate/up + SiLU: the served plan (w2u6, 6 CTAs/SM) and other grids.
    for var, per_sm in (("w2u6", 6), ("w2u4", 8)):
        plan = even_rounds(INTER, SMS * per_sm * 4)
        for g in sorted({plan, INTER // 4, even_rounds(INTER, SMS * per_sm * 4 // 2),
                         even_rounds(INTER, SMS * per_sm * 4 // 4), SMS * per_sm // 2}):
            tag = " (served)" if (g == plan and var == "w2u6") else ""
            gemv(f"gate_up gemv {var}_silu grid {g}{tag}", gu, f"gemv_bf16_m1_{var}_silu", g, INTER)
    # down: the served m1_v9 (2 rows per CTA) and CTA-per-rows variants.
    gemv("down gemv m1_v9 grid 768 (served)", dn, "gemv_bf16_m1_v9", HIDDEN // 2, HIDDEN)
    gemv("down gemv m1_v grid 768", dn, "gemv_bf16_m1_v", HIDDEN // 2, HIDDEN)
    for r, u, b in DOWN_VARIANTS:
        gemv(f"down lab r{r} u{u} {b}/SM grid {HIDDEN // r}", dn,
             f"lab_gemv_bf16_m1_r{r}_u{u}_b{b}", HIDDEN // r, HIDDEN)
    # q/k/v (plain, no rotary) and o: the served warp-per-row plan.
    for sh, n in ((qkv, QKV), (o, HIDDEN)):
        resident = SMS * 8 * 4
        var, wr = ("w2u4", 2) if -(-n // 2) >= resident // 2 else ("w1u8", 1)
        g = even_rounds(-(-n // wr), resident)
        gemv(f"{sh.name} gemv {var} grid {g} (served)", sh, f"gemv_bf16_m1_{var}", g, n)
        gemv(f"{sh.name} gemv m1_v grid {n // 2}", sh, "gemv_bf16_m1_v", n // 2, n)

    if a.only:
        items = [it for it in items if a.only in it[0]]

    # Same bits: the lab variants of the down projection against the served kernel.
    if not a.ncu:
        ref = cp.zeros(HIDDEN, dtype=cp.uint16)
        k("gemv_bf16_m1_v9")((HIDDEN // 2,), (128,), (dn.x, dn.w[0], ref, np.int32(HIDDEN),
                                                     np.int32(INTER)))
        want = (bf16_to_f32(dn.w[0]).reshape(HIDDEN, INTER).astype(cp.float64)
                @ bf16_to_f32(dn.x).astype(cp.float64))
        got = bf16_to_f32(ref).astype(cp.float64)
        rel = float(cp.linalg.norm(got - want) / cp.linalg.norm(want))
        print(f"# down m1_v9 against f64: rel err {rel:.2e}")
        for r, u, b in DOWN_VARIANTS:
            y[:] = 0xFFFF
            k(f"lab_gemv_bf16_m1_r{r}_u{u}_b{b}")((HIDDEN // r,), (128,), (
                dn.x, dn.w[0], y, np.int32(HIDDEN), np.int32(INTER)))
            same = bool(cp.all(y[:HIDDEN] == ref))
            print(f"# lab r{r} u{u} b{b}: same bits as m1_v9: {same}")
        cp.cuda.runtime.deviceSynchronize()

    if a.ncu:
        for label, sh, f in items:
            for i in range(3):
                f(sh.w[i % len(sh.w)])
        cp.cuda.runtime.deviceSynchronize()
        return

    print(f"| item | MB | HBM us | HBM TB/s | L2 us | L2 TB/s |")
    print(f"|---|---:|---:|---:|---:|---:|")
    for label, sh, f in items:
        hbm, _ = time_graph([lambda w=w: f(w) for w in sh.w], a.reps)
        l2 = None
        if sh.bytes < 40e6:
            l2, _ = time_graph([lambda: f(sh.w[0])] * LAYERS, a.reps)
        mb = sh.bytes / 1e6
        l2s = f"{l2:.2f} | {sh.bytes / l2 / 1e6:.2f}" if l2 else "- | -"
        print(f"| {label} | {mb:.1f} | {hbm:.2f} | {sh.bytes / hbm / 1e6:.2f} | {l2s} |",
              flush=True)
    # The cost of a graph node: an empty-ish launch.
    nop = lambda: k("read_gs_u4_t256")((1,), (32,), (gu.w[0], np.int64(1), sink))
    t, _ = time_graph([nop] * LAYERS, a.reps)
    print(f"| one-CTA launch (graph node floor) | 0 | {t:.2f} | | | |")


if __name__ == "__main__":
    sys.exit(main())
