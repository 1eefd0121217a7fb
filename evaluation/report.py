"""report.html: one static page that opens from disk (no script, nothing from the web, links
relative to the output folder): the summary tables, then for every configuration its prompts,
the largest quality differences first, each seed as the dense picture, the AccelAes picture and
the mask picture side by side with their scores.

The order: by the headline metric that ran (ImageReward when it lands, then HPS v2.1,
PickScore, aesthetic, CLIP score), a prompt's |AccelAes - dense| averaged over its seeds; with
only PSNR and SSIM, the lowest similarity to dense first.
"""

from __future__ import annotations

import math
from collections import defaultdict
from html import escape
from urllib.parse import quote

from .results import EvaluationSummary, Pair
from .scoring import compares_with_dense
from .tables import Table, differences_table, means_table, metric_lines, number, run_line, title

SORT_ORDER = ("imagereward", "hps_v2.1", "pickscore", "aesthetic", "clip_score", "ssim", "psnr")

STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
section.prompt { border-top: 1px solid #ccc; padding-top: 0.5em; margin-top: 1.5em; }
div.seed { display: flex; gap: 1em; align-items: flex-start; margin: 0.5em 0; }
figure { margin: 0; }
figure img { height: 256px; width: auto; image-rendering: pixelated; display: block; }
figcaption { font-size: 0.85em; max-width: 40em; }
p.missing { width: 16em; color: #777; }
"""


def sort_metric(metrics: list[str], asked: str | None = None) -> str:
    """The metric prompts are ordered by: `asked`, else the first of SORT_ORDER that ran."""
    if asked is not None:
        return asked
    return next(m for m in [*SORT_ORDER, *metrics] if m in metrics)


def prompt_key(pairs: list[Pair], metric: str) -> float:
    """How far AccelAes is from dense on one prompt (its seeds averaged), larger first."""
    if compares_with_dense(metric):      # the lower the similarity to dense, the larger the difference
        values = [p.scores["accelaes"][metric] for p in pairs]
        key = -sum(values) / len(values)
    else:
        key = abs(sum(p.difference(metric) for p in pairs) / len(pairs))
    return key if not math.isnan(key) else -math.inf


def html_table(table: Table) -> str:
    header, rows = table
    head = "".join(f"<th>{escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>\n" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>"


def scores_text(scores: dict[str, float], metrics: list[str]) -> str:
    return ", ".join(f"{title(m)} {number(scores[m], m)}" for m in metrics if m in scores)


def figure(src: str | None, alt: str, caption: str, missing: str = "") -> str:
    if src is None:
        return f'<figure><p class="missing">{escape(missing)}</p><figcaption>{escape(caption)}</figcaption></figure>'
    return (f'<figure><a href="{quote(src)}"><img src="{quote(src)}" alt="{escape(alt)}" loading="lazy"></a>'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def seed_row(pair: Pair, metrics: list[str]) -> str:
    deltas = ", ".join(f"Δ {title(m)} {number(pair.difference(m), m, signed=True)}" for m in metrics
                       if not compares_with_dense(m))
    seconds = pair.seconds
    timing = (f"{seconds['accelaes']:.2f} s against {seconds['dense']:.2f} s dense"
              if seconds["accelaes"] and seconds["dense"] else "")
    fast = "; ".join(part for part in (scores_text(pair.scores["accelaes"], metrics), deltas, timing) if part)
    mask_missing = ("no focus mask in this configuration" if pair.aesmask is None
                    else "no mask picture: its image was made by an interrupted run (--overwrite makes it again)")
    return "\n".join([
        '<div class="seed">',
        figure(pair.files["dense"], f"dense, seed {pair.seed}",
               f"dense, seed {pair.seed}: {scores_text(pair.scores['dense'], metrics)}" if pair.scores["dense"]
               else f"dense, seed {pair.seed} (the reference of PSNR and SSIM)"),
        figure(pair.files["accelaes"], f"AccelAes, seed {pair.seed}", f"AccelAes, seed {pair.seed}: {fast}"),
        figure(pair.files["mask"], f"mask, seed {pair.seed}",
               f"the AccelAes picture, attention heat map, focus tokens; AesMask: {pair.aesmask}", mask_missing),
        "</div>"])


def prompt_section(rank: int, pairs: list[Pair], metrics: list[str], order: str) -> str:
    key = prompt_key(pairs, order)
    measure = (f"mean {title(order)} {number(-key, order)}" if compares_with_dense(order)
               else f"|Δ {title(order)}| {number(key, order)} (mean over seeds)")
    rows = "\n".join(seed_row(pair, metrics) for pair in sorted(pairs, key=lambda p: p.seed))
    return (f'<section class="prompt">\n<h3>{rank}. {escape(pairs[0].prompt)}</h3>\n'
            f"<p>{escape(measure)}</p>\n{rows}\n</section>")


def configuration_section(name: str, configuration_title: str, pairs: list[Pair], metrics: list[str],
                          order: str) -> str:
    by_prompt: dict[int, list[Pair]] = defaultdict(list)
    for pair in pairs:
        by_prompt[pair.prompt_index].append(pair)
    ranked = sorted(by_prompt.values(), key=lambda group: prompt_key(group, order), reverse=True)
    sections = "\n".join(prompt_section(rank, group, metrics, order) for rank, group in enumerate(ranked, 1))
    how = ("lowest first" if compares_with_dense(order) else "largest |AccelAes - dense| first")
    return (f'<h2 id="{escape(name)}">{escape(configuration_title)}: prompts by {escape(title(order))}, '
            f"{how}</h2>\n{sections}")


def report_html(summary: EvaluationSummary, pairs: list[Pair], order: str) -> str:
    """The whole page."""
    contents = "".join(f'<li><a href="#{escape(c.name)}">{escape(c.title)}</a></li>' for c in summary.configurations)
    sections = "\n".join(configuration_section(c.name, c.title, [p for p in pairs if p.configuration == c.name],
                                               summary.metrics, order) for c in summary.configurations)
    notes = "".join(f"<li>{escape(note)}</li>" for note in summary.notes)
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">',
        f'<head>\n<meta charset="utf-8">\n<title>AccelAes against dense</title>\n<style>{STYLE}</style>\n</head>',
        "<body>", "<h1>AccelAes against dense</h1>", f"<p>{escape(run_line(summary))}</p>",
        *(f"<p>{escape(line)}</p>" for line in metric_lines(summary)),
        html_table(means_table(summary)),
        f"<h2>AccelAes minus dense: mean over {summary.facts['prompts']} prompts and its 95% confidence "
        "interval</h2>", html_table(differences_table(summary)),
        f"<ul>{notes}</ul>" if notes else "", f"<ul>{contents}</ul>", sections, "</body>", "</html>", ""])
