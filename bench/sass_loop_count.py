#!/usr/bin/env python3
"""Static instruction count of the W4A16 kernels' k-tile loop (no GPU needed).

    cuobjdump -sass build/CMakeFiles/modmoe.dir/src/cuda/gemm/w4a16_grouped_gemm.cu.o > w.sass
    python3 bench/sass_loop_count.py w.sass [--ops LOP3,IMAD,...] [--full-opcodes]

For each W4A16 kernel in the listing: the main loop is the backward branch whose body holds
the most HMMAs (the k-tile loop; the decode and the MMAs are unrolled inside it). Its body,
without the backward branches, is a DAG; every path from the loop head to that branch is
summarised by (LDGSTS, STS, HMUL2 + HFMA2, HMMA) and the shortest path of each summary is
kept (a predicated instruction counts as issued). The steady-state iteration is the shortest
path with the most LDGSTS (the next stage is loaded), then the most STS (the thread's token
chunks are permuted in place), then the most decode multiplies (a full k-tile, no K tail),
and
  - T > 8 column:  the most HMMAs (every n8 fragment of the tile computed);
  - T <= 8 column: the fewest HMMAs above zero (the deep tile computes one n8 fragment when
    the tile has <= 8 tokens; the 64-K tile always computes all, so both columns agree).
The counts are per thread (= per warp instruction) per k-tile; "per byte" divides by the
packed weight bytes one thread's share of its warp decodes per k-tile:
  W4a16Tile<BM, BN, Stages, MinBlocks>:     BN * 32 / 128 (4 warps, 32 bytes per row)
  W4a16DeepTile<BM, BN, Stages, Warps>:     BN * 128 / (32 * Warps)
The path's LDGSTS and HMMA counts are printed as a check that the walk took the intended path
(LDGSTS = the copy plan's cp.async per thread; HMMA = 4 steps x sub-blocks x mma-m x mma-n).
Opcodes are reported without modifiers (HFMA2.BF16 -> HFMA2) unless --full-opcodes.
"""
import argparse
import collections
import re
import sys

FUNC_RE = re.compile(r"Function : (\S+)")
INSN_RE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
BRA_RE = re.compile(r"^(@!?U?P\w+\s+)?BRA(?:\.\S+)?\s+(?:`?\(?\.?L?_?x?_?)?(0x[0-9a-f]+)")


def parse(path):
    """{mangled name: [(pc, predicate or '', opcode, full text)]}"""
    funcs = collections.OrderedDict()
    cur = None
    with open(path) as f:
        for line in f:
            m = FUNC_RE.search(line)
            if m:
                cur = funcs.setdefault(m.group(1), [])
                continue
            m = INSN_RE.search(line)
            if m and cur is not None:
                text = m.group(2).strip()
                pred = ""
                if text.startswith("@"):
                    pred, text = text.split(None, 1)
                op = text.split()[0]
                cur.append((int(m.group(1), 16), pred, op, text))
    return funcs


def branch_target(insn):
    pc, pred, op, text = insn
    if not op.startswith("BRA"):
        return None
    m = re.search(r"(0x[0-9a-f]+)", text[len(op):])
    return int(m.group(1), 16) if m else None


def main_loop(insns):
    """(head index, latch index) of the backward branch enclosing the most HMMAs."""
    index = {pc: i for i, (pc, _, _, _) in enumerate(insns)}
    best = None
    for i, insn in enumerate(insns):
        t = branch_target(insn)
        if t is None or t >= insn[0] or t not in index:
            continue
        h = index[t]
        n = sum(1 for x in insns[h:i + 1] if x[2].startswith("HMMA"))
        if best is None or n > best[0]:
            best = (n, h, i)
    return (best[1], best[2]) if best else None


def paths(insns, head, latch):
    """{(ldgsts, sts, decode multiplies, hmma): shortest path as a list of insns} over the loop
    body from head to latch (forward branches only; a backward branch ends nothing but the
    latch, so an inner backward branch is treated as not taken)."""
    index = {pc: i for i, (pc, _, _, _) in enumerate(insns)}
    best = {}  # node index -> {summary: (length, next node or None, taken)}

    def weight(insn):
        op = insn[2]
        return (int(op.startswith("LDGSTS")), int(op.startswith("STS")),
                int(op.startswith(("HMUL2", "HFMA2"))), int(op.startswith("HMMA")))

    # Reverse topological order: the body is laid out forward, so go from latch back to head.
    for i in range(latch, head - 1, -1):
        insn = insns[i]
        w = weight(insn)
        succ = []
        if i == latch:
            best[i] = {w: (1, None)}
            continue
        t = branch_target(insn)
        if t is not None and t > insn[0] and index.get(t, latch + 1) <= latch:
            succ.append(index[t])
            if insn[1]:  # conditional: may fall through
                succ.append(i + 1)
        elif t is not None and t > insn[0]:
            continue  # leaves the loop: not an iteration path
        else:
            succ.append(i + 1)
        table = {}
        for j in succ:
            for key, (n, _) in best.get(j, {}).items():
                k2 = tuple(a + b for a, b in zip(key, w))
                if k2 not in table or n + 1 < table[k2][0]:
                    table[k2] = (n + 1, j)
        best[i] = table

    def path_of(key):
        out, i, k = [], head, key
        while i is not None:
            insn = insns[i]
            out.append(insn)
            n, j = best[i][k]
            if j is None:
                break
            w = weight(insn)
            k = tuple(a - b for a, b in zip(k, w))
            i = j
        return out

    return {key: path_of(key) for key in best[head]}


def steady_state(summaries):
    """(T <= 8 key, T > 8 key) among the path summaries."""
    ldg = max(k[0] for k in summaries)
    sts = max(k[1] for k in summaries if k[0] == ldg)
    dec = max(k[2] for k in summaries if k[:2] == (ldg, sts))
    full = [k for k in summaries if k[:3] == (ldg, sts, dec)]
    small = min((k for k in full if k[3] > 0), key=lambda k: k[3])
    large = max(full, key=lambda k: k[3])
    return small, large


def tile_bytes_per_thread(name):
    m = re.search(r"W4a16DeepTileILi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)E", name)
    if m:
        bm, bn, stages, warps = map(int, m.groups())
        return f"deep<{bm},{bn},{stages},{warps}>", bn * 128 / (32 * warps)
    m = re.search(r"W4a16TileILi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)E", name)
    if m:
        bm, bn, stages, minb = map(int, m.groups())
        return f"64k<{bm},{bn},{stages},{minb}>", bn * 32 / 128
    return None, None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sass")
    ap.add_argument("--full-opcodes", action="store_true")
    ap.add_argument("--top", type=int, default=40, help="opcodes listed per kernel")
    args = ap.parse_args()
    for name, insns in parse(args.sass).items():
        label, nbytes = tile_bytes_per_thread(name)
        if label is None:
            continue
        loop = main_loop(insns)
        if loop is None:
            print(f"{label}: no loop found")
            continue
        head, latch = loop
        print(f"== {label}  loop {insns[head][0]:#x}..{insns[latch][0]:#x}  "
              f"({latch - head + 1} static insns), {nbytes:g} packed bytes / thread / k-tile")
        summaries = paths(insns, head, latch)
        key = (lambda x: x[2]) if args.full_opcodes else (lambda x: x[2].split(".")[0])
        cols = [collections.Counter(key(x) for x in summaries[k]) for k in steady_state(summaries)]
        total = [sum(c.values()) for c in cols]
        print(f"   {'opcode':<24}{'T<=8 /iter':>11}{'/byte':>7}{'T>8 /iter':>11}{'/byte':>7}")
        ops = sorted(set(cols[0]) | set(cols[1]), key=lambda o: (-cols[1][o], o))
        for op in ops[:args.top]:
            a, b = cols[0][op], cols[1][op]
            print(f"   {op:<24}{a:>11}{a / nbytes:>7.2f}{b:>11}{b / nbytes:>7.2f}")
        print(f"   {'TOTAL':<24}{total[0]:>11}{total[0] / nbytes:>7.2f}"
              f"{total[1]:>11}{total[1] / nbytes:>7.2f}")
        for c, tag in zip(cols, ("T<=8", "T>8")):
            ldg = sum(v for k, v in c.items() if k.startswith("LDGSTS"))
            mma = sum(v for k, v in c.items() if k.startswith("HMMA"))
            sts = sum(v for k, v in c.items() if k.startswith("STS"))
            print(f"   check {tag}: LDGSTS {ldg}, STS {sts}, HMMA {mma}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
