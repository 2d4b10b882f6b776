#!/usr/bin/env python3
"""Side-by-side benchmark on the GPU machine: a PyTorch composition over the ANCHORS.md grid,
then `modmoe bench experts` in the same run with that baseline, then one PNG per model (time
against T for both, with the floors).

    python3 bench/compare.py --modmoe build/apps/modmoe [--dtype bf16|fp8-block|fp8-tensor|nvfp4]
        [--models qwen3,...] [--tokens 1,16,...]
        [--ab MODMOE_GEMM_TAIL=1,MODMOE_FUSED_PERMUTE=1]   (A/B columns: modmoe with each variable set)

The baselines:
  bf16        torch._grouped_mm composition (permute with torch.sort, _grouped_mm for both
              GEMMs, silu*mul, weighted scatter-add)
  fp8-tensor  the same with torch._scaled_grouped_mm: e4m3 hidden with one fp32 scale per token
              row (the per-tensor scale broadcast, as a quantize-before-dispatch all-to-all
              delivers it), e4m3 weights with one scale per expert broadcast to its rows, the
              intermediate re-quantized per row (rowwise scales are what the op takes)
  fp8-block, nvfp4: none in PyTorch; the baseline file says so and modmoe runs alone.
If torch._scaled_grouped_mm is missing or raises, the error is recorded in the baseline file
and the modmoe numbers are still measured.

--flashinfer (bf16): FlashInfer's CuTe-DSL SM90 MoE in the same process too (bench/
flashinfer_peer.py), its default and deterministic modes; the experts JSON gets per cell
flashinfer_cute_dsl_{default,deterministic}_us and speedup_vs_flashinfer_*, or the reason it
did not run under "flashinfer_peer".
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

MODELS = {  # name: (E, k, H, I), as in ANCHORS.md
    "mixtral": (8, 2, 4096, 14336),
    "qwen3": (128, 8, 2048, 768),
    "deepseek-ep8": (32, 8, 7168, 2048),
    "gpt-oss": (128, 4, 2880, 2880),
}


E4M3 = getattr(torch, "float8_e4m3fn", None)
E4M3_MAX = 448.0


def permute(ids, num_experts):
    """Routing metadata of the compositions: slot order sorted by expert (stable), the int32
    end offset of each expert's rows, and the token of each permuted row."""
    t, k = ids.shape
    flat = ids.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(num_experts, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    return order, offs, order // k


def combine(y, w, order, token, t):
    """Weighted scatter-add of the permuted rows y [P, H] into [t, H], in fp32, cast once."""
    y = y * w.reshape(-1)[order].unsqueeze(1).to(y.dtype)
    out = torch.zeros(t, y.shape[1], dtype=torch.float32, device=y.device)
    out.index_add_(0, token, y.float())
    return out.to(torch.bfloat16)


def torch_gm_layer(x, ids, w, w13, w2, num_experts):
    """The composition users run today with PyTorch alone. Graph-capturable (no host sync)."""
    order, offs, token = permute(ids, num_experts)
    h = torch._grouped_mm(x[token], w13.transpose(1, 2), offs=offs)
    gate, up = h.chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)
    return combine(y, w, order, token, ids.shape[0])


def quantize_rows(x):
    """Dynamic e4m3 with one fp32 dequantization scale per row (x ~ q * s): [R, C] -> q, s [R]."""
    s = x.abs().amax(dim=-1).float().clamp(min=1e-10) / E4M3_MAX
    q = (x.float() / s.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, s


def torch_scaled_gm_layer(xq, x_scale, ids, w, w13q, w13s, w2q, w2s, num_experts):
    """The FP8 composition with PyTorch alone. xq [T, H] e4m3 with x_scale [T] fp32 (one per
    token row); w13q [E, 2I, H], w2q [E, H, I] e4m3 (K-major, so their transposes are the
    column-major B the op wants) with w13s [E, 2I], w2s [E, H] fp32 (one per output column).
    Graph-capturable (no host sync)."""
    order, offs, token = permute(ids, num_experts)
    rows = xq.view(torch.uint8)[token].view(E4M3)  # gathered as bytes: any indexing kernel works
    h = torch._scaled_grouped_mm(rows, w13q.transpose(1, 2), x_scale[token], w13s,
                                 offs=offs, out_dtype=torch.bfloat16)
    gate, up = h.chunk(2, dim=-1)
    aq, a_scale = quantize_rows(F.silu(gate) * up)
    y = torch._scaled_grouped_mm(aq, w2q.transpose(1, 2), a_scale, w2s, offs=offs,
                                 out_dtype=torch.bfloat16)
    return combine(y, w, order, token, ids.shape[0])


class Bf16Layer:
    """torch._grouped_mm on bf16 weights. A batch is (x, ids, w)."""

    def __init__(self, w13, w2, num_experts):
        self.w13, self.w2, self.e = w13, w2, num_experts

    def batch(self, x, ids, w):
        return x, ids, w

    def __call__(self, b):
        return torch_gm_layer(*b, self.w13, self.w2, self.e)

    def expert_f64(self, ex):
        return self.w13[ex].double(), self.w2[ex].double()

    def hidden_f64(self, b, row):
        return b[0][row].double()


class Fp8TensorLayer:
    """torch._scaled_grouped_mm on e4m3 weights with one scale per expert. A batch is
    (xq, x_scale, ids, w): hidden quantized outside the timed region with one dynamic scale
    for the tensor, repeated per token row."""

    def __init__(self, w13, w2, num_experts):
        self.e = num_experts
        self.w13q, s13 = self.per_expert(w13)
        self.w2q, s2 = self.per_expert(w2)
        self.w13s = s13[:, None].expand(-1, w13.shape[1]).contiguous()  # [E, 2I]
        self.w2s = s2[:, None].expand(-1, w2.shape[1]).contiguous()     # [E, H]

    @staticmethod
    def per_expert(w):
        q, s = quantize_rows(w.reshape(w.shape[0], -1))
        return q.reshape(w.shape), s

    def batch(self, x, ids, w):
        q, s = quantize_rows(x.reshape(1, -1))
        return q.reshape(x.shape), s.expand(x.shape[0]).contiguous(), ids, w

    def __call__(self, b):
        return torch_scaled_gm_layer(*b, self.w13q, self.w13s, self.w2q, self.w2s, self.e)

    def expert_f64(self, ex):
        return (self.w13q[ex].double() * self.w13s[ex, :, None].double(),
                self.w2q[ex].double() * self.w2s[ex, :, None].double())

    def hidden_f64(self, b, row):
        return b[0][row].double() * float(b[1][row])


LAYERS = {"bf16": Bf16Layer, "fp8-tensor": Fp8TensorLayer}
NO_BASELINE = {
    "fp8-block": "torch baseline: none for 128x128 blocks (torch._scaled_grouped_mm takes "
                 "rowwise fp32 scales or MX block scales, not DeepSeek's 128x128 weight blocks)",
    "nvfp4": "torch baseline: none for W4A16 (PyTorch has no grouped GEMM of NVFP4 weights "
             "with bf16 activations)",
}


def routing(t, e, k, gen, device, zipf=False):
    """k distinct experts per token: uniform, or Zipf-like (p ~ 1/rank over a shuffled expert
    order), the distribution of `modmoe bench experts --skew` (apps/modmoe/bench_cell.cpp)."""
    if zipf and t:
        order = torch.randperm(e, generator=gen)
        p = 1.0 / torch.arange(1, e + 1, dtype=torch.float64)
        ids = order[torch.multinomial(p.expand(t, e), k, replacement=False, generator=gen)]
    elif t:
        ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    else:
        ids = torch.zeros(0, k, dtype=torch.int64)
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


def grid_cells(tokens, skew):
    """(T, zipf) cells: the --tokens grid, then with --skew the cells `modmoe bench experts
    --skew` adds (zipf at 1024 and 4096, uniform at the odd counts 77 and 3000)."""
    cells = [(t, False) for t in tokens]
    if skew:
        cells += [(1024, True), (4096, True), (77, False), (3000, False)]
    return cells


class ClockLog:
    """Samples the GPU's SM / memory clocks, power and throttle reasons with nvidia-smi every
    100 ms while the block runs. summary() gives their median, min and max over the run;
    window(t0, t1) the same over the samples of a wall-clock window that drew at least 60 % of
    the window's peak power (the timed part of a cell, not its set-up). Records the reason
    instead where nvidia-smi is missing."""

    FIELDS = "timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active"

    def __init__(self, name):
        self.name, self.proc, self.path = name, None, f"/tmp/modmoe_clocks_{name}_{os.getpid()}.csv"

    def __enter__(self):
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
        try:
            self.log = open(self.path, "w")
            self.proc = subprocess.Popen(["nvidia-smi", f"--query-gpu={self.FIELDS}",
                                          "--format=csv,noheader,nounits", "-lms", "100", "-i", gpu],
                                         stdout=self.log, stderr=subprocess.DEVNULL)
        except OSError as ex:
            self.error = f"{type(ex).__name__}: {ex}"
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
            self.log.close()
        return False

    def rows(self):
        """[(unix time, sm MHz, mem MHz, power W, temp C, reasons)], parsed once after the run."""
        if getattr(self, "_rows", None) is not None:
            return self._rows
        out = []
        if self.proc is None:
            return out
        with open(self.path) as f:
            for line in f:
                parts = [x.strip() for x in line.split(",")]
                try:
                    t = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
                    out.append((t, float(parts[1]), float(parts[2]), float(parts[3]), float(parts[4]), parts[5]))
                except (ValueError, IndexError):
                    continue
        if self.proc.poll() is not None:  # the sampler has stopped: the file is final
            self._rows = out
        return out

    @staticmethod
    def stats(rows):
        out = {"samples": len(rows), "interval_ms": 100}
        for j, key in enumerate(["sm_MHz", "mem_MHz", "power_W", "temp_C"], start=1):
            v = sorted(r[j] for r in rows)
            out[key] = {"median": v[len(v) // 2], "min": v[0], "max": v[-1]}
        reasons = {}
        for r in rows:
            reasons[r[5]] = reasons.get(r[5], 0) + 1
        out["throttle_reasons_bitmask_counts"] = reasons
        return out

    def summary(self):
        if self.proc is None:
            return {"error": getattr(self, "error", "not sampled")}
        rows = self.rows()
        return self.stats(rows) if rows else {"error": "no samples"}

    def window(self, t0, t1):
        rows = [r for r in self.rows() if t0 <= r[0] <= t1]
        if not rows:
            return None
        peak = max(r[3] for r in rows)
        return self.stats([r for r in rows if r[3] >= 0.6 * peak])


def run_timestamped(cmd):
    """Runs cmd, echoing its output; returns (returncode, output, [(unix time, line)])."""
    lines = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        lines.append((time.time(), line.rstrip("\n")))
        print(line, end="", flush=True)
    proc.wait()
    return proc.returncode, "\n".join(l for _, l in lines), lines


def clocks_per_cell(result, log, lines, t_start):
    """Per cell of result: the clock, power and throttle reasons under load between the bench's
    previous output line and the cell's own (its set-up, check and timed replays); the ceiling
    measurement's window (start to the 'measured now' line) under result["ceilings_clocks"]."""
    cell_re = re.compile(r"^(\S+)\s+(uniform|zipf)\s+(\d+)\s")
    prev = t_start
    windows = {}
    for t, line in lines:
        m = cell_re.match(line)
        if "measured now" in line:
            result["ceilings_clocks"] = log.window(t_start, t)
        if m:
            windows[f"{m.group(1)}/{m.group(2)}/{m.group(3)}"] = (prev, t)
        prev = t
    for c in result.get("cells", []):
        w = windows.get(f'{c["model"]}/{c["routing"]}/{c["tokens"]}')
        st = log.window(*w) if w else None
        if st:
            c["sm_MHz_under_load"] = st["sm_MHz"]["median"]
            c["power_W_under_load"] = st["power_W"]["median"]
            c["throttle_reasons_under_load"] = st["throttle_reasons_bitmask_counts"]


def bench_torch(models, tokens, device, dtype="bf16", skew=False):
    """{"<model>/<T>/<uniform|zipf>": us} of the dtype's composition (bf16: exactly that; others:
    plus "dtype", "op", and per-cell "token0_rel_l2"; "error" / "errors" where it failed)."""
    out = {}
    quantized = dtype != "bf16"
    if quantized:
        out["dtype"] = dtype
        if dtype in NO_BASELINE:
            out["note"] = NO_BASELINE[dtype]
            print(out["note"], flush=True)
            return out
        out["op"] = (f"torch._scaled_grouped_mm (torch {torch.__version__}): rowwise scales, hidden "
                     "per tensor repeated per row, weights per expert repeated per row, "
                     "intermediate re-quantized per row")
        if not hasattr(torch, "_scaled_grouped_mm") or E4M3 is None:
            out["error"] = f"torch {torch.__version__} has no torch._scaled_grouped_mm or float8_e4m3fn"
            print("torch baseline:", out["error"], flush=True)
            return out
        out["token0_rel_l2"], out["errors"] = {}, {}
    gen = torch.Generator().manual_seed(7)
    for name in models:
        e, k, h, i = MODELS[name]
        w13 = (torch.randn(e, 2 * i, h, device=device) / h**0.5).to(torch.bfloat16)
        w2 = (torch.randn(e, h, i, device=device) / i**0.5).to(torch.bfloat16)
        layer = LAYERS[dtype](w13, w2, e)
        for t, zipf in grid_cells(tokens, skew):
            key = f"{name}/{t}/{'zipf' if zipf else 'uniform'}"
            rot = int(min(8, max(2, 256e6 / max(t * h * 4, 1))))
            batches = []
            for _ in range(rot):
                ids, w = routing(t, e, k, gen, device, zipf)
                x = (0.1 * torch.randn(t, h, device=device)).to(torch.bfloat16)
                batches.append(layer.batch(x, ids, w))
            try:
                # Correctness of the baseline itself, on one token, against a float64 evaluation
                # over the values it computes with (dequantized for FP8).
                b = batches[0]
                ids, w = b[-2], b[-1]
                got = layer(b)
                ref = torch.zeros(h, dtype=torch.float64, device=device)
                for j in range(k):
                    w13e, w2e = layer.expert_f64(int(ids[0, j]))
                    hh = w13e @ layer.hidden_f64(b, 0)
                    g_, u_ = hh[:i], hh[i:]
                    ref += float(w[0, j]) * (w2e @ (F.silu(g_) * u_))
                err = float((got[0].double() - ref).norm() / ref.norm())
                us = time_graph_us(lambda r: layer(batches[r]), rot)
            except Exception as ex:  # noqa: BLE001 -- a failing baseline must not stop modmoe
                if not quantized:
                    raise
                msg = f"{type(ex).__name__}: {str(ex).splitlines()[0] if str(ex) else ''}"
                out["errors"][key] = msg
                out.setdefault("error", f"{key}: {msg}")
                print(f"torch baseline {key} failed: {msg}", flush=True)
                continue
            out[key] = us
            if quantized:
                out["token0_rel_l2"][key] = err
            print(f"torch_gm {name:13s} T={t:6d} {'zipf' if zipf else '':4s} {us:10.1f} us  (token-0 rel L2 {err:.1e})", flush=True)
        del w13, w2, layer
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
    dtype = result.get("dtype", "bf16")
    bf16 = dtype == "bf16"
    torch_key, torch_label = (("torch_grouped_mm_us", "torch._grouped_mm") if bf16
                              else ("torch_scaled_grouped_mm_us", "torch._scaled_grouped_mm"))
    cells = [c for c in result["cells"] if c["routing"] == "uniform"]
    ceil = result["ceilings"]
    for name in sorted({c["model"] for c in cells}):
        rows = sorted((c for c in cells if c["model"] == name), key=lambda c: c["tokens"])
        t = [c["tokens"] for c in rows]
        e, k, h, i = MODELS[name]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(t, [c["us"] for c in rows], "o-", label="modmoe" if bf16 else f"modmoe {dtype}")
        if not bf16:
            ax.plot(t, [c["bf16_us"] for c in rows], "^-", label="modmoe bf16")
        if all(torch_key in c for c in rows):
            ax.plot(t, [c[torch_key] for c in rows], "s-", label=torch_label)
        if bf16:
            ax.plot(t, [c["experts_touched"] * 6 * h * i / (ceil["copy_GBps"] * 1e3) for c in rows], "--", label="weight-read floor")
            ax.plot(t, [6 * tt * k * h * i / (ceil["dense_bf16_TFLOPs"] * 1e6) for tt in t], ":", label="compute floor")
        else:
            ax.plot(t, [c["floor_us"] for c in rows], "--", label=f"{dtype} floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens T")
        ax.set_ylabel("µs (CUDA-graph replay median)")
        ax.set_title(f"{name} on {result['gpu']}" + ("" if bf16 else f", {dtype}"))
        ax.legend()
        fig.tight_layout()
        path = os.path.join(outdir, f"experts_{name}.png" if bf16 else f"experts_{dtype}_{name}.png")
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
    ap.add_argument("--flashinfer", action="store_true",
                    help="bf16: time FlashInfer's cute_dsl_fused_moe_bf16 in the same run")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp8-block", "fp8-tensor", "nvfp4"],
                    help="modmoe bench experts --dtype; the baseline follows it (module docstring)")
    ap.add_argument("--fp8-fast-accum", action="store_true",
                    help="fp8-tensor: modmoe runs with FP8 fast accumulation (docs/fp8.md); the "
                         "torch baseline is the same fp8-tensor one")
    args = ap.parse_args()
    if args.fp8_fast_accum and args.dtype != "fp8-tensor":
        sys.exit("--fp8-fast-accum needs --dtype fp8-tensor")
    models = args.models.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]
    clocks = {"torch": ClockLog("torch"), "modmoe": ClockLog("modmoe")}
    if args.dtype == "bf16":
        with clocks["torch"]:
            base = bench_torch(models, tokens, "cuda", skew=args.skew)
        base_name = "torch_gm_baseline.json"
    else:
        try:
            with clocks["torch"]:
                base = bench_torch(models, tokens, "cuda", args.dtype, args.skew)
        except Exception as ex:  # noqa: BLE001 -- the modmoe numbers are measured regardless
            base = {"dtype": args.dtype, "error": f"{type(ex).__name__}: {ex}"}
            print("torch baseline failed:", base["error"], flush=True)
        base_name = f"torch_baseline_{args.dtype}.json"
    peer = None
    if args.flashinfer:
        if args.dtype != "bf16":
            sys.exit("--flashinfer compares the bf16 stage only")
        from flashinfer_peer import bench_flashinfer
        peer = bench_flashinfer(models, tokens, "cuda", MODELS, routing, time_graph_us)
        with open(os.path.join(os.path.dirname(args.out) or ".", "flashinfer_baseline.json"), "w") as f:
            json.dump(peer, f, indent=1)
    base_path = os.path.join(os.path.dirname(args.out) or ".", base_name)
    with open(base_path, "w") as f:
        json.dump(base, f, indent=1)
    cmd = [args.modmoe, "bench", "experts", "--models", args.models, "--tokens", args.tokens,
           "--torch-baseline", base_path] + (["--out", args.out] if args.out else []) + (["--skew"] if args.skew else []) \
        + (["--ab", args.ab] if args.ab else []) + (["--dtype", args.dtype] if args.dtype != "bf16" else []) \
        + (["--fp8-fast-accum"] if args.fp8_fast_accum else [])
    print("running", " ".join(cmd), flush=True)
    t_start = time.time()
    with clocks["modmoe"]:
        returncode, output, lines = run_timestamped(cmd)
    if returncode != 0:
        sys.exit(returncode)
    written = [l.split(" ", 1)[1] for l in output.splitlines() if l.startswith("wrote ")]
    if written:
        with open(written[-1]) as f:
            result = json.load(f)
        result["clocks_during_runs"] = {k: c.summary() for k, c in clocks.items()}
        clocks_per_cell(result, clocks["modmoe"], lines, t_start)
        print("clocks under load (SM MHz, W) per cell; the ceilings:", json.dumps(result.get("ceilings_clocks")))
        for c in result.get("cells", []):
            if "sm_MHz_under_load" in c:
                print(f'  {c["model"]:13s} {c["routing"]:7s} {c["tokens"]:6d} {c["sm_MHz_under_load"]:7.0f} MHz '
                      f'{c["power_W_under_load"]:6.0f} W  {c["throttle_reasons_under_load"]}')
        for k, c in result["clocks_during_runs"].items():
            print(f"clocks during the {k} run:", json.dumps(c))
        if peer is not None:
            from flashinfer_peer import merge
            for line in merge(result, peer):
                print(line)
        with open(written[-1], "w") as f:
            json.dump(result, f, indent=1)
        plot(result, args.plots or os.path.dirname(written[-1]))


if __name__ == "__main__":
    main()
