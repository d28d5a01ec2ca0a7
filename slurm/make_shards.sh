#!/usr/bin/env bash
# Manifest -> webdataset shards as a Slurm array job: array task I of N writes shards k with
# k % N == I (data_tools/make_shards.py), with no coordination between tasks. The output does not
# depend on N. The last task to finish removes duplicates across shards and writes $OUT/stats.json.
#
#   MANIFEST=pairs.parquet OUT=/data/pairs sbatch --array=0-63 slurm/make_shards.sh
#   MANIFEST=pairs.parquet OUT=/data/pairs bash slurm/make_shards.sh     # no Slurm: task 0 of 1
#
# Re-submitting the same command after a failure or pre-emption redoes only unfinished shards.
# Knobs (environment): MANIFEST (required; several files or a quoted glob), OUT (required),
# SHARD_SIZE (10000), WORKERS (the task's CPUs), FETCH_THREADS (16), PREFIX (train), MAX_SIDE (0 = keep),
# T2S (1 = traditional -> simplified), PYTHON (.venv/bin/python, else python3), ROOT (the repository),
# EXTRA_ARGS (any other make_shards.py flags, e.g. "--max-caption-chars 128 --min-side 64"),
# TASK_INDEX / NUM_TASKS (override the array position).
#
#SBATCH --job-name=make-shards
#SBATCH --array=0-15
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=32G
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=make-shards-%A_%a.out
set -euo pipefail

# Under sbatch this file runs from a spool copy, so its own path says nothing about the repository.
ROOT=${ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
cd "$ROOT"
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

: "${MANIFEST:?set MANIFEST to the manifest file(s), e.g. MANIFEST=pairs.parquet}"
: "${OUT:?set OUT to the output directory, e.g. OUT=/data/pairs}"
SHARD_SIZE=${SHARD_SIZE:-10000}
WORKERS=${WORKERS:-${SLURM_CPUS_PER_TASK:-$(nproc)}}
FETCH_THREADS=${FETCH_THREADS:-16}
PREFIX=${PREFIX:-train}
MAX_SIDE=${MAX_SIDE:-0}
T2S=${T2S:-0}

# Array position -> task index, also for arrays that do not start at 0 or step by more than 1
# (--array=1-64, --array=0-126:2). A plain `bash` run has no SLURM_* variables: task 0 of 1.
if [[ -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
  step=${SLURM_ARRAY_TASK_STEP:-1}
  TASK_INDEX=${TASK_INDEX:-$(( (SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0}) / step ))}
  NUM_TASKS=${NUM_TASKS:-${SLURM_ARRAY_TASK_COUNT:-$(( (SLURM_ARRAY_TASK_MAX - ${SLURM_ARRAY_TASK_MIN:-0}) / step + 1 ))}}
else
  TASK_INDEX=${TASK_INDEX:-0}
  NUM_TASKS=${NUM_TASKS:-1}
fi

args=(--out "$OUT" --shard-size "$SHARD_SIZE" --workers "$WORKERS" --fetch-threads "$FETCH_THREADS"
      --prefix "$PREFIX" --max-side "$MAX_SIDE" --task-index "$TASK_INDEX" --num-tasks "$NUM_TASKS")
if [[ $T2S == 1 ]]; then args+=(--t2s); fi
# MANIFEST and EXTRA_ARGS split on spaces on purpose (several files; several flags); a quoted glob
# reaches make_shards.py unexpanded and is expanded there, in sorted order.
set -f
# shellcheck disable=SC2206
manifests=($MANIFEST)
# shellcheck disable=SC2206
extra=(${EXTRA_ARGS:-})
set +f

echo "make_shards: task $TASK_INDEX of $NUM_TASKS on $(hostname), $WORKERS workers, $MANIFEST -> $OUT"
exec "$PYTHON" data_tools/make_shards.py --manifest "${manifests[@]}" "${args[@]}" "${extra[@]}"
