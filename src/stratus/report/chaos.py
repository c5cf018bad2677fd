"""`stratus chaos … --report FILE.html`: the campaign as a report. The chaos run and the
fault-free reference share the loss axes (in deterministic mode the curves must coincide),
and a table gives each planned fault, when it fired and how long the run took to train again."""

from __future__ import annotations

import html
from pathlib import Path

from stratus.report.page import fmt, table, write_report
from stratus.report.run import read_run

ENDS_THE_PROCESS = {"kill", "hang", "crash_during_save", "hang_during_save"}
AFTERMATH = {  # the faults that leave the process running
    "nan": "none: the update was skipped on every rank",
    "corrupt_checkpoint": "none yet: the damaged checkpoint is refused at the next start",
    "spike": "none: rolled back to the last checkpoint",
}


def recoveries(chaos_dir: Path) -> list[dict]:
    """Each fault that fired, with the restart it caused (if any) and the seconds from the
    failure to the next start of training."""
    run = read_run(chaos_dir)
    starts = sorted(e["time"] for e in run.events("start"))
    failures = sorted(run.restarts, key=lambda r: r["time"])
    out = []
    for fault in run.faults:
        failure = next((f for f in failures if f["time"] >= fault.time), None)
        kind = fault.label.split()[0]
        row = {"fault": fault.label, "fired_s": fault.time - (run.first_start or fault.time)}
        if kind not in ENDS_THE_PROCESS:
            row["failure"] = AFTERMATH.get(kind)
        elif failure is not None:
            back = next((t for t in starts if t >= failure["time"]), None)
            row.update(failure=failure.get("failure"), resume_step=failure.get("resume_step"))
            row["recover_s"] = back - failure["time"] if back is not None else None
        out.append(row)
    return out


def write_chaos_report(result: dict, out: Path) -> tuple[Path, Path]:
    chaos, reference = Path(result["runs"]["chaos"]), Path(result["runs"]["reference"])
    rows = [
        [
            html.escape(r["fault"]),
            fmt(r["fired_s"], ".1f"),
            fmt(r.get("failure")),
            fmt(r.get("resume_step")),
            fmt(r.get("recover_s"), ".2f"),
        ]
        for r in recoveries(chaos)
    ]
    summary = (
        f"<p>{len(result['faults'])} faults planned; steps at which data was lost: {result['steps_lost']}; "
        f"final parameters bitwise equal to the fault-free run: <b>{result['bitwise_equal']}</b>; "
        f"ETTR {fmt(result['ettr'], '.1%')} over {result['restarts']} restarts; chaos run "
        f"{result['chaos_s']:.0f}s against {result['reference_s']:.0f}s fault-free.</p>"
    )
    extra = (
        "<section class=panel id=faults><h2>Faults and recovery</h2>"
        + summary
        + table(
            ["fault", "fired at (s)", "failure", "resumed from step", "back to training after (s)"],
            rows,
            "fault-table",
        )
        + "</section>"
    )
    html_path, png, _ = write_report(
        [reference, chaos],  # the fault-free curve drawn wide, the chaos run's over it
        out,
        title=f"stratus chaos: {len(result['faults'])} faults",
        labels=["fault-free", "chaos"],
        extra_html=extra,
    )
    return html_path, png
