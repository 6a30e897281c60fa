"""The benchmark's markdown table and its plot (accuracy vs peak memory, size = trainable)."""

from __future__ import annotations

from pathlib import Path

ORDER = ["full", "freeze", "gradual", "lora", "dora", "qlora", "head"]


def _order(record: dict) -> int:
    name = record["strategy"]
    return ORDER.index(name) if name in ORDER else len(ORDER)


def table(records: list[dict]) -> str:
    lines = [("| run | trainable params | val. accuracy | peak memory | planner | "
             "median step | samples/s | tokens/s | MFU | wall |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=_order):
        predicted = r.get("predicted_peak_mb")
        error = (f"{predicted:,.0f} MB ({(predicted / r['peak_memory_mb'] - 1) * 100:+.0f}%)"
                 if predicted else "")
        mfu = f"{r['mfu'] * 100:.1f}%" if r.get("mfu") is not None else ""
        name = r["strategy"] if r["tool"] == "peftlab" else f"HF Trainer ({r['mode']})"
        lines.append(
            f"| {name} | {r['trainable_params']:,} | {r['validation_accuracy'] * 100:.2f}% | "
            f"{r['peak_memory_mb']:,.0f} MB | {error} | {r['median_step_seconds']:.3f} s | "
            f"{r['samples_per_second']:.1f} | {r['tokens_per_second']:,.0f} | {mfu} | "
            f"{r['wall_seconds']:.0f} s |")
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    """Validation accuracy against peak memory; marker area grows with trainable params."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    largest = max(r["trainable_params"] for r in records) or 1
    for r in sorted(records, key=_order):
        ours = r["tool"] == "peftlab"
        size = 40 + 900 * (r["trainable_params"] / largest) ** 0.5
        ax.scatter(r["peak_memory_mb"], r["validation_accuracy"] * 100, s=size, alpha=0.6,
                   marker="o" if ours else "s", color="tab:blue" if ours else "tab:gray")
        label = r["strategy"] if ours else f"Trainer {r['mode']}"
        ax.annotate(label, (r["peak_memory_mb"], r["validation_accuracy"] * 100),
                    textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xlabel("peak memory (MB)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("accuracy vs peak memory (marker area ~ trainable params)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
