#!/bin/bash
# Write the table of the cells finished in OUT (bayes-polar table --report-only) and copy it, the selection
# and every finished cell's metrics.json and config.json (machine paths removed) into DEST, so that a grid
# run over several sessions keeps its results.
#   benchmarks/save_table_records.sh [CONFIG [OUT [DEST]]]
# defaults: benchmarks/configs/smollm2_table.json, runs/table, benchmarks/results/smollm2_table.
# Continue in a new session:
#   mkdir -p runs/table && cp -r benchmarks/results/smollm2_table/{cells,select} runs/table/
#   bayes-polar table --config benchmarks/configs/smollm2_table.json --out runs/table --jobs 2
# Run from anywhere, with BAYES_POLAR_DATA pointing at the data mirror and bayes-polar on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
CONFIG=${1:-benchmarks/configs/smollm2_table.json}
OUT=${2:-runs/table}
DEST=${3:-benchmarks/results/smollm2_table}
bayes-polar table --config "$CONFIG" --out "$OUT" --report-only --quiet > /dev/null
mkdir -p "$DEST"
# a task that left the grid leaves no figure behind; a task whose cells here have no saved predictions (all
# copied from another clone) keeps its committed figure
python - "$CONFIG" "$DEST" <<'PY'
import json, pathlib, sys
tasks = json.load(open(sys.argv[1]))["tasks"]
for figure in pathlib.Path(sys.argv[2]).glob("reliability_*.png"):
    if figure.stem[len("reliability_"):] not in tasks:
        figure.unlink()
PY
for f in results.csv table.md selection.csv selected.json "$OUT"/reliability_*.png; do
  f=$(basename "$f")
  if [ -f "$OUT/$f" ]; then cp "$OUT/$f" "$DEST/"; fi
done
rm -rf "$DEST/cells" "$DEST/select"
{ (cd "$OUT" && find cells select -name metrics.json 2>/dev/null) || true; } | while read -r record; do
  cell=$(dirname "$record")
  mkdir -p "$DEST/$cell"
  cp "$OUT/$record" "$DEST/$cell/metrics.json"
  python - "$OUT/$cell/config.json" "$DEST/$cell/config.json" <<'PY'
import json, sys
config = json.load(open(sys.argv[1]))
config["cache_dir"] = None  # a machine path; the grid sets it again (the cell's --cache-dir is not compared)
with open(sys.argv[2], "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write("\n")
PY
done
if [ -f "$DEST/results.csv" ]; then python benchmarks/table_targets.py "$DEST/results.csv" > "$DEST/targets.txt"; fi
if grep -rlE '"/(root|home|work|tmp)/' "$DEST"; then echo "machine paths left in $DEST" >&2; exit 1; fi
echo "saved $(find "$DEST" -path "*cells*" -name metrics.json | wc -l) cells and $(find "$DEST" -path "*select*" -name metrics.json | wc -l) selection runs into $DEST"
