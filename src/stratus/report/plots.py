"""The report's panels as matplotlib figures (Agg: no screen needed). Several runs share each
panel's axes, one colour per run."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from stratus.report.run import Run  # noqa: E402
from stratus.report.timeline import CATEGORIES, Timeline  # noqa: E402

COLOURS = plt.rcParams["axes.prop_cycle"].by_key()["color"]
SEGMENT_COLOURS = {
    "start-up": "#9e9e9e",
    "productive": "#2e7d32",
    "recomputed": "#ef6c00",
    "checkpoint": "#1565c0",
    "down": "#c62828",
}
MARKER_STYLE = {  # kind -> (colour, line style)
    "fault": ("#6a1b9a", "-"),
    "restart": ("#c62828", "--"),
    "hang": ("#000000", ":"),
    "checkpoint_saved": ("#1565c0", ":"),
    "checkpoint_failed": ("#1565c0", "-"),
    "skipped_nonfinite": ("#ef6c00", "-."),
    "rollback": ("#d81b60", "-"),
}
NOT_MEASURED = {"mfu": "not measured: no known peak FLOP/s\nfor this device (log.peak_tflops)"}
CHAT_STATS = ("reward_margin", "preference_accuracy", "chosen_reward", "rejected_reward")


def finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _colour(i: int) -> str:
    return COLOURS[i % len(COLOURS)]


def _finish(fig: Figure, axes) -> Figure:
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def loss_figure(runs: list[Run], against: str = "step", width: float = 9) -> Figure:
    """Training and validation loss against step (or tokens), the unigram baseline dashed
    grey: a model below it has learned more than token frequencies."""
    fig, ax = plt.subplots(figsize=(width, 4))
    baselines: set[float] = set()
    skip_labelled = False
    for i, run in enumerate(runs):
        lw = 3.0 if i == 0 and len(runs) > 1 else 1.5  # a later run drawn over the first stays visible
        x_key = "step" if against == "step" else "tokens_seen"
        rows = [r for r in run.trajectory() if finite(r.get("loss")) and x_key in r]
        ax.plot(
            [r[x_key] for r in rows],
            [r["loss"] for r in rows],
            color=_colour(i),
            lw=lw,
            label=f"{run.label} loss",
        )
        val_rows = [r for r in run.trajectory() if isinstance(r.get("val_loss"), (int, float)) and x_key in r]
        steps, val = [r[x_key] for r in val_rows], [r["val_loss"] for r in val_rows]
        if val:
            ax.plot(
                steps,
                val,
                color=_colour(i),
                ls="--",
                lw=lw,
                marker="o",
                ms=3,
                label=f"{run.label} validation",
            )
        if against == "step":
            for e in run.events("skipped_nonfinite"):
                ax.axvline(
                    e["step"],
                    color="#ef6c00",
                    ls="-.",
                    lw=1,
                    label=None if skip_labelled else "skipped (non-finite)",
                )
                skip_labelled = True
            spikes = [r for r in run.metrics if r.get("spike")]
            if spikes:
                ax.scatter(
                    [r["step"] for r in spikes],
                    [r["loss"] for r in spikes],
                    marker="x",
                    color="#d81b60",
                    zorder=3,
                    label=f"{run.label} spike (rolled back)",
                )
        baseline = run.start.get("unigram_baseline")
        if baseline and baseline not in baselines:
            baselines.add(baseline)
            ax.axhline(baseline, color="grey", ls=":", lw=1, label="unigram baseline")
    ax.set_xlabel("step" if against == "step" else "tokens seen")
    ax.set_ylabel("loss (nats)")
    ax.set_title("Loss against " + ("step" if against == "step" else "tokens"))
    return _finish(fig, [ax])


def _multi(runs: list[Run], keys: list[tuple[str, str]], title: str) -> Figure:
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys, strict=True):
        drawn = False
        for i, run in enumerate(runs):
            steps, values = run.series(key)
            if values:
                ax.plot(
                    steps, values, color=_colour(i), label=run.label, marker="." if len(values) < 30 else None
                )
                drawn = True
        if not drawn:
            ax.text(
                0.5,
                0.5,
                NOT_MEASURED.get(key, "not in metrics.jsonl"),
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="#666",
                wrap=True,
            )
        ax.set_title(label)
        ax.set_xlabel("step")
    fig.suptitle(title)
    return _finish(fig, axes[0])


def optimizer_figure(runs: list[Run]) -> Figure:
    return _multi(
        runs, [("lr", "learning rate"), ("grad_norm", "gradient norm")], "Learning rate and gradient norm"
    )


def throughput_figure(runs: list[Run]) -> Figure:
    keys = [("tokens_per_s", "tokens/s"), ("mfu", "MFU"), ("memory_gb", "peak memory (GB)")]
    return _multi(runs, keys, "Throughput, MFU and memory")


def chat_figure(runs: list[Run]) -> Figure | None:
    keys = [(k, k.replace("_", " ")) for k in CHAT_STATS if any(run.series(k)[1] for run in runs)]
    return _multi(runs, keys, "Preference tuning (DPO)") if keys else None


def timeline_figure(runs: list[Run], timelines: list[Timeline | None]) -> Figure:
    """One row per run: wall time by category, and a line at every marker (legend below)."""
    rows = [(r, t) for r, t in zip(runs, timelines, strict=True) if t is not None]
    fig, ax = plt.subplots(figsize=(11, 2.2 + 0.9 * max(1, len(rows))))
    kinds_seen: set[str] = set()
    for y, (_, tl) in enumerate(rows):
        for category in CATEGORIES:
            spans = [
                (s.start, s.end - s.start) for s in tl.segments if s.category == category and s.end > s.start
            ]
            if spans:
                ax.broken_barh(spans, (y - 0.35, 0.7), color=SEGMENT_COLOURS[category])
        for m in tl.markers:
            colour, style = MARKER_STYLE.get(m.kind, ("black", "-"))
            ax.plot([m.time, m.time], [y - 0.45, y + 0.45], color=colour, ls=style, lw=1.2)
            kinds_seen.add(m.kind)
    ax.set_yticks(range(len(rows)), [_row_label(r) for r, _ in rows])
    ax.set_ylim(len(rows) - 0.4, -0.6)  # the first run on top
    ax.set_xlabel("wall time since the run first started (s)")
    ax.set_title("Timeline: where the wall time went")
    handles = [Patch(color=SEGMENT_COLOURS[c], label=c) for c in CATEGORIES]
    handles += [
        Line2D([], [], color=MARKER_STYLE[k][0], ls=MARKER_STYLE[k][1], label=k.replace("_", " "))
        for k in MARKER_STYLE
        if k in kinds_seen
    ]
    ax.grid(axis="x", alpha=0.3)
    fig.legend(handles=handles, loc="lower center", ncol=min(7, len(handles)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.4 / fig.get_figheight(), 1, 1))
    return fig


def _row_label(run: Run) -> str:
    return f"{run.label}\nETTR {run.ettr:.1%}" if run.ettr is not None else run.label


def overview_png(runs: list[Run], timelines: list[Timeline | None], path) -> None:
    """The main panel as one PNG (for terminals and READMEs): loss above the timeline, drawn
    at one width and stacked."""
    images = []
    for fig in (loss_figure(runs, width=11), timeline_figure(runs, timelines)):
        fig.canvas.draw()
        images.append(np.asarray(fig.canvas.buffer_rgba())[..., :3])
        plt.close(fig)
    width = max(im.shape[1] for im in images)
    padded = [np.pad(im, ((0, 0), (0, width - im.shape[1]), (0, 0)), constant_values=255) for im in images]
    plt.imsave(path, np.concatenate(padded, axis=0))
