"""`stratus report RUN [RUN…]`: one self-contained HTML file (inline SVG panels, inline CSS,
no script and no network: it opens offline, and mails as one file) and a PNG of the main
panel beside it."""

from __future__ import annotations

import html
import io
import re
import time
from pathlib import Path
from typing import Any

from stratus.atomic import write_atomic
from stratus.report import plots
from stratus.report.run import Run, read_run
from stratus.report.timeline import CATEGORIES, Timeline, build_timeline

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1180px; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin: 1.4em 0 0.4em; }
.panel { border: 1px solid #ddd; border-radius: 6px; padding: 0.6em 1em; margin: 1em 0; }
.panel svg { width: 100%; height: auto; }
table { border-collapse: collapse; margin: 0.4em 0; } td, th { padding: 2px 10px; text-align: left; }
th { background: #f3f3f3; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.gap { background: #fff4e5; border-left: 4px solid #ef6c00; padding: 0.3em 0.8em; margin: 0.3em 0; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 12px; }
.muted { color: #666; }
"""


def write_report(
    paths: list[Path],
    out: Path,
    title: str | None = None,
    labels: list[str] | None = None,
    extra_html: str = "",
) -> tuple[Path, Path, list[Run]]:
    """Read the runs, write OUT (HTML) and OUT with .png (the main panel). Returns both
    paths and the runs read (their gaps say what was missing)."""
    runs = [read_run(p, label) for p, label in zip(paths, labels or [None] * len(paths), strict=True)]
    timelines = [build_timeline(r) for r in runs]
    png = out.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    plots.overview_png(runs, timelines, png)
    panels = [
        ("Loss", plots.loss_figure(runs)),
        ("Loss against tokens", plots.loss_figure(runs, against="tokens")),
        ("Learning rate and gradient norm", plots.optimizer_figure(runs)),
        ("Throughput, MFU and memory", plots.throughput_figure(runs)),
        ("Timeline", plots.timeline_figure(runs, timelines)),
    ]
    chat = plots.chat_figure(runs)  # DPO's statistics; SFT and DPO runs' `stratus eval --chat`
    if chat is not None or any(r.chat_evals for r in runs):
        panels.append(("Chat metrics", chat))
    body = [
        f"<h1>{html.escape(title or 'stratus report: ' + ', '.join(r.label for r in runs))}</h1>",
        f"<p class=muted>written {time.strftime('%Y-%m-%d %H:%M:%S')} from "
        + ", ".join(f"<code>{html.escape(str(r.path))}</code>" for r in runs)
        + "</p>",
        _summary_table(runs),
        *(f"<p class=gap><b>{html.escape(r.label)}</b>: {html.escape(g)}</p>" for r in runs for g in r.gaps),
        extra_html,
    ]
    for name, fig in panels:
        drawn = _svg(fig) if fig is not None else ""
        body.append(f"<section class=panel id={_slug(name)}><h2>{html.escape(name)}</h2>{drawn}")
        if name == "Timeline":
            body.append(_timeline_tables(runs, timelines))
        elif name == "Chat metrics":
            body.append(_chat_evals(runs))
        body.append("</section>")
    body.append(_configs(runs))
    page = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title or 'stratus report')}</title><style>{CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
    write_atomic(out, page)
    return out, png, runs


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    with plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": "stratus"}):
        fig.savefig(buf, format="svg")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and DOCTYPE: inline in HTML


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def fmt(v: Any, spec: str = "") -> str:
    if v is None or v == "":
        return "–"
    return format(v, spec) if spec and isinstance(v, (int, float)) else html.escape(str(v))


def _summary_table(runs: list[Run]) -> str:
    head = ["run", "steps", "loss", "val loss", "unigram", "ETTR", "restarts", "layout", "hardware", "params"]
    rows = []
    for run in runs:
        start, g = run.start, run.goodput
        last = next((r for r in reversed(run.trajectory()) if plots.finite(r.get("loss"))), {})
        val = run.series("val_loss")[1]
        hardware = f"{start.get('world_size', '?')} × {start.get('device', '?')}" if start else None
        rows.append(
            [
                fmt(run.label),
                fmt(max((r["step"] for r in run.metrics), default=None)),
                fmt(last.get("loss"), ".4f"),
                fmt(val[-1] if val else None, ".4f"),
                fmt(start.get("unigram_baseline"), ".3f"),
                fmt(run.ettr, ".1%"),
                fmt(g.get("restarts", len(run.restarts) if run.restarts else None)),
                fmt(start.get("layout")),
                fmt(hardware),
                fmt(start.get("params") and f"{start['params'] / 1e6:.2f}M"),
            ]
        )
    return table(head, rows, "summary")


def table(head: list[str], rows: list[list[str]], css_id: str) -> str:
    cells = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table id={css_id}><tr>{cells}</tr>{body}</table>"


def _timeline_tables(runs: list[Run], timelines: list[Timeline | None]) -> str:
    out = []
    for run, tl in zip(runs, timelines, strict=True):
        if tl is None:
            out.append(f"<p class=gap>{html.escape(run.label)}: no timed lines, so no timeline</p>")
            continue
        rows = [
            [html.escape(c), fmt(tl.total(c), ".1f"), fmt(run.goodput.get(field), ".1f")]
            for c, field in CATEGORIES.items()
        ]
        out.append(f"<h3>{html.escape(run.label)}: wall time, s</h3>")
        out.append(
            table(["", "drawn", "goodput.json (the trainer's count)"], rows, f"split-{_slug(run.label)}")
        )
        if tl.markers:
            marks = [
                [fmt(m.time, ".1f"), html.escape(m.kind.replace("_", " ")), html.escape(m.label)]
                for m in tl.markers
            ]
            out.append(table(["at (s)", "what", ""], marks, f"markers-{_slug(run.label)}"))
    return "\n".join(out)


def _chat_evals(runs: list[Run]) -> str:
    rows = []
    for run in runs:
        for e in run.chat_evals:
            rows.append(
                [
                    fmt(run.label),
                    fmt(e.get("step")),
                    fmt(e.get("val_loss"), ".3f"),
                    fmt(e.get("parses"), ".1%"),
                    fmt(e.get("pass_at_1"), ".1%"),
                    fmt(e.get("requests")),
                ]
            )
    if not rows:
        return ""
    return table(
        ["run", "step", "held-out chat loss", "answers that parse", "pass@1", "requests"], rows, "chat-eval"
    )


def _configs(runs: list[Run]) -> str:
    parts = []
    for run in runs:
        if run.config_text:
            parts.append(
                f"<details><summary>{html.escape(run.label)}: resolved config</summary>"
                f"<pre>{html.escape(run.config_text)}</pre></details>"
            )
    return "<section class=panel id=config><h2>Config</h2>" + "".join(parts) + "</section>" if parts else ""
