"""Templar as the reward server of other trainers, each RM still applying its own chat template:

- `openrlhf`: OpenRLHF's remote-reward protocol (rows of actor-templated text), served over HTTP by `templar gateway`
  (`gateway`) or called in-process through `openrlhf_reward_func.py` (`--reward.remote_url /path/to/it.py`);
- `trl`: `TemplarReward`, a reward function for TRL's GRPOTrainer / RLOOTrainer;
- `verl`: `compute_score` / `compute_score_batch` for verl's `custom_reward_function`.
Text rendered with the actor's template is parsed back into messages by templar.template_parser.
"""
