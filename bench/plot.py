"""The results figure: throughput with ratios, latency CDFs, and the KV pool multiplexed over time."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on the benchmark machine
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _throughput(ax, runs: list[dict]) -> None:
    offline = [r for r in runs if r["mode"] == "offline"]
    ax.set_title("Throughput")
    if not offline:
        ax.text(0.5, 0.5, "no offline run\n(--mode offline|both)", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    labels = [r["label"] for r in offline]
    values = [r["output_tok_s"] for r in offline]
    kvmux = next((r["output_tok_s"] for r in offline if r["engine"] == "kvmux"), None)
    bars = ax.bar(labels, values, color=["tab:green" if r["engine"] == "kvmux" else "tab:gray" for r in offline])
    for bar, r in zip(bars, offline):
        text = f"{r['output_tok_s']:.0f}"
        if kvmux and r["engine"] != "kvmux":
            text += f"\nkvmux {kvmux / r['output_tok_s']:.1f}x"
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("output tokens/s (offline)")
    ax.tick_params(axis="x", labelrotation=20)
    ax.margins(y=0.2)


def _latency(ax, runs: list[dict]) -> None:
    online = [r for r in runs if r["mode"] == "online"]
    if not online:
        ax.text(0.5, 0.5, "no online run\n(--mode online|both)", ha="center", va="center", transform=ax.transAxes)
    for r in online:
        for key, style in (("ttft_samples", "-"), ("tpot_samples", "--")):
            xs = r.get(key) or []
            if xs:
                ax.plot(np.array(xs) * 1000, np.linspace(0, 1, len(xs)), style,
                        label=f"{r['label']} {key.split('_')[0].upper()}")
    ax.set_xscale("log")
    ax.set_xlabel("ms (solid: time to first token, dashed: time per output token)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Online latency CDF")
    if online:
        ax.legend(fontsize=7)


def _occupancy(ax, runs: list[dict]) -> None:
    run = next((r for r in runs if r["engine"] == "kvmux" and r["mode"] == "offline"), None)
    run = run or next((r for r in runs if r["engine"] == "kvmux"), None)
    trace = run and run["kvmux"].get("trace")
    if not trace or not trace["t"]:
        ax.text(0.5, 0.5, "no kvmux run", ha="center", va="center", transform=ax.transAxes)
        return
    per_request = np.array(trace["per_request"]).T  # [requests, samples]
    ax.stackplot(trace["t"], per_request, linewidth=0)
    ax.plot(trace["t"], trace["blocks_used"], color="black", linewidth=0.8, label="blocks in use")
    k = run["kvmux"]
    ax.set_title(f"kvmux KV pool ({run['mode']}): blocks per request, stacked\n"
                 f"peak {k['peak_blocks_used']}/{k['blocks_total']} blocks, "
                 f"waste {100 * k['kv_waste_time_avg']:.1f}% (time avg)", fontsize=9)
    ax.set_xlabel("seconds")
    ax.set_ylabel("KV blocks")
    ax.legend(fontsize=7, loc="upper right")


def plot(results: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    runs = [r for r in results["runs"] if "error" not in r]  # a failed engine is listed in the summary instead
    _throughput(axes[0], runs)
    _latency(axes[1], runs)
    _occupancy(axes[2], runs)
    fig.suptitle(f"kvmux bench: {results['model']}, {results['dtype']}, {results['workload']['drawn']['requests']} "
                 f"requests, {results['machine']['cpu_count']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
