"""`stratus report RUN [RUN…] [--out FILE.html]`: flags, and the verb. src/stratus/cli.py
registers it with add_parser(verbs)."""

from __future__ import annotations

from pathlib import Path

from stratus.errors import StratusError


def add_parser(subparsers) -> None:
    sp = subparsers.add_parser(
        "report",
        help="one offline HTML page (and a PNG) of a run, or several overlaid",
        description="Loss and validation loss against step and tokens, learning rate, gradient norm, "
        "tokens/s, MFU, memory, and a timeline of where the wall time went with every restart, fault, "
        "hang dump, skipped step, rollback and checkpoint marked; the config, layout and hardware. "
        "Several RUNs share the axes. Writes FILE.html (self-contained, opens offline) and FILE.png.",
    )
    sp.add_argument("runs", nargs="+", metavar="RUN", help="run directories (run.dir)")
    sp.add_argument(
        "--out", help="HTML file to write (default: FIRST_RUN/report.html); the PNG goes beside it"
    )
    sp.add_argument("--title", help="page title (default: the runs' names)")
    sp.add_argument(
        "--label", action="append", help="a name per RUN, in order (default: each directory's name)"
    )
    sp.set_defaults(func=cmd_report)


def cmd_report(args, overrides) -> int:
    from stratus.report.page import write_report

    paths = [Path(p) for p in args.runs]
    if args.label and len(args.label) != len(paths):
        raise StratusError(f"--label given {len(args.label)} times for {len(paths)} runs: give one per RUN")
    out = Path(args.out) if args.out else paths[0] / "report.html"
    if out.suffix.lower() not in (".html", ".htm"):
        raise StratusError(f"--out {out}: the report is HTML; give a file name ending in .html")
    html, png, runs = write_report(paths, out, args.title, args.label)
    for run in runs:
        for gap in run.gaps:
            print(f"stratus report: {run.label}: {gap}")
    print(f"report: {html}\nmain panel: {png}")
    return 0
