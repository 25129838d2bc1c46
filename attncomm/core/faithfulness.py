"""Faithfulness of circuits, MIB's edge budgets, and the areas CPR and CMD (pure functions).

Faithfulness of a circuit ``C`` is ``(m(C) - m(empty)) / (m(full) - m(empty))`` where ``m`` is the task
metric averaged over the prompts, ``m(full)`` the unablated model and ``m(empty)`` the model with every
edge ablated (for patching ablation: the corrupted run). It is 1 for the whole model and 0 for the empty
circuit.

The curve is faithfulness at MIB's edge budgets, the fractions ``0.001, 0.002, 0.005, 0.01, 0.02, 0.05,
0.1, 0.2, 0.5, 1`` of all edges (``int(fraction * n_edges)`` edges, then pruned). As in MIB's
``evaluate_area_under_curve``:

- CPR (circuit performance ratio, higher is better) is the area under the curve,
- CMD (circuit-model distance, lower is better) is the area between the curve and 1, ``|1 - f|``,

both by the trapezoidal rule over consecutive budgets with ``x`` the budget fraction itself (MIB's
default; ``log_x=True`` integrates over ``log(fraction)`` instead, MIB's ``log_scale`` option). With
linear ``x`` the budgets span ``[0.001, 1]``, so a perfect circuit at every budget has CPR ``0.999`` and
CMD ``0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: MIB's edge budgets, in percent of all edges
MIB_BUDGETS_PERCENT: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)


def normalized_faithfulness(circuit: float, clean: float, empty: float) -> float:
    """``(circuit - empty) / (clean - empty)``; NaN when clean and empty agree (nothing to recover)."""
    denominator = clean - empty
    if denominator == 0:
        return float("nan")
    return (circuit - empty) / denominator


def _trapezoid(xs: Sequence[float], ys: Sequence[float]) -> float:
    return sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2.0 for i in range(len(xs) - 1))


def curve_areas(
    budgets_percent: Sequence[float], faithfulness: Sequence[float], log_x: bool = False
) -> tuple[float, float]:
    """``(CPR, CMD)`` of a faithfulness curve (see the module docstring for the integration rule)."""
    if len(budgets_percent) != len(faithfulness):
        raise ValueError(
            f"{len(budgets_percent)} budgets but {len(faithfulness)} faithfulness values; give one per budget"
        )
    if len(budgets_percent) < 2:
        raise ValueError("the areas need at least two budgets")
    if any(b2 <= b1 for b1, b2 in zip(budgets_percent, budgets_percent[1:], strict=False)):
        raise ValueError(f"budgets must increase strictly, got {list(budgets_percent)}")
    xs = [b / 100.0 for b in budgets_percent]
    if log_x:
        xs = [math.log(x) for x in xs]
    cpr = _trapezoid(xs, list(faithfulness))
    cmd = _trapezoid(xs, [abs(1.0 - f) for f in faithfulness])
    return cpr, cmd
