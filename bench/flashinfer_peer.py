"""The strongest public Hopper peer of the bf16 experts stage (ANCHORS.md, "State of the art"):
FlashInfer's CuTe-DSL SM90 BF16 MoE, `flashinfer.cute_dsl_fused_moe_bf16` (flashinfer-python
0.7.2.post1), timed over the ANCHORS.md grid in the same process as the torch composition, in
its default mode (fused finalize: atomic, not bitwise-reproducible) and its deterministic one
(use_fused_finalize=False). bench/compare.py --flashinfer calls it; the wheels reach the GPU
machine through bench/flashinfer_wheels.sh.

It runs the whole layer from pre-routed (topk_ids, topk_weights), as `modmoe bench experts`
times modmoe's (permute, GEMM1 + SwiGLU, GEMM2, finalize). Weights: [E, 2I, H] gate rows then
up rows, repacked once by FlashInfer's own `interleave_up_gate_sm90` (not timed).
"""
import torch
import torch.nn.functional as F


def _import():
    """(cute_dsl_fused_moe_bf16, autotune, interleave_up_gate_sm90, version), or raises."""
    import os
    import site
    import sys
    # nvidia-cutlass-dsl puts its `cutlass` package on sys.path with a .pth file, which Python
    # only reads in site directories, not in PYTHONPATH folders such as the --target install
    # of bench/flashinfer_wheels.sh: read it there too, or FlashInfer finds no CuTe DSL.
    for path in list(sys.path):
        if os.path.isfile(os.path.join(path, "nvidia_cutlass_dsl_packages.pth")):
            site.addsitedir(path)
    import flashinfer
    from flashinfer import autotune
    # From its own module: flashinfer/__init__.py imports the CuTe-DSL MoE family inside
    # contextlib.suppress(ImportError), so the top-level name is simply missing when any of
    # them fails to import (0.7.2.post1 on the H200 machine); this import raises the cause.
    from flashinfer.fused_moe.cute_dsl.sm90_fused_moe import cute_dsl_fused_moe_bf16
    from flashinfer.fused_moe.cute_dsl.sm90_contiguous_gather_grouped_gemm_act_fusion import (
        interleave_up_gate_sm90,
    )
    return cute_dsl_fused_moe_bf16, autotune, interleave_up_gate_sm90, flashinfer.__version__


def bench_flashinfer(models, tokens, device, model_shapes, routing, time_graph_us):
    """{"version": ..., "<model>/<T>/uniform": {"default_us", "deterministic_us",
    "default_token0_rel_l2", "deterministic_token0_rel_l2"}} ("error" per cell or for the whole
    run where FlashInfer is missing or fails; the modmoe numbers are measured regardless)."""
    out = {"op": "flashinfer.cute_dsl_fused_moe_bf16, autotuned per cell, default and "
                 "use_fused_finalize=False (deterministic)"}
    try:
        fused_moe, autotune, interleave, version = _import()
    except Exception as ex:  # noqa: BLE001 -- a missing peer must not stop modmoe
        import traceback
        out["error"] = f"FlashInfer CuTe-DSL SM90 MoE not importable: {type(ex).__name__}: {ex}"
        out["traceback"] = traceback.format_exc()
        print(out["traceback"], flush=True)
        print("flashinfer peer:", out["error"], flush=True)
        return out
    out["version"] = version
    gen = torch.Generator().manual_seed(11)
    for name in models:
        e, k, h, i = model_shapes[name]
        w13 = (torch.randn(e, 2 * i, h, device=device) / h**0.5).to(torch.bfloat16)
        w2 = (torch.randn(e, h, i, device=device) / i**0.5).to(torch.bfloat16)
        w1 = interleave(w13)
        for t in tokens:
            key = f"{name}/{t}/uniform"
            rot = int(min(8, max(2, 256e6 / max(t * h * 4, 1))))
            batches = []
            for _ in range(rot):
                ids, w = routing(t, e, k, gen, device)
                x = (0.1 * torch.randn(t, h, device=device)).to(torch.bfloat16)
                batches.append((x, ids.to(torch.int32), w.float()))
            cell = {}
            try:
                for mode, fused in (("default", True), ("deterministic", False)):
                    def call(b, fused=fused):
                        return fused_moe(b[0], b[1], b[2], w1, w2, e, k, use_fused_finalize=fused)
                    with autotune(True):
                        call(batches[0])
                    torch.cuda.synchronize()
                    got = call(batches[0])[0].double()
                    x0, ids0, w0 = batches[0][0][0].double(), batches[0][1][0], batches[0][2][0]
                    ref = torch.zeros(h, dtype=torch.float64, device=device)
                    for j in range(k):
                        hh = w13[int(ids0[j])].double() @ x0
                        ref += float(w0[j]) * (w2[int(ids0[j])].double() @ (F.silu(hh[:i]) * hh[i:]))
                    cell[f"{mode}_token0_rel_l2"] = float((got - ref).norm() / ref.norm())
                    cell[f"{mode}_us"] = time_graph_us(lambda r: call(batches[r]), rot)
            except Exception as ex:  # noqa: BLE001 -- record, go on with the next cell
                cell["error"] = f"{type(ex).__name__}: {str(ex).splitlines()[0] if str(ex) else ''}"
                print(f"flashinfer peer {key} failed: {cell['error']}", flush=True)
            out[key] = cell
            if "default_us" in cell:
                print(f"flashinfer {name:13s} T={t:6d} {cell['default_us']:10.1f} us, deterministic "
                      f"{cell.get('deterministic_us', float('nan')):10.1f} us", flush=True)
        del w13, w2, w1
        torch.cuda.empty_cache()
    return out


def merge(result, peer):
    """Adds the peer's times and modmoe's speedups to the experts JSON `result` (uniform cells
    of the same model and T), and its summary; returns the printed table's lines."""
    import math
    result["flashinfer_peer"] = {k: v for k, v in peer.items() if "/" not in k}
    lines, ratios = [], {"default": [], "deterministic": []}
    for c in result["cells"]:
        cell = peer.get(f"{c['model']}/{c['tokens']}/{c['routing']}")
        if not cell:
            continue
        if "error" in cell:
            c["flashinfer_error"] = cell["error"]
        for mode in ("default", "deterministic"):
            us = cell.get(f"{mode}_us")
            if us is None:
                continue
            c[f"flashinfer_cute_dsl_{mode}_us"] = us
            c[f"speedup_vs_flashinfer_{mode}"] = us / c["us"]
            ratios[mode].append(us / c["us"])
        if "default_us" in cell or "deterministic_us" in cell:
            lines.append(f"{c['model']:13s} T={c['tokens']:6d} modmoe {c['us']:10.1f} us  flashinfer "
                         f"{cell.get('default_us', float('nan')):10.1f} / deterministic "
                         f"{cell.get('deterministic_us', float('nan')):10.1f} us  -> "
                         f"{c.get('speedup_vs_flashinfer_default', float('nan')):.2f}x / "
                         f"{c.get('speedup_vs_flashinfer_deterministic', float('nan')):.2f}x")
    for mode, r in ratios.items():
        if r:
            g = math.exp(sum(math.log(x) for x in r) / len(r))
            result["summary"][f"geomean_speedup_vs_flashinfer_{mode}"] = g
            result["summary"][f"min_speedup_vs_flashinfer_{mode}"] = min(r)
            lines.append(f"vs flashinfer {mode}: geomean {g:.2f}x, min {min(r):.2f}x over {len(r)} cells")
    return lines
