#!/usr/bin/env python3
"""Side-by-side benchmark on the GPU machine: the torch._grouped_mm composition (permute with
torch.sort, _grouped_mm for both GEMMs, silu*mul, weighted scatter-add) over the ANCHORS.md grid,
then `modmoe bench experts` in the same run with that baseline, then one PNG per model (time
against T for both, with the weight-read and compute floors).

    python3 bench/compare.py --modmoe build/apps/modmoe [--models qwen3,...] [--tokens 1,16,...]
        [--ab MODMOE_GEMM_TAIL=1,MODMOE_FUSED_PERMUTE=1]   (A/B columns: modmoe with each variable set)
"""
import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

MODELS = {  # name: (E, k, H, I), as in ANCHORS.md
    "mixtral": (8, 2, 4096, 14336),
    "qwen3": (128, 8, 2048, 768),
    "deepseek-ep8": (32, 8, 7168, 2048),
    "gpt-oss": (128, 4, 2880, 2880),
}


def torch_gm_layer(x, ids, w, w13, w2, num_experts):
    """The composition users run today with PyTorch alone. Graph-capturable (no host sync)."""
    t, k = ids.shape
    flat = ids.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(num_experts, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    token = order // k
    h = torch._grouped_mm(x[token], w13.transpose(1, 2), offs=offs)
    gate, up = h.chunk(2, dim=-1)
    a = F.silu(gate) * up
    y = torch._grouped_mm(a, w2.transpose(1, 2), offs=offs)
    y = y * w.reshape(-1)[order].unsqueeze(1).to(y.dtype)
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, token, y.float())
    return out.to(torch.bfloat16)


def routing(t, e, k, gen, device):
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]) if t else torch.zeros(0, k, dtype=torch.int64)
    w = torch.rand(t, k, generator=gen) + 0.1
    return ids.to(device), (w / w.sum(1, keepdim=True)).to(device)


def time_graph_us(fn, calls, reps=10):
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for i in range(calls):
            fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        for i in range(calls):
            fn(i)
    times = []
    for r in range(reps + 2):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        if r >= 2:
            times.append(a.elapsed_time(b) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def bench_torch(models, tokens, device):
    out = {}
    gen = torch.Generator().manual_seed(7)
    for name in models:
        e, k, h, i = MODELS[name]
        w13 = (torch.randn(e, 2 * i, h, device=device) / h**0.5).to(torch.bfloat16)
        w2 = (torch.randn(e, h, i, device=device) / i**0.5).to(torch.bfloat16)
        for t in tokens:
            rot = int(min(8, max(2, 256e6 / max(t * h * 4, 1))))
            batches = []
            for _ in range(rot):
                ids, w = routing(t, e, k, gen, device)
                x = (0.1 * torch.randn(t, h, device=device)).to(torch.bfloat16)
                batches.append((x, ids, w))
            # Correctness of the baseline itself, on one token, against a float64 evaluation.
            x, ids, w = batches[0]
            got = torch_gm_layer(x, ids, w, w13, w2, e)
            ref = torch.zeros(h, dtype=torch.float64, device=device)
            for j in range(k):
                ex = int(ids[0, j])
                hh = w13[ex].double() @ x[0].double()
                g_, u_ = hh[:i], hh[i:]
                ref += float(w[0, j]) * (w2[ex].double() @ (F.silu(g_) * u_))
            err = float((got[0].double() - ref).norm() / ref.norm())
            us = time_graph_us(lambda r: torch_gm_layer(*batches[r], w13, w2, e), rot)
            out[f"{name}/{t}/uniform"] = us
            print(f"torch_gm {name:13s} T={t:6d} {us:10.1f} us  (token-0 rel L2 {err:.1e})", flush=True)
        del w13, w2
        torch.cuda.empty_cache()
    return out


def plot(result, outdir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots drawn")
        return
    cells = [c for c in result["cells"] if c["routing"] == "uniform"]
    ceil = result["ceilings"]
    for name in sorted({c["model"] for c in cells}):
        rows = sorted((c for c in cells if c["model"] == name), key=lambda c: c["tokens"])
        t = [c["tokens"] for c in rows]
        e, k, h, i = MODELS[name]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(t, [c["us"] for c in rows], "o-", label="modmoe")
        if all("torch_grouped_mm_us" in c for c in rows):
            ax.plot(t, [c["torch_grouped_mm_us"] for c in rows], "s-", label="torch._grouped_mm")
        ax.plot(t, [c["experts_touched"] * 6 * h * i / (ceil["copy_GBps"] * 1e3) for c in rows], "--", label="weight-read floor")
        ax.plot(t, [6 * tt * k * h * i / (ceil["dense_bf16_TFLOPs"] * 1e6) for tt in t], ":", label="compute floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens T")
        ax.set_ylabel("µs (CUDA-graph replay median)")
        ax.set_title(f"{name} on {result['gpu']}")
        ax.legend()
        fig.tight_layout()
        path = os.path.join(outdir, f"experts_{name}.png")
        fig.savefig(path, dpi=110)
        print("wrote", path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--modmoe", default="build/apps/modmoe")
    ap.add_argument("--models", default="mixtral,qwen3,deepseek-ep8,gpt-oss")
    ap.add_argument("--tokens", default="1,16,128,1024,4096,16384")
    ap.add_argument("--skew", action="store_true")
    ap.add_argument("--out", default="")
    ap.add_argument("--plots", default="")
    ap.add_argument("--ab", default="", help="NAME=VALUE[,...]: modmoe times each cell again with each variable set")
    args = ap.parse_args()
    models = args.models.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]
    base = bench_torch(models, tokens, "cuda")
    base_path = os.path.join(os.path.dirname(args.out) or ".", "torch_gm_baseline.json")
    with open(base_path, "w") as f:
        json.dump(base, f, indent=1)
    cmd = [args.modmoe, "bench", "experts", "--models", args.models, "--tokens", args.tokens,
           "--torch-baseline", base_path] + (["--out", args.out] if args.out else []) + (["--skew"] if args.skew else []) \
        + (["--ab", args.ab] if args.ab else [])
    print("running", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    print(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(proc.returncode)
    written = [l.split(" ", 1)[1] for l in proc.stdout.splitlines() if l.startswith("wrote ")]
    if written:
        with open(written[-1]) as f:
            result = json.load(f)
        plot(result, args.plots or os.path.dirname(written[-1]))


if __name__ == "__main__":
    main()
