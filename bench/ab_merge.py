#!/usr/bin/env python3
"""Merge `modmoe bench experts` JSON files of an A/B run into one file.

Usage: ab_merge.py OUT NOTE A_LABEL=a.json[,a2.json] B_LABEL=b.json[,b2.json]
Each side may list several runs (e.g. the same build on two GPUs of one machine); the
per-cell ratio A/B of the median time over each side's runs is written next to the runs.
"""
import json
import statistics
import sys


def side(spec):
    label, files = spec.split("=", 1)
    return label, [json.load(open(f)) for f in files.split(",")]


def times(runs):
    cells = {}
    for run in runs:
        for c in run["cells"]:
            cells.setdefault(f'{c["model"]}/{c["routing"]}/{c["tokens"]}', []).append(c["us"])
    return {k: statistics.median(v) for k, v in cells.items()}


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    out, note, (la, ra), (lb, rb) = sys.argv[1], sys.argv[2], side(sys.argv[3]), side(sys.argv[4])
    gpus = {r["gpu"] for r in ra + rb}
    if len(gpus) != 1:
        sys.exit(f"runs from different GPUs: {sorted(gpus)}")
    ta, tb = times(ra), times(rb)
    ratios = {k: ta[k] / tb[k] for k in ta if k in tb}
    merged = {
        "benchmark": "experts_ab", "gpu": gpus.pop(), "note": note,
        "a": {"label": la, "commits": [r["commit"] for r in ra], "runs": ra},
        "b": {"label": lb, "commits": [r["commit"] for r in rb], "runs": rb},
        "median_us_a": ta, "median_us_b": tb, "time_a_over_b": ratios,
        "geomean_time_a_over_b": statistics.geometric_mean(ratios.values()),
    }
    with open(out, "w") as f:
        json.dump(merged, f, indent=1)
    for k, v in ratios.items():
        print(f"{k:32s} {ta[k]:10.1f} {tb[k]:10.1f} {v:6.3f}")
    print(f"geomean {la}/{lb}: {merged['geomean_time_a_over_b']:.3f}")


if __name__ == "__main__":
    main()
