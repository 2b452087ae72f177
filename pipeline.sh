#!/usr/bin/env bash
# pipeline.sh [MODEL [LAYER [FLAGS…]]] — every stage in order, each with its own defaults:
# toy pretraining (toy only), scan, cache (toy only), train, evaluate, relie, ablate.
#   bash pipeline.sh                              # the toy model, offline, ~2 minutes on 2 CPU cores
#   bash pipeline.sh pythia-1b 8                  # the paper's Pythia run (GPU box with network)
#   bash pipeline.sh pythia-160m 6 --weights random --tokens 16384 --batch-size 4096
#                                                 # the paper's shapes, random weights, offline
#   bash pipeline.sh toy 0 --device cuda          # the toy on a GPU box (toy.py --device cuda too)
# FLAGS go to the scan and to train.py (--weights, --tokens, --batch-size, --device, …), --device also to
# toy.py; the later stages read what they need from the run folder. PYTHON names the interpreter
# (default python3).
set -euo pipefail
cd "$(dirname "$0")"
python() { "${PYTHON:-python3}" "$@"; }
MODEL=${1:-toy}
LAYER=${2:-}
shift $(( $# < 2 ? $# : 2 ))
FLAGS=("$@")
L=()
if [ -n "$LAYER" ]; then L=(--layer "$LAYER"); fi
RANDOM_WEIGHTS=no
DEVICE=()
prev=
for f in "${FLAGS[@]}"; do
  if [ "$f" = random ]; then RANDOM_WEIGHTS=yes; fi
  if [ "$prev" = --device ]; then DEVICE=(--device "$f"); fi
  case "$f" in --device=*) DEVICE=(--device "${f#--device=}");; esac
  prev=$f
done

if [ "$MODEL" = toy ]; then
  echo "== toy: pretrain the toy LM (models/toy)"
  python toy.py "${DEVICE[@]}"
fi
if [ "$RANDOM_WEIGHTS" = no ]; then
  echo "== scan: accuracy and layer similarity over revisions (scans/)"
  python cache_acts.py --scan --suggest --model "$MODEL" "${L[@]}"
else
  echo "== scan: skipped — random weights have no learning curve"
fi
echo "== train: one crosscoder over the revisions (runs/; the toy's cache is made first)"
OUT=$(python -c "import sys, train; a, _ = train.parse_args(sys.argv[1:]); print(a.out)" --model "$MODEL" "${L[@]}" "${FLAGS[@]}")
if [ -f "$OUT/config.json" ] && [ -f "$OUT/DONE" ]; then
  echo "   $OUT is already trained; keeping it (delete it to train again)"
elif [ -d "$OUT/ckpt" ]; then
  python train.py --model "$MODEL" "${L[@]}" "${FLAGS[@]}" --resume
else
  python train.py --model "$MODEL" "${L[@]}" "${FLAGS[@]}" --overwrite
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
