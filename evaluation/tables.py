"""The summary as the paper's tables, each cell formatted once, for summary.md and report.html.

    means:        a row for dense and one per configuration: seconds per image, speedup over
                  dense, and the mean of every metric (seeds averaged per prompt, then over prompts)
    differences:  a row per configuration: AccelAes minus dense of every metric that scores an
                  image alone, and the mean of the metrics that compare it with dense (PSNR, SSIM),
                  each with its 95% confidence interval over prompts
"""

from __future__ import annotations

import math

from metrics.registry import METRICS

from .results import Estimate, EvaluationSummary
from .scoring import compares_with_dense

# metric -> (column title, decimals); a metric not listed shows its name and 4 decimals.
DISPLAY = {
    "clip_score": ("CLIP score", 2),
    "aesthetic": ("Aesthetic", 3),
    "hps_v2.1": ("HPS v2.1", 4),
    "pickscore": ("PickScore", 3),
    "psnr": ("PSNR vs dense (dB)", 2),
    "ssim": ("SSIM vs dense", 4),
}
Table = tuple[list[str], list[list[str]]]   # header, rows


def title(metric: str) -> str:
    return DISPLAY.get(metric, (metric, 4))[0]


def number(value: float | None, metric: str, signed: bool = False) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "inf" if value > 0 else "-inf" if value < 0 else "nan"
    return f"{value:{'+' if signed else ''}.{DISPLAY.get(metric, (metric, 4))[1]}f}"


def with_interval(estimate: Estimate | None, metric: str, signed: bool) -> str:
    """"+0.45 [-0.12, +1.02]"; the mean and why, where there is no interval."""
    if estimate is None:
        return "-"
    mean = number(estimate.mean, metric, signed)
    if estimate.low is None:
        return f"{mean} ({estimate.note})" if estimate.note else mean
    return f"{mean} [{number(estimate.low, metric, signed)}, {number(estimate.high, metric, signed)}]"


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def means_table(summary: EvaluationSummary) -> Table:
    header = ["configuration", "s / image", "speedup", *(title(m) for m in summary.metrics)]
    rows = [["dense", seconds(summary.dense_seconds_per_image), "1.00x",
             *(number(summary.dense[m].mean, m) if m in summary.dense else "-" for m in summary.metrics)]]
    for row in summary.configurations:
        speedup = "-" if row.speedup is None else f"{row.speedup:.2f}x"
        rows.append([row.title, seconds(row.seconds_per_image), speedup,
                     *(number(row.means[m].mean, m) for m in summary.metrics)])
    return header, rows


def differences_table(summary: EvaluationSummary) -> Table:
    header = ["configuration", *(title(m) if compares_with_dense(m) else f"Δ {title(m)}" for m in summary.metrics)]
    rows = [[row.title, *(with_interval(row.means[m], m, signed=False) if compares_with_dense(m)
                          else with_interval(row.differences[m], m, signed=True) for m in summary.metrics)]
            for row in summary.configurations]
    return header, rows


def prompts_and_seeds(summary: EvaluationSummary) -> str:
    facts = summary.facts
    return (f"{facts['prompts']} prompts x {len(facts['seeds'])} seeds ({', '.join(map(str, facts['seeds']))}) "
            f"from {facts['prompt_file']}")


def run_line(summary: EvaluationSummary) -> str:
    facts = summary.facts
    settings = ", ".join(f"{key} {value}" for key, value in facts["settings"].items() if value is not None)
    return (f"{facts['model']} ({facts['weights']}), {facts['height']}x{facts['width']}, {facts['dtype']}, "
            f"{settings}; {prompts_and_seeds(summary)}")


def metric_lines(summary: EvaluationSummary) -> list[str]:
    ran = ", ".join(f"{m} ({METRICS[m].summary})" for m in summary.metrics)
    skipped = "; ".join(f"{m}: {why}" for m, why in summary.skipped.items())
    return [f"Metrics: {ran}.", f"Did not run: {skipped}." if skipped else "Every metric ran."]


def markdown_table(table: Table) -> str:
    header, rows = table
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(summary: EvaluationSummary) -> str:
    """summary.md."""
    prompts = summary.facts["prompts"]
    parts = [
        "# AccelAes against dense", "", run_line(summary), "", *metric_lines(summary), "",
        markdown_table(means_table(summary)), "",
        "Seconds: per image, from text encoding to the decoded picture (a batch's time divided among its "
        "images), dense and AccelAes made in the same process; speedup: dense's over AccelAes' on the same "
        "images. Means: each prompt's seeds averaged first, then over prompts.", "",
        f"## AccelAes minus dense, mean over {prompts} prompts and its 95% confidence interval", "",
        markdown_table(differences_table(summary)), "",
        "Δ: AccelAes minus dense, each prompt's seeds averaged first, Student's t over prompts "
        "(metrics/stats.py). PSNR and SSIM compare each AccelAes picture with the dense one: their mean "
        "and its interval.",
    ]
    if summary.notes:
        parts += ["", "Notes:", "", *(f"- {note}" for note in summary.notes)]
    return "\n".join(parts) + "\n"
