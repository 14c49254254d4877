"""The runner's last words: a table of the stages, and the targets read from stage 3.

Targets (bf16, D = 768, M = N, from ``3-speed-main.json`` and ``3-speed-large.json``):

- fastcl at most 0.9x torch.compile of the dense loss at every N >= 16384;
- fastcl at most 35 ms (forward + backward) at N = 65536;
- fastcl's extra peak memory at most 1.5 GiB at N = 65536;
- fastcl runs at N = 1,048,576.

"fastcl" is the library's default choice (``backend="auto"``); a target with no
measurement to read (a dry run, a stage cut short) is reported as such, never as passed.
"""

from __future__ import annotations

import json
from pathlib import Path

TIMED = ("ok", "unchecked")  # a case that disagrees with the reference meets no target


def _results(path: Path) -> dict:
    try:
        return {(r["impl"], r["n"]): r for r in json.loads(path.read_text())["results"] if r["d"] == 768}
    except (OSError, ValueError, KeyError):
        return {}


def _ms(r) -> float | None:
    return r["time_ms"]["median"] if r and r["status"] in TIMED and r.get("time_ms") else None


def targets(out: Path, prefix: str = "3-speed") -> list[dict]:
    """Each target: what it asks, what was measured, and PASS / FAIL / NO DATA (none
    when stage 3 has not run into ``out``)."""
    if not any((out / f"{prefix}-{name}.json").exists() for name in ("main", "large")):
        return []
    main, large = _results(out / f"{prefix}-main.json"), _results(out / f"{prefix}-large.json")
    rows = []

    def add(name, measured, passed):
        rows.append({"target": name, "measured": measured,
                     "result": "NO DATA" if passed is None else ("PASS" if passed else "FAIL")})

    for n in (16384, 65536):
        ours, theirs = _ms(main.get(("fastcl", n))), _ms(main.get(("compiled", n)))
        ratio = ours / theirs if ours and theirs else None
        add(f"fastcl <= 0.9x torch.compile(dense) at N={n}",
            f"{ours:.2f} / {theirs:.2f} ms = {ratio:.2f}x" if ratio else _why(main, n, ("fastcl", "compiled")),
            None if ratio is None else ratio <= 0.9)
    ms = _ms(main.get(("fastcl", 65536)))
    add("fastcl <= 35 ms at N=65536", f"{ms:.2f} ms" if ms else _why(main, 65536, ("fastcl",)),
        None if ms is None else ms <= 35.0)
    r = main.get(("fastcl", 65536))
    gib = r.get("peak_extra_gib") if r and r["status"] in TIMED else None
    add("fastcl extra peak memory <= 1.5 GiB at N=65536", f"{gib:.3f} GiB" if gib is not None else
        _why(main, 65536, ("fastcl",)), None if gib is None else gib <= 1.5)
    r = large.get(("fastcl", 1048576))
    ran = _ms(r)
    add("fastcl runs at N=1,048,576", f"{ran:.0f} ms, extra {r['peak_extra_gib']:.2f} GiB" if ran else
        _why(large, 1048576, ("fastcl",)), None if r is None or r["status"] in ("skipped", "pending") else bool(ran))
    return rows


def _why(results: dict, n: int, impls) -> str:
    for impl in impls:
        r = results.get((impl, n))
        if r is None:
            return f"{impl} not measured at N={n}"
        if r["status"] not in TIMED:
            return f"{impl}: {r['status']}" + (f" ({r['reason']})" if r.get("reason") else "")
    return "-"


def table(stages: list[dict], rows: list[dict], out: Path) -> str:
    """The summary a reader sees last: stages, then targets."""
    lines = ["", f"## GPU runner summary ({out})", "",
             "| stage | status | seconds (budget) | result |", "|---|---|---|---|"]
    for s in stages:
        first = s.get("lines", [""])[0] if s.get("lines") else (s.get("reason") or "")
        lines.append(f"| {s['number']} {s['name']} | {s['status']} | {s.get('seconds', 0):.0f} "
                     f"({s.get('budget_s', 0):.0f}) | {first} |")
    if rows:
        lines += ["", "| target | measured | result |", "|---|---|---|"]
        lines += [f"| {r['target']} | {r['measured']} | {r['result']} |" for r in rows]
    for s in stages:
        if len(s.get("lines", [])) > 1 or s["status"] not in ("done",):
            lines += ["", f"{s['number']} {s['name']} ({s['status']}{': ' + s['reason'] if s.get('reason') else ''}):"]
            lines += [f"  {x}" for x in s.get("lines", [])[:40]]
    return "\n".join(lines) + "\n"
