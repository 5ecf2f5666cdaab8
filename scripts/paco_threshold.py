"""PaCo's loss-maskout threshold from a calibration run (context/paco.md section 4; issue 15 item 2).

The rule: run PaCo with maskout off (``--maskout-threshold 0``) on the benchmark's tuning seed; ``paco/task_loss_max``
is, per iteration, the largest per-task loss L_t over the tasks and minibatches of that iteration. The threshold is
``FACTOR`` (10) times the 99th percentile of that per-iteration maximum over all iterations of the run(s), rounded up
to two significant digits. Maskout guards against a diverging task, not against the ordinary spikes of healthy
training, and a false positive costs the task its w (w-reset), hence a wide margin. The script prints the statistics
of the per-iteration maximum (as context/paco.md tabulates them), the rule's threshold, and the mask events if the
runs had maskout on.

    python scripts/paco_threshold.py runs/mt10_paco_calibration/paco_nomask__s101 --write-csv task_loss_max.csv
    python scripts/paco_threshold.py context/results/mt10_paco_calibration/task_loss_max.csv   # from the committed series

A CSV (``run,step,task_loss_max,mask_events``, as ``--write-csv`` writes it) stands in for a run's TensorBoard files,
which are not committed, so a committed calibration can be re-read from a clone.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

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


def series(run_dirs: list[Path]) -> list[tuple[str, int, float, float]]:
    """(run, step, paco/task_loss_max, paco/mask_events) per iteration of each run folder or CSV file."""
    from mtrl.run import read_scalars as scalars

    rows = []
    for d in run_dirs:
        if d.suffix == ".csv":
            with open(d, newline="") as f:
                rows += [(r["run"], int(r["step"]), float(r["task_loss_max"]), float(r["mask_events"])) for r in csv.DictReader(f)]
            continue
        tags = scalars(d)
        if "paco/task_loss_max" not in tags:
            raise SystemExit(f"error: {d}: no paco/task_loss_max scalars (not a ppo_paco run, or not started)")
        events = dict(tags.get("paco/mask_events", []))
        rows += [(d.name, step, v, events.get(step, 0.0)) for step, v in sorted(tags["paco/task_loss_max"])]
    return rows


def read(run_dirs: list[Path]) -> tuple[np.ndarray, int, int]:
    """The per-iteration ``paco/task_loss_max`` values of the runs, the number of runs, and their mask events."""
    rows = series(run_dirs)
    return np.asarray([r[2] for r in rows]), len({r[0] for r in rows}), int(sum(r[3] for r in rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+", help="ppo_paco run folders (their TensorBoard files) or CSV files from --write-csv")
    p.add_argument("--write-csv", type=Path, default=None, help="also write the per-iteration series to this CSV")
    a = p.parse_args()
    for d in a.runs:
        if not (d.is_dir() or (d.suffix == ".csv" and d.is_file())):
            raise SystemExit(f"error: {d}: no such run folder or CSV file")
    if a.write_csv:
        with open(a.write_csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["run", "step", "task_loss_max", "mask_events"])
            w.writerows(series(a.runs))
    x, n_runs, events = read(a.runs)
    print(f"paco/task_loss_max over {len(x)} iterations of {n_runs} run(s); mask events in these runs: {events}\n")
    print("| statistic of the per-iteration max | value |\n|---|---:|")
    for name, v in [("median", np.median(x)), ("90th percentile", np.percentile(x, 90)), ("99th percentile", np.percentile(x, QUANTILE)),
                    ("maximum", x.max())]:
        print(f"| {name} | {v:.4g} |")
    print(f"\nthreshold = round_up_2sig({FACTOR:g} x 99th percentile) = {threshold(x):g}  (--maskout-threshold)")


if __name__ == "__main__":
    main()
