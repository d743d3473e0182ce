"""bench/run.py's report: the best round of each measurement, the targets, the table and the chart.

Absolute numbers differ between machines and runs, so the targets are checked as ratios of numbers
taken in one run. Other processes only ever slow a server down, so each (server, level, metric)
reports its best round, the one least slowed; medians and every round's values stay alongside.
Everything here works on the JSON a run writes, so ``run.py --rereport`` can recompute it from the
saved rounds without measuring again.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def median(values: list[float]) -> float | None:
    return round(float(np.median(values)), 1) if values else None


def best_of_rounds(levels: list[dict]) -> dict:
    """A (server, level) over all rounds. Other processes only ever slow a server down, so each
    metric's best round is the closest to what the server can do: the highest tok/s, the lowest
    TTFTs. Memory is the other way round: the largest RSS seen. Medians and every round's values
    stay alongside."""
    tok_s = [lvl["tok_s"] for lvl in levels]
    ttft_p50 = [lvl["ttft_p50_ms"] for lvl in levels if lvl["ttft_p50_ms"] is not None]
    ttft_p95 = [lvl["ttft_p95_ms"] for lvl in levels if lvl["ttft_p95_ms"] is not None]
    return {
        "concurrency": levels[0]["concurrency"],
        "tok_s": max(tok_s),
        "ttft_p50_ms": min(ttft_p50, default=None),
        "ttft_p95_ms": min(ttft_p95, default=None),
        "peak_rss_mb": max(lvl["peak_rss_mb"] for lvl in levels),
        "requests": sum(lvl["requests"] for lvl in levels),
        "completed": sum(lvl["completed"] for lvl in levels),
        "cut_off": sum(lvl["cut_off"] for lvl in levels),
        "errors": sum(lvl["errors"] for lvl in levels),
        "tok_s_median": median(tok_s),
        "ttft_p50_ms_median": median(ttft_p50),
        "tok_s_rounds": tok_s,
        "ttft_p50_ms_rounds": [lvl["ttft_p50_ms"] for lvl in levels],
        "other_cpu_cores_max": max(lvl["other_cpu_cores"] for lvl in levels),
    }


def summarize(model_report: dict, concurrency: list[int]) -> None:
    """Fill in the best-of-rounds numbers and the targets from the rounds a model's report holds."""
    for key in ("raw_decode", "raw_decode_shared_kv"):
        raw_rounds = model_report.get(f"{key}_rounds") or []
        # A round whose llama-batched-bench failed at a level (a busy machine) has no number for it.
        best = {c: max((r[str(c)] for r in raw_rounds if str(c) in r), default=None) for c in concurrency}
        model_report[key] = [{"concurrency": c, "tok_s": tok_s} for c, tok_s in best.items() if tok_s is not None]
    for server in model_report["servers"].values():
        server["levels"] = [best_of_rounds([lvl for lvl in server["rounds"] if lvl["concurrency"] == c]) for c in concurrency]
    model_report["targets"] = check_targets(model_report["servers"], concurrency) + stretch_target(model_report) + memory_target(model_report)


def memory_target(model_report: dict) -> list[dict]:
    """Peak RSS at most llama-server's + 100 MB, each server's peak over the whole run by the kernel's
    own count (VmHWM: the load's peak included, which the 20 ms samples taken while the servers answer
    miss). Runs recorded before the count was kept have no such row."""
    ours, theirs = (model_report["servers"].get(name, {}).get("peak_rss_kernel_mb") for name in ("vramsupply", "llama-server"))
    if not ours or not theirs:
        return []
    gap = round(ours - theirs, 1)
    return [{"target": "peak RSS (kernel's VmHWM, whole run) <= llama-server + 100 MB", "vramsupply": ours,
             "llama-server": theirs, "ratio": f"{gap:+} MB", "met": gap <= 100, "ratio_of_medians": None}]


def stretch_target(model_report: dict) -> list[dict]:
    """Stretch: c=16 tok/s at least 0.95x the raw decode limit (llama-batched-bench) of the same run;
    the ratio to the raw decode with the servers' own KV layout (one shared cache) alongside."""
    ours = level_of(model_report["servers"].get("vramsupply"), 16)
    raw = next((r["tok_s"] for r in model_report["raw_decode"] if r["concurrency"] == 16), None)
    if not ours or not raw:
        return []
    ratio = round(ours["tok_s"] / raw, 3)
    shared = next((r["tok_s"] for r in model_report.get("raw_decode_shared_kv", []) if r["concurrency"] == 16), None)
    return [{"target": "c=16 tok_s >= 0.95x raw decode (stretch)", "vramsupply": ours["tok_s"], "raw decode": raw,
             "ratio": ratio, "met": ratio >= 0.95, "ratio_of_medians": None, "raw decode, shared KV": shared,
             "ratio_to_shared_kv": round(ours["tok_s"] / shared, 3) if shared else None}]


def level_of(server: dict | None, concurrency: int) -> dict | None:
    if server is None:
        return None
    return next((lvl for lvl in server["levels"] if lvl["concurrency"] == concurrency), None)


def check_targets(servers: dict[str, dict], concurrency: list[int]) -> list[dict]:
    """The engine issue's targets as ratios vramsupply/reference from this run's best rounds (the
    ratio of medians alongside); skipped where a side is missing."""
    wanted = [("tok_s", c, "llama-server", ">=", 1.0) for c in concurrency]
    wanted += [("tok_s", 16, "llama_cpp.server", ">=", 4.0)]
    wanted += [("ttft_p50_ms", c, "llama-server", "<=", 1.1) for c in concurrency]
    targets = []
    for metric, c, reference, op, bound in wanted:
        ours, theirs = level_of(servers.get("vramsupply"), c), level_of(servers.get(reference), c)
        if not ours or not theirs or not ours[metric] or not theirs[metric]:
            continue
        ratio = round(ours[metric] / theirs[metric], 3)
        ours_median, theirs_median = ours[f"{metric}_median"], theirs[f"{metric}_median"]
        targets.append({
            "target": f"c={c} {metric} {op} {bound}x {reference}",
            "vramsupply": ours[metric], reference: theirs[metric], "ratio": ratio,
            "met": ratio >= bound if op == ">=" else ratio <= bound,
            "ratio_of_medians": round(ours_median / theirs_median, 3) if ours_median and theirs_median else None,
        })
    return targets


def markdown_table(report: dict) -> str:
    heading = (f"Best of {report['config']['rounds']} round(s) per server, level and metric "
               "(highest tok/s, lowest TTFT, largest RSS); completed counts all rounds.")
    lines = [heading, ""]
    for model, data in report["models"].items():
        lines += [f"**{model}** ({data['size_mb']} MB)", "",
                  "| server | c | tok/s | TTFT p50 | TTFT p95 | peak RSS | completed |", "|---|---|---|---|---|---|---|"]
        for row in data["raw_decode"]:
            lines.append(f"| raw decode (llama-batched-bench) | {row['concurrency']} | {row['tok_s']} | – | – | – | – |")
        for row in data.get("raw_decode_shared_kv", []):
            lines.append(f"| raw decode, one shared KV cache (`-kvu`) | {row['concurrency']} | {row['tok_s']} | – | – | – | – |")
        for name, server in data["servers"].items():
            for lvl in server["levels"]:
                lines.append(f"| {name} | {lvl['concurrency']} | {lvl['tok_s']} | {lvl['ttft_p50_ms']} ms | "
                             f"{lvl['ttft_p95_ms']} ms | {lvl['peak_rss_mb']:.0f} MB | {lvl['completed']}/{lvl['requests']} |")
        if data["targets"]:
            lines += ["", "| target | ratio (best rounds) | | ratio of medians |", "|---|---|---|---|"]
            lines += [f"| {t['target']} | {t['ratio']} | {'met' if t['met'] else 'MISSED'} | {t['ratio_of_medians']} |"
                      for t in data["targets"]]
            lines += [f"| (c=16 against the raw decode with one shared KV cache, both servers' layout) | {t['ratio_to_shared_kv']} | – | – |"
                      for t in data["targets"] if t.get("ratio_to_shared_kv")]
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["models"])
    concurrency = report["config"]["concurrency"]
    fig, axes = plt.subplots(len(models), 3, figsize=(15, 4.2 * len(models)), squeeze=False)
    for row, model in zip(axes, models):
        data = report["models"][model]
        for name, server in data["servers"].items():
            if name == "llama_cpp.server-interrupt":
                continue  # its streams are cut off, so its numbers do not describe served requests
            cs = [lvl["concurrency"] for lvl in server["levels"]]
            row[0].plot(cs, [lvl["tok_s"] for lvl in server["levels"]], marker="o", label=name)
            row[1].plot(cs, [lvl["ttft_p50_ms"] for lvl in server["levels"]], marker="o", label=name)
            row[2].plot(cs, [lvl["peak_rss_mb"] for lvl in server["levels"]], marker="o", label=name)
        row[0].plot([r["concurrency"] for r in data["raw_decode"]], [r["tok_s"] for r in data["raw_decode"]],
                    linestyle="--", color="grey", label="raw decode limit")
        if data.get("raw_decode_shared_kv"):
            row[0].plot([r["concurrency"] for r in data["raw_decode_shared_kv"]], [r["tok_s"] for r in data["raw_decode_shared_kv"]],
                        linestyle=":", color="grey", label="raw decode, one shared KV cache")
        for ax, title in zip(row, ("aggregate completion tok/s", "TTFT p50 (ms, log)", "peak RSS (MB)")):
            ax.set_title(f"{model}: {title}", fontsize=10)
            ax.set_xlabel("concurrent requests")
            ax.set_xscale("log", base=2)
            ax.set_xticks(concurrency, [str(c) for c in concurrency])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        row[1].set_yscale("log")
        row[2].set_ylim(bottom=0)
    fig.suptitle(f"vramsupply bench {report['date']} — {report['machine']['cpu']}, {report['config']['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict, json_path: Path) -> None:
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    png_path = json_path.with_suffix(".png")
    plot(report, png_path)
    print()
    print(markdown_table(report))
    print(f"wrote {json_path} and {png_path.name}")


def rereport(json_path: Path) -> None:
    report = json.loads(json_path.read_text())
    for model_report in report["models"].values():
        summarize(model_report, report["config"]["concurrency"])
    write_outputs(report, json_path)
