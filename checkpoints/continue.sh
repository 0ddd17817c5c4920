#!/usr/bin/env bash
# Continue training MODEL from its committed checkpoint for one time-limited segment.
#
#   checkpoints/continue.sh MODEL [OUTPUT_DIR] [BATCH_SIZE]
#
# MODEL is a config in configs/ with a checkpoint folder here (generic2d, generic3d, lung3d;
# the config's "steps" must lie beyond the checkpoint's step: raise it first for lung3d). The segment ends with a checkpoint after MINUTES of wall time (default 8), so that a
# lent GPU's 10-minute call limit is never hit mid-step. OUTPUT_DIR (default .train/MODEL) then
# holds checkpoint.pt, log.csv (the committed log plus this segment's rows), loss.png and the
# model (MODEL.pt, MODEL.json): at most 5 files, what a lent machine's $OUT brings back. Copy
# them over checkpoints/MODEL/ and EquivariantRegistration/equireg/models/ (docs/models.md).
#
# It uses .venv/bin/python when there is one, else python3 with the repository on PYTHONPATH:
# the training path needs only torch, NumPy, tqdm and matplotlib, so it runs on a GPU machine's
# stock Python. On CUDA the forward pass runs under bf16 autocast (the config's "amp").
# WORKERS processes (default 0) generate the training pairs ahead of each step: the same pairs,
# so a run stays bit for bit; on a GPU they would otherwise bound the step (a 64³ pair takes
# about 0.6 s on one CPU core). On a lent H200 (checkpoints/README.md, "One segment, on the
# CPU or a lent GPU"):
#   MINUTES=8 WORKERS=12 checkpoints/continue.sh generic3d "$OUT/generic3d" 16
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: checkpoints/continue.sh MODEL [OUTPUT_DIR] [BATCH_SIZE]}
output=${2:-.train/$model}
batch=${3:-}
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
export PYTHONPATH="$PWD/EquivariantRegistration${PYTHONPATH:+:$PYTHONPATH}"
if [ ! -f "$output/checkpoint.pt" ] && [ ! -f "checkpoints/$model/checkpoint.pt" ]; then
  echo "checkpoints/continue.sh: no checkpoint for $model (checkpoints/$model/checkpoint.pt)" >&2
  exit 2
fi
mkdir -p "$output"
if [ ! -f "$output/checkpoint.pt" ]; then
  cp "checkpoints/$model/checkpoint.pt" "checkpoints/$model/log.csv" "$output/"
fi
"$python" -m equireg train "configs/$model.json" -o "$output" --device auto \
  --minutes "${MINUTES:-8}" ${batch:+--batch-size "$batch"} --workers "${WORKERS:-0}" \
  --progress none
