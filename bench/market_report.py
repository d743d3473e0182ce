"""The marketplace bench's report: the goodput table with its ratios to the references, and the chart.

Both are drawn from a results JSON alone, so ``marketplace.py --replot`` redraws them without
measuring again.
"""

from __future__ import annotations

from pathlib import Path

from market_client import TPOT_SLO_S, TTFT_SLO_S


def summary_table(report: dict) -> str:
    lines = ["| rate (conv/s) | server | goodput tok/s | demand served well | throughput tok/s | met SLO | TTFT p50 | TTFT p90 | "
             "TPOT p50 | cached tokens | peak RSS | others' CPU |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rate in report["config"]["rates"]:
        for name, server in report["servers"].items():
            r = next(x for x in server["rates"] if x["rate"] == rate)
            lines.append(
                f"| {rate} | {name} | {r['goodput_tok_s']} | {r.get('served_well', 0):.0%} | {r['throughput_tok_s']} | {r['good']}/{r['requests']} | "
                f"{r['ttft_p50_s']} s | {r['ttft_p90_s']} s | {r['tpot_p50_ms']} ms | {r['cached_tokens_total'] or '–'} | "
                f"{r['peak_rss_mb']:.0f} MB | {r['other_cpu_cores']} cores |")
    lines += ["", "| rate | goodput ÷ llama-server | goodput ÷ llama_cpp.server | served well ÷ llama-server |", "|---|---|---|---|"]
    servers = report["servers"]
    for rate in report["config"]["rates"]:
        ours = next(x for x in servers["vramsupply"]["rates"] if x["rate"] == rate)["goodput_tok_s"] if "vramsupply" in servers else None
        ratios = []
        for ref in ("llama-server", "llama_cpp.server"):
            theirs = next((x for x in servers.get(ref, {}).get("rates", []) if x["rate"] == rate), None)
            ratios.append(f"{ours / theirs['goodput_tok_s']:.2f}" if ours is not None and theirs and theirs["goodput_tok_s"] else "–")
        ratios.append(served_ratio(servers, rate))
        lines.append(f"| {rate} | {ratios[0]} | {ratios[1]} | {ratios[2]} |")
    return "\n".join(lines)


def served_ratio(servers: dict, rate: float) -> str:
    """vramsupply's share of the demand served well over llama-server's, at ``rate``."""
    shares = [next((x.get("served_well") for x in servers.get(name, {}).get("rates", []) if x["rate"] == rate), None)
              for name in ("vramsupply", "llama-server")]
    return f"{shares[0] / shares[1]:.2f}" if shares[0] is not None and shares[1] else "–"


def plot(report: dict, path: Path) -> None:
    """Goodput, throughput and TTFT p50 against the arrival rate, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = report["config"]["rates"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, server in report["servers"].items():
        by_rate = {r["rate"]: r for r in server["rates"]}
        axes[0].plot(rates, [by_rate[r]["goodput_tok_s"] for r in rates], marker="o", label=name)
        axes[1].plot(rates, [by_rate[r]["throughput_tok_s"] for r in rates], marker="o", label=name)
        axes[2].plot(rates, [by_rate[r]["ttft_p50_s"] for r in rates], marker="o", label=name)
    titles = (f"goodput tok/s (TTFT <= {TTFT_SLO_S:g} s, TPOT <= {TPOT_SLO_S * 1000:g} ms)", "throughput tok/s", "TTFT p50 (s, log)")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("conversation arrivals per second")
        ax.set_xticks(rates, [str(r) for r in rates])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylim(bottom=0)
    axes[1].set_ylim(bottom=0)
    axes[2].set_yscale("log")
    fig.suptitle(f"vramsupply marketplace bench {report['date']}: {report['config']['conversations']} conversations per rate, "
                 f"{report['machine']['cpu']}, threads: {report['config']['threads']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

