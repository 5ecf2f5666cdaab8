"""Where a finished run's time went: rollout, update and evaluation, read from the run's own logs.

    python scripts/run_cost.py runs/mt10_reduced/*__s1          # one table row per run

Per iteration the run logs ``charts/wall_clock_s`` (after the update, before any evaluation) and
``charts/rollout_SPS`` (the iteration's samples over its rollout time); ``eval.jsonl`` stamps each evaluation's
end with ``wall_clock``. So, with B samples per iteration:

- rollout of iteration k = B / rollout_SPS_k;
- evaluation at step s = its ``wall_clock`` minus ``charts/wall_clock_s`` at s;
- update of iteration k = (wall_k - wall_{k-1}) - rollout_k - the evaluation that ran between them (if any);
  checkpoint writes and per-iteration logging are counted in it;
- set-up = wall_1 - rollout_1 - the median update (env and network construction before the first iteration).

The table gives medians per iteration (robust to a machine that is busy for a moment), the mean evaluation, the
run's wall clock, and training SPS = B / (rollout + update). A resumed run continues its checkpoint's clock (the
time between that checkpoint and the interruption is not counted); runs resumed by older code restarted theirs,
and such a drop is skipped and the row marked "resumed".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from mtrl.run import read_jsonl  # noqa: E402  (the readers the tests and the other scripts use)
from mtrl.run import read_scalars as scalars  # noqa: E402


def phase_times(run_dir: Path) -> dict:
    """Per-iteration rollout and update seconds, per-evaluation seconds and the set-up time of one run."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise SystemExit(f"error: {run_dir}: not a run directory (no config.json)")
    batch = json.loads((run_dir / "config.json").read_text())["derived"]["batch_size"]
    tags = scalars(run_dir)
    if "charts/wall_clock_s" not in tags or "charts/rollout_SPS" not in tags:
        raise SystemExit(f"error: {run_dir}: no TensorBoard scalars charts/wall_clock_s and charts/rollout_SPS (event files not kept?)")
    wall = tags["charts/wall_clock_s"]
    rollout = [batch / v for _, v in tags["charts/rollout_SPS"]]
    wall_at = dict(wall)
    evals = read_jsonl(run_dir / "eval.jsonl") if (run_dir / "eval.jsonl").is_file() else []
    eval_s = {e["global_step"]: e["wall_clock"] - wall_at[e["global_step"]] for e in evals if e["global_step"] in wall_at}
    resumed = any(b[1] < a[1] for a, b in zip(wall, wall[1:]))
    update = []
    for k in range(1, len(wall)):
        (prev_step, prev_wall), (_, now_wall) = wall[k - 1], wall[k]
        if now_wall < prev_wall:  # a resumed run restarts its clock
            continue
        update.append(now_wall - prev_wall - rollout[k] - eval_s.get(prev_step, 0.0))
    median_update = statistics.median(update) if update else float("nan")
    return {"run": run_dir.name, "batch": batch, "iterations": len(wall), "rollout_s": statistics.median(rollout),
            "update_s": median_update, "evaluations": len(eval_s), "eval_s": statistics.mean(eval_s.values()) if eval_s else float("nan"),
            "setup_s": wall[0][1] - rollout[0] - median_update, "wall_clock_h": max(e["wall_clock"] for e in evals) / 3600 if evals else wall[-1][1] / 3600,
            "resumed": resumed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="finished run directories (with their TensorBoard event files)")
    a = p.parse_args()
    rows = [phase_times(r) for r in a.runs]
    print("| run | samples / iteration | iterations | rollout s | update s | training SPS | evaluations | eval s each | set-up s | wall clock h |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        sps = r["batch"] / (r["rollout_s"] + r["update_s"])
        print(f"| {r['run']}{' (resumed)' if r['resumed'] else ''} | {r['batch']:,} | {r['iterations']} | {r['rollout_s']:.1f} | {r['update_s']:.1f} | "
              f"{sps:,.0f} | {r['evaluations']} | {r['eval_s']:.1f} | {r['setup_s']:.1f} | {r['wall_clock_h']:.2f} |")
    print("\nrollout and update: medians per iteration; eval: mean per evaluation; wall clock: to the last evaluation (scripts/run_cost.py).")


if __name__ == "__main__":
    main()
