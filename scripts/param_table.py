"""Parameter counts of every method of every benchmark config, as markdown (protocol.md section 4).

For each config's ``[methods]`` presets: active parameters per task (what capacity is matched on, within
5% of ppo_mtl_embed's), the merged inference network of one task, and the total stored parameters.

    python scripts/param_table.py                         # every configs/*.toml with a [methods] table
    python scripts/param_table.py configs/metaworld_mt10.toml
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from mtrl.capacity import count_params, make_args  # noqa: E402
from mtrl.run import parse_args  # noqa: E402


def preset_args(algo: str, config: Path, flags: list[str]):
    """The Args a launcher preset runs with: the config, then the preset's flags, parsed as the script does."""
    from mtrl.capacity import algo_module

    return parse_args(algo_module(algo).Args, algo, argv=["--config", str(config), *flags])


def table(config: Path) -> str:
    methods = tomllib.loads(config.read_text()).get("methods", {})
    ref = count_params("ppo_mtl_embed", make_args("ppo_mtl_embed", str(config)))["active_per_task"]
    lines = [f"**{config.name}** (reference: ppo_mtl_embed, {ref:,} active per task)", "",
             "| method | algo | hidden | active per task | vs reference | inference (one task) | total stored |", "|---|---|---|---:|---:|---:|---:|"]
    for label, (algo, *flags) in methods.items():
        args = preset_args(algo, config, flags)
        c = count_params(algo, args)
        lines.append(f"| {label} | {algo} | {'x'.join(map(str, args.hidden_sizes))} | {c['active_per_task']:,} | "
                     f"{100 * (c['active_per_task'] / ref - 1):+.1f}% | {c['inference']:,} | {c['total']:,} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="*", type=Path)
    a = p.parse_args()
    configs = a.configs or sorted(c for c in (REPO / "configs").glob("*.toml") if "methods" in tomllib.loads(c.read_text()))
    for c in configs:
        if not c.is_file():
            raise SystemExit(f"error: {c}: no such config")
        print(table(c))


if __name__ == "__main__":
    main()
