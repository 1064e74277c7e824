#!/usr/bin/env bash
# Tensor / expert parallel launches of MoRE on 2 ranks (README, "Tensor and expert parallelism"):
#   examples/configs/launch_parallel.sh cpu-memory   # per-rank parameter memory, every expert type, TP and EP (gloo)
#   examples/configs/launch_parallel.sh cpu-train    # 5 AdamW steps with TP and EP and in one process: same losses
#   examples/configs/launch_parallel.sh cpu-trainer  # Trainer (examples/train_more.py), TP + EP on 2 CPU ranks (gloo)
#   examples/configs/launch_parallel.sh gpu-train    # Trainer (examples/train_more.py) with TP + EP on 2 GPUs (NCCL)
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
expert_type=${EXPERT_TYPE:-recurrent}
case "${1:-}" in
  cpu-memory)
    torchrun --nproc_per_node 2 examples/parallel_more.py memory ;;
  cpu-train)
    for mode in tp ep; do
      torchrun --nproc_per_node 2 examples/parallel_more.py train --mode "$mode" --expert_type "$expert_type"
    done
    python examples/parallel_more.py train --mode none --expert_type "$expert_type" ;;
  cpu-trainer)
    torchrun --nproc_per_node 2 examples/train_more.py --preset tiny --expert_type "$expert_type" \
      --config_overrides latent_init_std=0 --tasks babi1 --max_steps 20 --per_device_train_batch_size 8 \
      --logging_steps 1 --save_only_model true --use_cpu --tp_size 2 --ep_size 2 --output_dir outputs/tp-ep-cpu ;;
  gpu-train)
    torchrun --nproc_per_node 2 examples/train_more.py --preset small --expert_type "$expert_type" \
      --tasks babi1 --max_steps 200 --per_device_train_batch_size 16 --learning_rate 1e-3 \
      --save_only_model true --tp_size 2 --ep_size 2 --output_dir outputs/tp-ep ;;
  *)
    echo "usage: $0 cpu-memory|cpu-train|cpu-trainer|gpu-train" >&2
    exit 2 ;;
esac
