#!/usr/bin/env bash
# Pre-train the 1b preset with ZeRO-3 (ds_configs/zero3_1b.json): 2 nodes x 8 GPUs by default.
#
#   TRAIN_SHARDS='/data/pairs/train-{000000..009999}.tar' VAL_SHARDS=/data/pairs/val-000000.tar \
#   TOKENIZER=/data/tokenizer sbatch slurm/pretrain_1b.sh
#
# Every knob is an environment variable (listed in slurm/common.sh) or an sbatch flag (nodes, GPUs, time).
# Before the time limit Slurm sends USR1: training checkpoints after the current step and the job
# requeues itself; the requeued job (same id, same output directory) resumes from that checkpoint.
#
#SBATCH --job-name=pretrain_1b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

# Under sbatch this file runs from a spool copy, so its own path says nothing about the repository.
ROOT=${ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
PRESET=${PRESET:-1b}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3_1b.json}
MAX_STEPS=${MAX_STEPS:-100000}
# shellcheck source=slurm/common.sh
source "$ROOT/slurm/common.sh"
