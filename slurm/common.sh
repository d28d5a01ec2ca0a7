# Shared by slurm/pretrain_1b.sh and slurm/pretrain_10b.sh (sourced after they set ROOT and the preset's
# defaults). Starts one training process per GPU on every node of the allocation, forwards pre-emption
# signals to them, and requeues the job when training stopped early to be continued.
#
# Knobs (environment; sbatch passes the submitting shell's environment to the job):
#   TRAIN_SHARDS, VAL_SHARDS  webdataset shards, space separated, brace notation ok (required)
#   TOKENIZER                 Hugging Face tokenizer directory (required)
#   PRESET, DS_CONFIG         model preset and DeepSpeed JSON (the script's defaults)
#   MAX_STEPS                 optimizer steps of the whole run (the script's default)
#   OUTPUT_DIR                run directory (default outputs/<job name>-<job id>: a requeued job keeps its
#                             id, so it finds its checkpoints; set it to continue a run in a new job)
#   PROCS_PER_NODE            training processes per node (default: --ntasks-per-node of the job)
#   ACCELERATOR               cuda (default) or cpu (DeepSpeed on CPU with gloo: the tiny preset, tests)
#   SAVE_EVERY, EVAL_EVERY    steps between checkpoints / evaluations (defaults 1000 / 5000)
#   NUM_WORKERS               DataLoader workers per process (default 4)
#   ACTIVATION_CHECKPOINTING  recompute every K-th tower block in the backward (0 off; the script's default)
#   KEEP_CHECKPOINTS          keep the N newest complete checkpoints, delete older ones after each save
#                             (default: keep all; pretrain_10b.sh keeps 3)
#   SEED, RESUME              --seed (0) and --resume (auto); RESUME=PATH|none applies to the job's first
#                             start only: a requeued job resumes from its own newest checkpoint
#   MLFLOW_URI, MLFLOW_EXPERIMENT   tracking store (default: sqlite next to OUTPUT_DIR) and experiment
#   EXTRA_ARGS                any other wenlan/train.py flags, e.g. "--queue-size 65536 --log-every 50"
#   MASTER_ADDR, MASTER_PORT  rendezvous (default: the first node's address, 20000 + job id % 20000)
#   PYTHON                    interpreter (default .venv/bin/python, else python3)
#   SRUN_ARGS                 extra srun flags
# Nodes, GPUs, time: sbatch flags, e.g. `sbatch --nodes=4 --time=12:00:00 slurm/pretrain_10b.sh`.

set -euo pipefail
cd "$ROOT"
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

: "${TRAIN_SHARDS:?set TRAIN_SHARDS to the training shards, e.g. TRAIN_SHARDS='/data/pairs/train-{000000..000999}.tar'}"
: "${VAL_SHARDS:?set VAL_SHARDS to the validation shards}"
: "${TOKENIZER:?set TOKENIZER to a Hugging Face tokenizer directory}"
: "${SLURM_JOB_ID:?run this script with sbatch (it needs a Slurm allocation)}"
OUTPUT_DIR=${OUTPUT_DIR:-outputs/${SLURM_JOB_NAME:-pretrain}-${SLURM_JOB_ID}}
PROCS_PER_NODE=${PROCS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-1}}
ACCELERATOR=${ACCELERATOR:-cuda}
SAVE_EVERY=${SAVE_EVERY:-1000}
EVAL_EVERY=${EVAL_EVERY:-5000}
NUM_WORKERS=${NUM_WORKERS:-4}
ACTIVATION_CHECKPOINTING=${ACTIVATION_CHECKPOINTING:-0}
if [[ $ACTIVATION_CHECKPOINTING != 0 ]] && grep -q '"pipeline"' "$DS_CONFIG"; then
  echo "$DS_CONFIG is a pipeline config: its pipeline.activation_checkpoint_interval applies, not ACTIVATION_CHECKPOINTING"
  ACTIVATION_CHECKPOINTING=0
fi
SEED=${SEED:-0}
RESUME=${RESUME:-auto}
MLFLOW_EXPERIMENT=${MLFLOW_EXPERIMENT:-wenlan}
# RESUME=PATH (or none) says where the job's FIRST start comes from. A requeued job (same id, same
# OUTPUT_DIR) that has written a checkpoint of its own continues from it: going back to PATH would redo
# every step since, and `none` would start over. Only this one batch shell looks at the directory.
if (( ${SLURM_RESTART_COUNT:-0} > 0 )) && [[ $RESUME != auto ]] \
    && compgen -G "$OUTPUT_DIR/checkpoints/step*/complete.json" > /dev/null; then
  echo "restart ${SLURM_RESTART_COUNT}: RESUME=$RESUME applies to the first start only; resuming from $OUTPUT_DIR/checkpoints"
  RESUME=auto
fi

# Rendezvous: rank 0 runs on the first node of the allocation. Its address comes from the node's
# NodeAddr (the hostname on most clusters; several emulated nodes on one machine share 127.0.0.1).
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
if [[ -z ${MASTER_ADDR:-} ]]; then
  MASTER_ADDR=$(scontrol show node "$first_node" -o | sed -n 's/.* NodeAddr=\([^ ]*\).*/\1/p')
  MASTER_ADDR=${MASTER_ADDR:-$first_node}
fi
MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
NNODES=${SLURM_JOB_NUM_NODES:-1}
export MASTER_ADDR MASTER_PORT
export WORLD_SIZE=$(( NNODES * PROCS_PER_NODE )) LOCAL_SIZE=$PROCS_PER_NODE
if [[ $ACCELERATOR == cpu ]]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
else
  # A dead or stuck peer must fail the collective, and with it the step and the job, rather than hang
  # every rank until the allocation's time runs out: NCCL errors and timeouts tear the process group
  # down. NCCL_DEBUG=WARN puts the failing rank and reason in the job's log.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
fi

# Shards and extra flags split on spaces on purpose; brace patterns reach train.py unexpanded.
set -f
# shellcheck disable=SC2206
train_shards=($TRAIN_SHARDS)
# shellcheck disable=SC2206
val_shards=($VAL_SHARDS)
# shellcheck disable=SC2206
extra=(${EXTRA_ARGS:-})
# shellcheck disable=SC2206
srun_extra=(${SRUN_ARGS:-})
set +f
args=(--deepspeed_config "$DS_CONFIG" --preset "$PRESET" --tokenizer "$TOKENIZER"
      --train-shards "${train_shards[@]}" --val-shards "${val_shards[@]}" --max-steps "$MAX_STEPS"
      --output-dir "$OUTPUT_DIR" --resume "$RESUME" --seed "$SEED" --save-every "$SAVE_EVERY"
      --eval-every "$EVAL_EVERY" --num-workers "$NUM_WORKERS" --mlflow-experiment "$MLFLOW_EXPERIMENT"
      --activation-checkpointing "$ACTIVATION_CHECKPOINTING")
if [[ -n ${MLFLOW_URI:-} ]]; then args+=(--mlflow-uri "$MLFLOW_URI"); fi
if [[ -n ${KEEP_CHECKPOINTS:-} ]]; then args+=(--keep-checkpoints "$KEEP_CHECKPOINTS"); fi
args+=("${extra[@]}")

echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NNODES node(s) [$(scontrol show hostnames \
"$SLURM_JOB_NODELIST" | paste -sd ' ')] x $PROCS_PER_NODE process(es), rendezvous $MASTER_ADDR:$MASTER_PORT, \
preset $PRESET, $DS_CONFIG, $ACCELERATOR, output $OUTPUT_DIR"

# Pre-emption. Slurm signals only this shell (--signal=B:USR1@...), or the test with
# `scancel --signal=USR1 --batch`; the trap forwards USR1 to srun, which hands it to every process of the
# step. Training finishes its step, saves and exits with 75 (wenlan/parallel/preemption.py); then this
# script requeues the job: same job id, same OUTPUT_DIR, and --resume auto continues from that checkpoint.
# SIGTERM to this shell is forwarded as USR1 as well.
signalled=""
nsignals=0
srun_pid=""
forward() {
  signalled=$1
  nsignals=$((nsignals + 1))
  echo "batch script got SIG$1: asking the training processes to checkpoint and stop"
  if [[ -n $srun_pid ]]; then kill -USR1 "$srun_pid" 2>/dev/null || true; fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# One srun task per training process (per GPU), started by Slurm itself, rather than one task per node
# running DeepSpeed's own launcher: then Slurm's signals reach the training processes directly (the
# DeepSpeed launcher dies on USR1 and answers SIGTERM by killing its children after a grace period, which
# can cut a checkpoint short), Slurm sees every rank's exit code, and --kill-on-bad-exit stops the whole step
# when one rank fails instead of leaving the others hanging in a collective. DeepSpeed's init_distributed
# reads RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, mapped here from srun's SLURM_PROCID and
# SLURM_LOCALID. Every task of a node sees all its GPUs (no --gpus-per-task) and picks one by LOCAL_RANK.
srun --nodes="$NNODES" --ntasks-per-node="$PROCS_PER_NODE" --ntasks="$WORLD_SIZE" --kill-on-bad-exit=1 \
  "${srun_extra[@]}" \
  bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID; exec "$@"' wenlan-rank \
  "$PYTHON" wenlan/train.py "${args[@]}" &
srun_pid=$!
# `wait` returns early whenever a trapped signal arrives; wait again until srun itself has ended.
while true; do
  before=$nsignals
  rc=0
  wait "$srun_pid" || rc=$?
  if (( nsignals == before )); then break; fi
done

if [[ $rc == 75 || ( -n $signalled && $rc != 0 ) ]]; then
  # 75: every rank stopped after a complete checkpoint. A signal and another exit code: most often the
  # same, but --kill-on-bad-exit terminated a rank still tearing down when the first one left with 75;
  # otherwise training died, and the newest complete checkpoint loses at most the steps since it.
  echo "training stopped after a pre-emption signal (exit $rc): requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
echo "training finished with exit code $rc"
exit "$rc"
