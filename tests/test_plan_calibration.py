"""Predicted step time beside every published row of ../shared/reference/planner-calibration.md.

One set of efficiency parameters for every row (stratus/plan/efficiency.py). The Megatron-Core
rows set the calibrated ones; Llama 3, BLOOM and MT-NLG are held out. The table printed here
is the one in docs/planning.md (`pytest -s` shows it).
"""

from __future__ import annotations

import pytest

from stratus.plan.calibration import ROWS, compare, table

CAL_TARGET = 0.10  # the issue: within 10% on calibration rows
HELD_MEDIAN, HELD_WORST = 0.10, 0.20  # the issue: held-out median within 10%, worst within 20%


@pytest.fixture(scope="module")
def comparisons():
    result = [compare(r) for r in ROWS]
    print("\n" + table(result))
    return result


def test_every_row_of_the_reference_is_predicted(comparisons):
    assert len(comparisons) == 15
    assert {c.row.role for c in comparisons} == {"calibration", "held-out"}
    for c in comparisons:
        assert c.predicted.fits, f"{c.row.label}: the published layout should fit in memory"
        lay = c.predicted.candidate
        if c.row.fixed.tp:
            assert (lay.tp, lay.pp, lay.dp) == (c.row.fixed.tp, c.row.fixed.pp, c.row.fixed.dp)


def test_calibration_rows_within_10_percent(comparisons):
    errors = {c.row.label: c.error for c in comparisons if c.row.role == "calibration"}
    assert len(errors) == 9
    bad = {k: f"{v:+.1%}" for k, v in errors.items() if abs(v) > CAL_TARGET}
    assert not bad, f"calibration rows outside 10%: {bad}"


def test_held_out_rows_within_target(comparisons):
    errors = sorted(abs(c.error) for c in comparisons if c.row.role == "held-out")
    assert len(errors) == 6
    median = (errors[2] + errors[3]) / 2
    assert median <= HELD_MEDIAN, f"held-out median |error| {median:.1%} > 10%"
    assert errors[-1] <= HELD_WORST, f"held-out worst |error| {errors[-1]:.1%} > 20%"


def test_published_step_times_are_derived_consistently():
    # Megatron 1.7B: 72 B s l h^2 (1 + s/6h + V/12hl) / (408.8 TFLOP/s x 48 GPUs) = 0.452 s
    row = ROWS[0]
    b, s, n_layers, h, v = 192, 4096, 24, 2048, 131072
    flops = 72 * b * s * n_layers * h * h * (1 + s / (6 * h) + v / (12 * h * n_layers))
    assert row.published_step_s(48) == pytest.approx(flops / (408.8e12 * 48), rel=1e-9)
    assert row.published_step_s(48) == pytest.approx(0.452, abs=0.001)
    # MT-NLG's 60.1 s at 2,240 GPUs is 126 hardware TFLOP/s with full recompute, as the paper says
    mt = ROWS[12]
    hw = 96 * 1920 * 2048 * 105 * 20480**2 * (1 + 2048 / (6 * 20480) + 51200 / (16 * 105 * 20480))
    assert hw / (60.1 * 2240) / 1e12 == pytest.approx(126, abs=1)
    assert mt.published_step_s(2240) == 60.1
