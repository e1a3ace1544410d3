#!/usr/bin/env bash
# The engine end to end on the real SmolLM2-135M (CPU: about 8 minutes on 2 cores).
# 1. PT on four related category tasks, 2. MSF finds a 4-dim subspace from their prompts,
# 3. IST learns a new category task as 4 floats, 4. test accuracy: no prompt vs z = 0 vs IST.
set -euo pipefail
cd "$(dirname "$0")/.."
IPT=.venv/bin/ipt
OUT=${OUT:-runs/demo}
.venv/bin/python -m ipt_engine.testing "$OUT"
$IPT pt "$OUT/related.jsonl" --out "$OUT/pt" --n-prompt 10 --lr 0.1 --max-steps 40 --batch-size 6 --eval-every 10 --patience 2
$IPT msf "$OUT/related.jsonl" --prompts "$OUT/pt/prompts.safetensors" --out "$OUT/subspace" \
  --d-intrinsic 4 --d-hidden 64 --lr 3e-3 --max-steps 60 --batch-size 6 --eval-every 20 --patience 2
$IPT ist "$OUT/target.jsonl" --subspace "$OUT/subspace" --out "$OUT/ist" --max-steps 30 --batch-size 12 \
  --eval-every 5 --patience 4
echo "== the new task without a prompt"
$IPT eval "$OUT/target.jsonl" --split test
echo "== the new task with its 4-float IST vector"
$IPT eval "$OUT/target.jsonl" --subspace "$OUT/subspace" --vectors "$OUT/ist/task_vectors.safetensors" --split test
