#!/usr/bin/env bash
# pipeline.sh [MODEL [LAYER]] — every stage in order, each with its own defaults:
# toy pretraining (toy only), scan, cache, train, evaluate, relie, ablate.
#   bash pipeline.sh                 # the toy model, offline, a few minutes on a laptop CPU
#   bash pipeline.sh pythia-1b 8     # the paper's Pythia run (GPU box with network)
set -euo pipefail
cd "$(dirname "$0")"
MODEL=${1:-toy}
LAYER=${2:-}
L=()
if [ -n "$LAYER" ]; then L=(--layer "$LAYER"); fi

if [ "$MODEL" = toy ]; then
  echo "== toy: pretrain the toy LM (models/toy)"
  python toy.py
fi
echo "== scan: accuracy and layer similarity over revisions (scans/)"
python cache_acts.py --scan --suggest --model "$MODEL" "${L[@]}"
if [ "$MODEL" = toy ]; then
  echo "== cache: layer activations of the triplet (cache/)"
  python cache_acts.py --model "$MODEL" "${L[@]}"
else
  echo "== cache: skipped — the paper's 400M tokens × 3 revisions do not fit on disk; train.py runs a live buffer"
fi
echo "== train: one crosscoder over the triplet (runs/)"
OUT=$(python -c "import sys, lm, train; a = train.parse_args(sys.argv[1:]); print(train.resolve_defaults(a, lm.resolve(a.model)).out)" --model "$MODEL" "${L[@]}")
if [ -f "$OUT/config.json" ] && [ -f "$OUT/DONE" ]; then
  echo "   $OUT is already trained; keeping it (delete it to train again)"
elif [ -d "$OUT/ckpt" ]; then
  python train.py --model "$MODEL" "${L[@]}" --resume
else
  python train.py --model "$MODEL" "${L[@]}" --overwrite
fi
echo "== evaluate: FVU, L0, dead, ΔCE, RelDec, latent scaling"
python evaluate.py --run "$OUT"
echo "== relie: IE per latent per revision, RelIE, contexts"
python relie.py --run "$OUT"
echo "== ablate: top-k vs random-k latents"
python ablate.py --run "$OUT"
echo
echo "outputs: scans/  cache/  $OUT/ (eval.json, latents.csv, relie/, ablation/)"
echo "browse them:  streamlit run app.py"
