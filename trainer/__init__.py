"""The trainer side: reward client (and the PPO trainer), installed as templar.trainer."""
