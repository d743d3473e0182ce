"""The marketplace bench's report: the goodput table with its ratios to the references, and the chart.

Goodput is over the trace's sending window (``market_client``); results written before that field
(``window_s``) have goodput over each server's own wall, shown as such.

Both are drawn from a results JSON alone, so ``marketplace.py --replot`` redraws them without
measuring again.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from market_client import TPOT_SLO_S, TTFT_SLO_S


def runs(server: dict, rate: float) -> list[dict]:
    """A server's results at ``rate``, one per repeat (results written before ``--repeat`` have one)."""
    return sorted((x for x in server["rates"] if x["rate"] == rate), key=lambda x: x.get("repeat", 0))


def summary_table(report: dict) -> str:
    servers = report["servers"]
    lines = ["| rate (conv/s) | server | goodput tok/s | goodput over its wall | demand served well | throughput tok/s | met SLO | "
             "TTFT p50 | TTFT p90 | TPOT p50 | cached tokens | peak RSS | others' CPU |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rate in report["config"]["rates"]:
        for name, server in servers.items():
            for r in runs(server, rate):
                label = f"{rate} (seed {r['seed']})" if "seed" in r else f"{rate}"
                lines.append(
                    f"| {label} | {name} | {r['goodput_tok_s'] if 'window_s' in r else '–'} | {wall_goodput(r)} | "
                    f"{r.get('served_well', 0):.0%} | {r['throughput_tok_s']} | {r['good']}/{r['requests']} | "
                    f"{r['ttft_p50_s']} s | {r['ttft_p90_s']} s | {r['tpot_p50_ms']} ms | {r['cached_tokens_total'] or '–'} | "
                    f"{r['peak_rss_mb']:.0f} MB | {r['other_cpu_cores']} cores |")
    lines += ["", "Ratios per repeat, then (when repeated) their median in bold:", "",
              "| rate | goodput ÷ llama-server | goodput ÷ llama_cpp.server | served well ÷ llama-server | goodput over each wall ÷ llama-server "
              "| peak RSS − llama-server |", "|---|---|---|---|---|---|"]
    for rate in report["config"]["rates"]:
        cells = [ratios(servers, rate, "goodput_tok_s", "llama-server"), ratios(servers, rate, "goodput_tok_s", "llama_cpp.server"),
                 ratios(servers, rate, "served_well", "llama-server"), ratios(servers, rate, "goodput_wall_tok_s", "llama-server"),
                 ratios(servers, rate, "peak_rss_mb", "llama-server", difference=True)]
        lines.append(f"| {rate} | " + " | ".join(cells) + " |")
    return "\n".join(lines + kernel_peaks(servers))


def kernel_peaks(servers: dict) -> list[str]:
    """Each server's peak over the whole run by the kernel's count (VmHWM, its load included), which
    the per-rate peaks above, sampled every 20 ms while it answers, may miss; results written before
    it was kept have no such line."""
    peaks = {name: server["peak_rss_kernel_mb"] for name, server in servers.items() if server.get("peak_rss_kernel_mb")}
    if not peaks:
        return []
    shown = ", ".join(f"{name} {mb:.0f} MB" for name, mb in peaks.items())
    gap = f" (vramsupply − llama-server: {peaks['vramsupply'] - peaks['llama-server']:+.0f} MB)" if {"vramsupply", "llama-server"} <= peaks.keys() else ""
    return ["", f"Peak RSS over the whole run, by the kernel's count (VmHWM): {shown}{gap}."]


def wall_goodput(result: dict) -> float:
    """Good tokens over the server's own wall: a field of its own since goodput moved to the window."""
    return result["goodput_wall_tok_s"] if "window_s" in result else result["goodput_tok_s"]


def value(result: dict, key: str) -> float | None:
    """``result``'s ``key``, read the same way for results written before goodput's window."""
    if key == "goodput_wall_tok_s":
        return wall_goodput(result)
    if key == "goodput_tok_s" and "window_s" not in result:
        return None
    return result.get(key)


def ratios(servers: dict, rate: float, key: str, ref: str, difference: bool = False) -> str:
    """vramsupply's ``key`` over ``ref``'s (or minus it, in MB) at ``rate``, repeat by repeat, and
    their median when there are several; – where either is missing or the reference is 0."""
    ours, theirs = (runs(servers.get(name, {"rates": []}), rate) for name in ("vramsupply", ref))
    values = []
    for a, b in zip(ours, theirs):
        x, y = value(a, key), value(b, key)
        if x is None or y is None or (not difference and not y):
            continue
        values.append(x - y if difference else x / y)
    if not values:
        return "–"
    shown = " / ".join(f"{v:+.0f}" if difference else f"{v:.2f}" for v in values)
    if len(values) == 1:
        return shown
    middle = statistics.median(values)
    return f"{shown}: **{middle:+.0f}**" if difference else f"{shown}: **{middle:.2f}**"


def medians(server: dict, rate: float, key: str) -> float:
    """The median of ``key`` over a server's repeats at ``rate`` (NaN where none has it)."""
    values = [r[key] for r in runs(server, rate) if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def plot(report: dict, path: Path) -> None:
    """Goodput, throughput and TTFT p50 against the arrival rate, one line per server (medians
    over the repeats)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = report["config"]["rates"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, server in report["servers"].items():
        for ax, key in zip(axes, ("goodput_tok_s", "throughput_tok_s", "ttft_p50_s")):
            ax.plot(rates, [medians(server, rate, key) for rate in rates], marker="o", label=name)
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
                 f"{report['machine']['cpu']}, threads: {report['config']['threads']}, "
                 f"repeats: {report['config'].get('repeats', 1)} (medians)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

