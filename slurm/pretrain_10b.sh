#!/usr/bin/env bash
# Pre-train the 10b preset with ZeRO-3 (ds_configs/zero3_10b.json): 8 nodes x 8 GPUs by default.
#
#   TRAIN_SHARDS='/data/pairs/train-{000000..009999}.tar' VAL_SHARDS=/data/pairs/val-000000.tar \
#   TOKENIZER=/data/tokenizer sbatch slurm/pretrain_10b.sh
#
# Every knob is an environment variable (listed in slurm/common.sh) or an sbatch flag (nodes, GPUs, time).
# Before the time limit Slurm sends USR1: training checkpoints after the current step and the job
# requeues itself; the requeued job (same id, same output directory) resumes from that checkpoint.
#
#SBATCH --job-name=pretrain_10b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@900
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

# Under sbatch this file runs from a spool copy, so its own path says nothing about the repository.
ROOT=${ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
PRESET=${PRESET:-10b}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3_10b.json}
MAX_STEPS=${MAX_STEPS:-200000}
# Every block recomputed: at micro-batch 64 a ViT-2560 block alone keeps about 1 GB of activations.
ACTIVATION_CHECKPOINTING=${ACTIVATION_CHECKPOINTING:-1}
# A checkpoint of the 10b preset is about 200 GB (bf16 weights, fp32 masters and moments, momentum towers).
KEEP_CHECKPOINTS=${KEEP_CHECKPOINTS:-3}
# shellcheck source=slurm/common.sh
source "$ROOT/slurm/common.sh"
