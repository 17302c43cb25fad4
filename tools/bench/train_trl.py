"""The TRL side of `templar bench-train`, in a process of its own: `python -m templar.tools.bench.train_trl SPEC.json`.

trl.GRPOTrainer on the CPU with the bench's actor and its two RMs in-process (each with its own tokenizer through
`reward_processing_classes`, which re-applies each RM's chat template), the same group size, lengths, epochs,
minibatches, beta (k3 KL loss) and learning rate as the Templar run. One TRL optimizer step is one minibatch, so one
rollout (a "step" of the bench) is `rows / mini_batch * epochs` optimizer steps; the clock reads the end of each.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(spec_path: str) -> dict:
    import datasets
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from templar.environment import use_offline_defaults
    from templar.trainer.data import load_prompts

    use_offline_defaults()
    spec = json.loads(Path(spec_path).read_text())
    o, models, out = spec["options"], spec["models"], Path(spec["out"])
    rows = o["prompts"] * o["samples_per_prompt"]
    optimizer_steps_per_rollout = rows // o["mini_batch"] * o["epochs"]
    rollouts = o["warmup"] + o["steps"]
    prompts = load_prompts()
    data = datasets.Dataset.from_list([{"prompt": p} for p in prompts] * (rollouts * o["prompts"] // len(prompts) + 1))
    config = GRPOConfig(
        output_dir=str(out), use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1,
        seed=o["seed"], learning_rate=o["lr"], lr_scheduler_type="constant", max_grad_norm=1.0,
        per_device_train_batch_size=o["micro_batch"], gradient_accumulation_steps=o["mini_batch"] // o["micro_batch"],
        steps_per_generation=rows // o["micro_batch"], num_generations=o["samples_per_prompt"],
        num_iterations=o["epochs"], max_completion_length=o["max_new_tokens"], temperature=1.0, top_p=1.0, top_k=0,
        beta=o["beta"], scale_rewards="group", disable_dropout=True, reward_weights=[1.0, 1.0],
        max_steps=rollouts * optimizer_steps_per_rollout, dataloader_num_workers=0,
        gradient_checkpointing=spec["gradient_checkpointing"])  # TRL's default is on; Templar recomputes nothing
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    rm_names = [name for name in models if name != "actor"]
    trainer = GRPOTrainer(model=models["actor"], reward_funcs=[models[name] for name in rm_names], args=config,
                          train_dataset=data,
                          reward_processing_classes=[AutoTokenizer.from_pretrained(models[name]) for name in rm_names],
                          callbacks=[Clock()])
    trainer.train()
    per_rollout = ends[optimizer_steps_per_rollout - 1::optimizer_steps_per_rollout]  # the end of each rollout
    measured = per_rollout[o["warmup"]:]
    seconds = measured[-1] - per_rollout[o["warmup"] - 1]
    rewards = [e["reward"] for e in trainer.state.log_history if "reward" in e]
    result = {"seconds": seconds, "steps": len(measured), "samples": rows * len(measured),
              "seconds_per_step": seconds / len(measured), "optimizer_steps": len(ends),
              "reward_mean_first_last": [rewards[0], rewards[-1]] if rewards else None}
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
