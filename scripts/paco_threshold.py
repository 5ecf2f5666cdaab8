"""PaCo's loss-maskout threshold from a calibration run (context/paco.md section 4; issue 15 item 2).

The rule: run PaCo with maskout off (``--maskout-threshold 0``) on the benchmark's tuning seed; ``paco/task_loss_max``
is, per iteration, the largest per-task loss L_t over the tasks and minibatches of that iteration. The threshold is
``FACTOR`` (10) times the 99th percentile of that per-iteration maximum over all iterations of the run(s), rounded up
to two significant digits. Maskout guards against a diverging task, not against the ordinary spikes of healthy
training, and a false positive costs the task its w (w-reset), hence a wide margin. The script prints the statistics
of the per-iteration maximum (as context/paco.md tabulates them), the rule's threshold, and the mask events if the
runs had maskout on.

    python scripts/paco_threshold.py runs/mt10_paco_calibration/paco_nomask__s101
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

FACTOR = 10.0
QUANTILE = 99.0


def round_up_2sig(x: float) -> float:
    """The smallest number with two significant digits that is >= x (0.123 -> 0.13, 1234 -> 1300)."""
    if x <= 0:
        return 0.0
    step = 10.0 ** (math.floor(math.log10(x)) - 1)
    return math.ceil(round(x / step, 9)) * step


def threshold(task_loss_max: np.ndarray) -> float:
    return round_up_2sig(FACTOR * float(np.percentile(task_loss_max, QUANTILE)))


def read(run_dirs: list[Path]) -> tuple[np.ndarray, int, int]:
    """The per-iteration ``paco/task_loss_max`` values of the runs, the number of runs, and their mask events."""
    from conftest import scalars

    values, events = [], 0
    for d in run_dirs:
        tags = scalars(d)
        if "paco/task_loss_max" not in tags:
            raise SystemExit(f"error: {d}: no paco/task_loss_max scalars (not a ppo_paco run, or not started)")
        values += [v for _, v in sorted(tags["paco/task_loss_max"])]
        events += int(sum(v for _, v in tags.get("paco/mask_events", [])))
    return np.asarray(values), len(run_dirs), events


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+", help="ppo_paco run folders (their TensorBoard files)")
    a = p.parse_args()
    for d in a.runs:
        if not d.is_dir():
            raise SystemExit(f"error: {d}: no such run folder")
    x, n_runs, events = read(a.runs)
    print(f"paco/task_loss_max over {len(x)} iterations of {n_runs} run(s); mask events in these runs: {events}\n")
    print("| statistic of the per-iteration max | value |\n|---|---:|")
    for name, v in [("median", np.median(x)), ("90th percentile", np.percentile(x, 90)), ("99th percentile", np.percentile(x, QUANTILE)),
                    ("maximum", x.max())]:
        print(f"| {name} | {v:.4g} |")
    print(f"\nthreshold = round_up_2sig({FACTOR:g} x 99th percentile) = {threshold(x):g}  (--maskout-threshold)")


if __name__ == "__main__":
    main()
