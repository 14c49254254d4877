"""Markdown table of training runs from their results.json files.

    python benchmarks/train_table.py runs/gpu/*/results.json > benchmarks/results/train/gpu/README.md

One row per run: data, batch (chunk), steps, STS-B dev / test Spearman x100 before and
after, alignment / uniformity before and after, sentences/s (training-file sentences
consumed per second, evaluation excluded), peak GPU memory, training time.
"""

import json
import sys
from pathlib import Path


def row(path: Path) -> str:
    r = json.loads(path.read_text())
    c, b, a = r["config"], r.get("before") or {}, r.get("after") or {}
    f = lambda d, k, spec: format(d[k], spec) if d.get(k) is not None else "-"  # noqa: E731
    batch = str(c["batch_size"]) + (f" ({c['chunk_size']})" if c.get("chunk_size") else "")
    peak = f"{r['peak_gpu_memory_gib']:.2f}" if r.get("peak_gpu_memory_gib") is not None else "-"
    return (f"| {path.parent.name} | {r['kind']} | {Path(c['train_file']).name} | {batch} | {r['steps']} | "
            f"{f(b, 'stsb_dev', '.2f')} -> {f(a, 'stsb_dev', '.2f')} | {f(b, 'stsb_test', '.2f')} -> "
            f"{f(a, 'stsb_test', '.2f')} | {f(b, 'alignment', '.3f')} -> {f(a, 'alignment', '.3f')} | "
            f"{f(b, 'uniformity', '.3f')} -> {f(a, 'uniformity', '.3f')} | {r['sentences_per_s']:.1f} | {peak} | "
            f"{r['train_seconds']:.0f} | {r['device']} x{r['world_size']}, {r['precision']} |")


def main(paths) -> None:
    print("| run | kind | data | batch (chunk) | steps | STS-B dev | STS-B test | alignment | uniformity | "
          "sentences/s | peak GPU GiB | train s | device |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for p in paths:
        print(row(Path(p)))


if __name__ == "__main__":
    main(sys.argv[1:])
