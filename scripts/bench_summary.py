"""Summarize a bench_out/ directory (scripts/bench_cpu.sh, bench_gpu.sh) as Markdown tables.

python scripts/bench_summary.py bench_out                # tables + targets
python scripts/bench_summary.py bench_out --best-engine  # the best engine that passed the gate
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ORDER = ("fp32", "fp16", "int8")


def load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def precisions(out: Path) -> list[str]:
    found = {p.stem.split("_", 1)[1] for p in out.glob("fixed_*.json")}
    found |= {p.stem.split("_", 1)[1] for p in out.glob("text_*.json")}
    return sorted(found, key=lambda p: (ORDER.index(p) if p in ORDER else 99, p))


def gate(out: Path, precision: str) -> str:
    for name in (f"text_{precision}.json", f"fixed_{precision}.json"):
        report = load(out / name)
        if report:
            return str(report["gate"]["status"])
    report = load(out / f"gate_{precision}.json")
    return "unchecked" if report is None else ("passed" if report["passed"] else "failed")


def best_engine(out: Path) -> str:
    """Highest real-text (else fixed-shape) throughput among engines whose gate passed."""
    scored = []
    for precision in precisions(out):
        if gate(out, precision) != "passed":
            continue
        text = load(out / f"text_{precision}.json")
        fixed = load(out / f"fixed_{precision}.json")
        if text:
            scored.append((text["text"]["engine"]["sentences_per_s"], precision))
        elif fixed:
            scored.append((fixed["fixed"][0]["engine"]["sequences_per_s"], precision))
    return max(scored)[1] if scored else "fp32"


def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def main(out: Path) -> None:
    machine: dict[str, Any] = {}
    lines = [
        "| engine | gate | 32x128 seq/s | PyTorch seq/s | speed-up | real text sent/s "
        "| PyTorch recipe sent/s | speed-up | PyTorch sorted sent/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for precision in precisions(out):
        fixed = load(out / f"fixed_{precision}.json")
        text = load(out / f"text_{precision}.json")
        machine = machine or (fixed or text or {}).get("machine", {})
        row = fixed["fixed"][0] if fixed else None
        t = text["text"] if text else None
        sorted_side = (t or {}).get("other_baselines", {}).get("torch_sorted")
        lines.append(
            f"| {(fixed or text or {}).get('engine', {}).get('backend', '?')} {precision} "
            f"| {gate(out, precision)} "
            f"| {fmt(row and row['engine']['sequences_per_s'])} "
            f"| {fmt(row and row['baseline'] and row['baseline']['sequences_per_s'])} "
            f"| {fmt(row and row['speedup'], 2, 'x')} "
            f"| {fmt(t and t['engine']['sentences_per_s'])} "
            f"| {fmt(t and t['baseline'] and t['baseline']['sentences_per_s'])} "
            f"| {fmt(t and t['speedup'], 2, 'x')} "
            f"| {fmt(sorted_side and sorted_side['sentences_per_s'])} |"
        )
    print("\n".join(lines))
    online = load(out / "online.json")
    if online:
        o = online["online"]
        machine = machine or online.get("machine", {})
        print(
            "\n| concurrency | req/s | p50 ms | p99 ms | server queue ms | server compute ms "
            "| avg batch | % of offline |\n|---|---|---|---|---|---|---|---|"
        )
        for lv in o["levels"]:
            frac = lv.get("offline_fraction")
            print(
                f"| {lv['concurrency']} | {fmt(lv['requests_per_s'])} "
                f"| {fmt(lv['latency_ms']['p50_ms'], 2)} | {fmt(lv['latency_ms']['p99_ms'], 2)} "
                f"| {fmt(lv['server']['queue_ms'], 2)} | {fmt(lv['server']['compute_ms'], 2)} "
                f"| {fmt(lv['server']['average_batch_size'])} "
                f"| {fmt(None if frac is None else 100 * frac, 0, '%')} |"
            )
        if o.get("offline"):
            print(
                f"\noffline batch {o['offline']['batch_size']} x {o['offline']['seq_len']}: "
                f"{o['offline']['sequences_per_s']:.1f} seq/s; direct batch-1 p50 "
                f"{o['offline']['direct_p50_ms']:.2f} ms; concurrency-1 p50 overhead "
                f"{fmt(o['overhead_p50_ms'], 2)} ms"
            )
    scaling = load(out / "scaling.json")
    if scaling:
        s = scaling["scaling"]
        print(
            f"\nScaling, {s['batches']} batches of {s['batch_size']} x {s['seq_len']}:\n"
            "| devices | threads/worker | seq/s | speed-up | efficiency |\n|---|---|---|---|---|"
        )
        for row in s["rows"]:
            print(
                f"| {row['count']} | {row['threads_per_worker']} | {fmt(row['sequences_per_s'])} "
                f"| {fmt(row['speedup'], 2, 'x')} | {fmt(100 * row['efficiency'], 0, '%')} |"
            )
    print("\nTargets:")
    for line in targets(out, online):
        print(f"- {line}")
    if machine:
        print(
            f"\nMachine: {machine.get('cpu')}, {machine.get('cores')} cores"
            + (f", GPUs {', '.join(machine['gpus'])}" if machine.get("gpus") else "")
            + f"; load average at start {machine.get('load_average')}; {machine.get('date')}; "
            + ", ".join(f"{k} {v}" for k, v in sorted(machine.get("versions", {}).items()))
        )


def targets(out: Path, online: dict[str, Any] | None) -> list[str]:
    result = []
    best = best_engine(out)
    text = load(out / f"text_{best}.json")
    if text and gate(out, best) == "passed":
        speedup = text["text"]["speedup"]
        verdict = "met" if speedup and speedup >= 2 else "MISSED"
        result.append(
            f"real text, best gated engine ({best}) >= 2x the recipe: {speedup:.2f}x, {verdict}"
        )
    fixed = load(out / "fixed_int8.json")
    if fixed:
        speedup = fixed["fixed"][0]["speedup"]
        ok = speedup and speedup >= 1.6 and gate(out, "int8") == "passed"
        result.append(
            f"fixed 32x128 int8 >= 1.6x PyTorch fp32 with the gate passing: "
            f"{speedup:.2f}x, gate {gate(out, 'int8')}, {'met' if ok else 'MISSED'}"
        )
    if online:
        o = online["online"]
        level = next((lv for lv in o["levels"] if lv["concurrency"] == 16), None)
        if level and level.get("offline_fraction") is not None:
            frac = level["offline_fraction"]
            result.append(
                f"online concurrency 16 >= 80% of offline batch 32: {100 * frac:.0f}%, "
                f"{'met' if frac >= 0.8 else 'MISSED'}"
            )
        if o.get("overhead_p50_ms") is not None:
            over = o["overhead_p50_ms"]
            result.append(
                f"concurrency-1 p50 overhead <= 2 ms: {over:.2f} ms, "
                f"{'met' if over <= 2 else 'MISSED'}"
            )
    return result


def grouped_bars(ax: Any, names: list[str], groups: dict[str, list[float]], ylabel: str) -> None:
    width = 0.8 / len(groups)
    for k, (label, values) in enumerate(groups.items()):
        offset = (k - (len(groups) - 1) / 2) * width
        bars = ax.bar([i + offset for i in range(len(values))], values, width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


def plot(out: Path, path: Path) -> None:
    """Fixed 32x128, real text and online in one figure, engines next to PyTorch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    fixed_groups: dict[str, list[float]] = {"trtpipe engine": [], "PyTorch eager fp32": []}
    text_groups: dict[str, list[float]] = {
        "trtpipe engine": [],
        "PyTorch recipe (batch 16, original order)": [],
        "PyTorch + trtpipe's sorting": [],
    }
    fixed_names, text_names = [], []
    machine: dict[str, Any] = {}
    for precision in precisions(out):
        fixed, text = load(out / f"fixed_{precision}.json"), load(out / f"text_{precision}.json")
        machine = machine or (fixed or text or {}).get("machine", {})
        tag = f"{precision} engine\ngate {gate(out, precision)}"
        if fixed:
            row = fixed["fixed"][0]
            fixed_names.append(tag)
            fixed_groups["trtpipe engine"].append(row["engine"]["sequences_per_s"])
            fixed_groups["PyTorch eager fp32"].append(row["baseline"]["sequences_per_s"])
        if text:
            t = text["text"]
            other = t.get("other_baselines", {}).get("torch_sorted")
            text_names.append(tag)
            values = [
                t["engine"]["sentences_per_s"],
                t["baseline"]["sentences_per_s"],
                other["sentences_per_s"] if other else 0.0,
            ]
            for key, value in zip(text_groups, values, strict=True):
                text_groups[key].append(value)
    grouped_bars(axes[0], fixed_names, fixed_groups, "sequences/s")
    axes[0].set_title("fixed shape, batch 32 x 128 tokens (pairs from one run)", fontsize=10)
    grouped_bars(axes[1], text_names, text_groups, "sentences/s")
    axes[1].set_title("real text, end to end, tokenization included", fontsize=10)
    ax = axes[2]
    online = load(out / "online.json")
    if online:
        levels = online["online"]["levels"]
        conc = [lv["concurrency"] for lv in levels]
        ax.plot(conc, [lv["requests_per_s"] for lv in levels], marker="o", label="online req/s")
        offline = online["online"].get("offline")
        if offline:
            ax.axhline(
                offline["sequences_per_s"],
                linestyle="--",
                color="gray",
                label=f"offline batch {offline['batch_size']}",
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.legend(fontsize=8)
    ax.set_xlabel("concurrent clients, batch-1 requests of 128 tokens")
    ax.set_ylabel("requests/s")
    ax.set_title("online through trtpipe serve", fontsize=10)
    for ax in axes:
        ax.set_ylim(bottom=0)
    fig.suptitle(
        f"all-MiniLM-L6-v2 | {machine.get('cpu', '')}, {machine.get('cores', '?')} cores | "
        f"{machine.get('date', '')[:10]}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "bench_out")
    problem = None
    if not target.is_dir():
        problem = f"{target} is not a directory of benchmark results (bench_cpu.sh writes one)"
    elif "--best-engine" not in sys.argv and not precisions(target):
        problem = f"no fixed_*.json or text_*.json results in {target}"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    if "--best-engine" in sys.argv:
        print(best_engine(target))
    elif "--plot" in sys.argv:
        plot(target, Path(sys.argv[sys.argv.index("--plot") + 1]))
    else:
        main(target)
