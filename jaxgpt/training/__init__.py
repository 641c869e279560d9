"""Training: the one Trainer (pure jitted step, hooks, checkpoints, resume) and what differs per kind of run: pretraining, SFT, preference tuning and RL."""
