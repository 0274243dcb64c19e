#!/usr/bin/env bash
# Real-shape check on one lent GPU (issue 17): CLIP ViT-L/14-336 + LLaVA's MLP + Qwen2.5-0.5B-Instruct (random init
# of the configs stored in vlm/plan/hf_configs; no hub), bf16, world size 1, under fsdp, deepspeed_zero2 and
# deepspeed_zero3: 30 training steps (connector + LLM, gradient checkpointing), the stage artifact saved, the run
# dir reloaded and evaluated (`vlm eval`), and per strategy the MFU and the measured peak memory against `vlm plan`.
# Everything lands in $OUT (default ./gpu_check_out): log.txt, recipe.yaml, train_*/eval_* logs, run_*/,
# summary.md and summary.json. Budget: about 8 minutes on an H100 (each strategy is capped at 120 s of training
# and 45 s of eval).
#
#   bash benchmarks/gpu_check.sh                    # on the GPU machine
#   GPU_CHECK_TINY=1 TRAIN_TIMEOUT=900 EVAL_TIMEOUT=300 bash benchmarks/gpu_check.sh   # CPU dry run, tiny configs
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
TINY=${GPU_CHECK_TINY:-0}
TRAIN_S=${TRAIN_TIMEOUT:-120}
EVAL_S=${EVAL_TIMEOUT:-45}
exec > >(tee -a "$OUT/log.txt") 2>&1
echo "gpu_check: $(date -u +%FT%TZ), python $PY, tiny=$TINY, git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

if ! "$PY" -c "import torch, transformers, accelerate, deepspeed, vlm" 2>"$OUT/import_error.txt"; then
    echo "gpu_check: the Python environment lacks a package (see $OUT/import_error.txt); nothing was run."
    exit 2
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
if [ "$TINY" = "0" ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible; use GPU_CHECK_TINY=1 for the CPU dry run."
    exit 2
fi

TINY_FLAG=$([ "$TINY" = "1" ] && echo --tiny || echo)
"$PY" benchmarks/gpu_check.py prepare --out "$OUT" $TINY_FLAG || exit 1
# Generate the synthetic world once, outside the timed runs.
"$PY" -m vlm plan "$OUT/recipe.yaml" --gpus 1 > "$OUT/plan.txt" 2>&1 || { echo "vlm plan failed"; cat "$OUT/plan.txt"; }

for s in fsdp deepspeed_zero2 deepspeed_zero3; do
    rm -rf "$OUT/run_$s"
    start=$(date +%s)
    timeout "$TRAIN_S" "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m vlm train "$OUT/recipe.yaml" \
        "distributed.strategy=$s" --no-eval --out "$OUT/run_$s" > "$OUT/train_$s.log" 2>&1
    rc=$?
    echo "train $s: rc=$rc, $(( $(date +%s) - start )) s"
    [ $rc -ne 0 ] && tail -n 25 "$OUT/train_$s.log"
    start=$(date +%s)
    timeout "$EVAL_S" "$PY" -m vlm eval "$OUT/run_$s" > "$OUT/eval_$s.log" 2>&1
    rc=$?
    echo "eval $s (reload the run dir, evaluate): rc=$rc, $(( $(date +%s) - start )) s"
    [ $rc -ne 0 ] && tail -n 25 "$OUT/eval_$s.log"
done

"$PY" benchmarks/gpu_check.py summarize --out "$OUT"
