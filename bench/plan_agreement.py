"""The memory planner's agreement figures, side by side in one run.

    DS_ACCELERATOR=cpu .venv/bin/python bench/plan_agreement.py

1. Model states per GPU (parameters + gradients + optimizer + momentum towers), planner vs DeepSpeed's
   own estimators (``estimate_zero3_model_states_mem_needs`` / ``estimate_zero2_...``, given the online
   towers' counts) extended by the momentum towers' bf16 weights and fp32 masters. Target: within 5%.
2. Activations of one micro-batch, the planner's meta-device count vs the bytes autograd saves in a real
   fp32 forward on this CPU (distinct storages), checkpointing off and on every block, for tiny, base
   and the 10b widths cut to two ViT blocks and one layer of everything else. Target: within 15%.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STATE_CASES = [("1b", "ds_configs/zero3_1b.json", 16), ("1b", "ds_configs/zero2_1b.json", 16),
               ("10b", "ds_configs/zero3_10b.json", 64), ("10b", "ds_configs/zero3_10b.json", 128)]
ACTIVATION_CASES = ["tiny", "base", "10b-cut"]
MICRO_BATCH = 2
QUEUE = 1024


def model_state_rows() -> list[str]:
    from wenlan.plan import deepspeed_model_states

    rows = [f"{'preset':<8}{'config':<28}{'GPUs':>5}{'DeepSpeed + momentum':>22}{'planner':>12}{'ratio':>8}"]
    for preset, config, gpus in STATE_CASES:
        estimate, planned = deepspeed_model_states(preset, str(ROOT / config), gpus)
        rows.append(f"{preset:<8}{config:<28}{gpus:>5}{estimate / 1e9:>19.3f} GB{planned / 1e9:>9.3f} GB"
                    f"{planned / estimate:>8.3f}")
    return rows


def activation_rows() -> list[str]:
    from wenlan.config import PRESET_OBJECTIVES
    from wenlan.losses.objective import ObjectiveConfig
    from wenlan.models.presets import cut_depth, get_preset
    from wenlan.plan import activation_agreement, without_dropout

    rows = [f"{'model':<9}{'checkpointing':>14}{'measured':>14}{'planner':>14}{'ratio':>8}"]
    for case in ACTIVATION_CASES:
        name = case.removesuffix("-cut")
        cut = case.endswith("-cut")
        cfg = without_dropout(cut_depth(get_preset(name), vit_blocks=2, bert_layers=1, attention_layers=1) if cut else get_preset(name))
        objective = ObjectiveConfig(**dict(PRESET_OBJECTIVES[name], queue_size=QUEUE))
        for every, planned, measured in activation_agreement(cfg, objective, MICRO_BATCH):
            rows.append(f"{case:<9}{'every block' if every else 'off':>14}{measured / 1e6:>11.1f} MB"
                        f"{planned / 1e6:>11.1f} MB{planned / measured:>8.3f}")
    return rows


def main() -> None:
    print("model states per GPU, planner vs DeepSpeed's estimator + momentum towers (bf16 configs)")
    print("\n".join(model_state_rows()))
    print(f"\nactivations of one micro-batch of {MICRO_BATCH} (fp32, queue {QUEUE}, dropout 0), planner (meta device) "
          "vs saved tensors of a real CPU forward")
    print("\n".join(activation_rows()))


if __name__ == "__main__":
    main()
