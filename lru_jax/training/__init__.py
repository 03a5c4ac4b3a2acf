"""Training: config checks, optimiser, compiled steps (full and truncated BPTT), checkpoints,
metrics and the loop that `train.py` runs."""
