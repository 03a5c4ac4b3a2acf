"""Training: config checks, optimiser, compiled steps (full and truncated BPTT), checkpoints,
metrics, sharding over devices and hosts, and the loop that `train.py` runs."""
