"""The measured seed distributions behind the learning tests' thresholds (tests/test_learning.py), as markdown.

    python scripts/learning_test_margins.py                                    # the committed runs
    python scripts/learning_test_margins.py --runs-dir runs/learning_tests     # a fresh measurement

The runs come from ``bash scripts/sweep.sh --config configs/toy_cartpole_targets_mt3.toml --methods
mtl_embed,varshare,l2soft,pcgrad,paco,softmod --seeds 1-10 -j 2 --runs-dir runs/learning_tests`` (and, for the
softmod test on toy/CartPole-MT10, ``--config configs/toy_cartpole_mt10.toml --methods softmod
--total-timesteps 1024000 --runs-dir runs/learning_tests_softmod``), copied with scripts/collect_results.sh. For each method: the test's metric on every seed, its minimum, how many seeds
miss the threshold, and the chance that a two-seed test (seed 1, then seed 2 if seed 1 misses) fails, if
seeds miss independently at the measured rate.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_learning import MT_TESTS, OFF_CENTRE, TASK_BLIND_CEILING  # noqa: E402


def off_centre_return(summary: dict) -> float:
    return sum(summary["final_return"][t] for t in OFF_CENTRE) / len(OFF_CENTRE)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-dir", type=Path, nargs="+",
                   default=[REPO / "context" / "results" / "learning_tests", REPO / "context" / "results" / "learning_tests_softmod"])
    a = p.parse_args()
    per = defaultdict(dict)
    for f in sorted(f for d in a.runs_dir for f in d.glob("*/summary.json")):
        s = json.loads(f.read_text())
        env_id = json.loads((f.parent / "config.json").read_text())["args"]["env_id"]
        label = f.parent.name.rsplit("__s", 1)[0]
        per[(env_id, label)][s["seed"] if "seed" in s else int(f.parent.name.rsplit("__s", 1)[1])] = s
    if not per:
        raise SystemExit(f"error: no finished run (summary.json) under {', '.join(map(str, a.runs_dir))}")
    print(f"toy/CartPole-Targets-MT3: mean evaluation return over {', '.join(OFF_CENTRE)}; any task-blind policy "
          f"scores at most {TASK_BLIND_CEILING:.1f}.\n")
    print("| method | seeds | per seed (1, 2, ...) | min | median | threshold | seeds below | P(two-seed test fails) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for (env_id, label), runs in sorted(per.items()):
        if env_id == "toy/CartPole-Targets-MT3":
            vals = [off_centre_return(runs[k]) for k in sorted(runs)]
            thr = MT_TESTS[label][1] if label in MT_TESTS else None
        else:  # softmod's test: mean success on toy/CartPole-MT10
            vals = [runs[k]["mean_success"] for k in sorted(runs)]
            thr = 0.6
        below = sum(v < thr for v in vals) if thr is not None else None
        rate = below / len(vals) if thr is not None else None
        fmt = (lambda v: f"{v:.0f}") if env_id == "toy/CartPole-Targets-MT3" else (lambda v: f"{v:.2f}")
        med = sorted(vals)[len(vals) // 2]
        print(f"| {label}{'' if env_id == 'toy/CartPole-Targets-MT3' else f' ({env_id}, mean success)'} | {len(vals)} | "
              f"{' '.join(fmt(v) for v in vals)} | {fmt(min(vals))} | {fmt(med)} | {'-' if thr is None else fmt(thr)} | "
              f"{'-' if below is None else below} | {'(not tested here)' if rate is None else f'{rate ** 2:.2f}'} |")


if __name__ == "__main__":
    main()
