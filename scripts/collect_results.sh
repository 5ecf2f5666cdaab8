#!/usr/bin/env bash
# Copy a study's small run files into the repository, so its tables and figures can be regenerated from a
# clone and the study can later grow by more seeds instead of starting over:
#   bash scripts/collect_results.sh runs/<study> context/results/<study>
# Per finished run (a summary.json): config.json (with the repository's absolute path made relative), eval.jsonl, summary.json; and the sweep's grid.tsv, merged into DEST's
# (the report names the runs of the grid that are missing). Checkpoints, TensorBoard files and logs stay out.
# Then: .venv/bin/python scripts/report.py --runs-dir context/results/<study> --out context/results/<study>/report
set -euo pipefail
[ $# = 2 ] || { echo "usage: bash scripts/collect_results.sh RUNS_DIR DEST (e.g. runs/targets_mt10 context/results/targets_mt10)" >&2; exit 2; }
src=$1 dest=$2
repo=$(cd "$(dirname "$0")/.." && pwd)
origin=$(git -C "$src" rev-parse --show-toplevel 2>/dev/null || echo "$repo")   # the checkout the runs were made in
[ -d "$src" ] || { echo "collect_results.sh: error: runs dir '$src' does not exist" >&2; exit 2; }
mkdir -p "$dest"
n=0
for summary in "$src"/*/summary.json; do
  [ -f "$summary" ] || continue
  run=$(dirname "$summary"); name=$(basename "$run")
  case "$name" in *.incomplete-*) continue;; esac
  mkdir -p "$dest/$name"
  cp "$run/summary.json" "$dest/$name/"
  sed -e "s#$origin/##g" -e "s#$repo/##g" "$run/config.json" >"$dest/$name/config.json"   # paths relative to the checkout, not this machine's
  [ ! -f "$run/eval.jsonl" ] || cp "$run/eval.jsonl" "$dest/$name/"
  n=$((n + 1))
done
if [ -f "$src/grid.tsv" ]; then   # merged into DEST's grid: a study collected from several runs dirs (or machines) keeps every row
  new=$(sed -e "s#$origin/##g" -e "s#$repo/##g" "$src/grid.tsv")   # LOO rows name --init-from paths
  old=""; [ ! -f "$dest/grid.tsv" ] || old=$(cat "$dest/grid.tsv")
  # rows of DEST in their order (a run in both takes the new row), then the new runs
  printf '%s\n%s\n' "$old" "$new" | awk -F'\t' '$0 != "" { if (!($1 in row)) order[++n] = $1; row[$1] = $0 }
                                                END { for (i = 1; i <= n; i++) print row[order[i]] }' >"$dest/grid.tsv.tmp"
  mv "$dest/grid.tsv.tmp" "$dest/grid.tsv"
fi
echo "copied $n finished runs from $src to $dest"
