"""Profiler of scans, layers and train steps: `python -m lru_jax.bench --suite scan`.

Suites (`--suite`, repeatable; `all` runs every CPU-sized one):
  scan    every `linear_scan` method over lengths x (batch, state) sizes, real and complex,
          forward ("fwd") and forward+backward ("fwd+bwd"); baseline: "sequential".
  layers  our SimpleRNN/LSTM/GRU against flax.linen's nn.RNN cells (and PyTorch's nn.RNN/LSTM/
          GRU on CPU where torch is installed), and our LRU (each method) against an
          associative-scan-only LRU written from the paper's pseudocode; fwd+bwd; and every
          recurrent mixer (LRU, LSTM, minGRU, minLSTM, HGRN, Griffin's RG-LRU block, the S5,
          the Mamba block), fwd and fwd+bwd.
  train   train-step throughput (tokens/s) and compile time for configs in configs/.
  memory  peak memory and time of BPTT with and without rematerialisation (4-layer models),
          and Mamba's selective scan fused (`scan.selective_scan`) against materialising
          every state, fwd+bwd, with each function's buffer plan (`--selective-shape`).
  gpu     the scan suite at accelerator sizes (lengths up to 65,536), meant for a GPU.

Every row reports the median time and its spread (25th-75th percentile) over `--repeats` runs
after a warm-up, the speedup against the row group's baseline measured in the same run, the
compile time, the memory the backend reports (peak bytes on GPU; XLA's buffer plan on CPU) and
the achieved bandwidth or FLOP rate as a fraction of this machine's limits, which the tool
measures itself (a large elementwise copy and a large matmul). Output: a table on stdout, JSON
(`--out DIR/bench.json`), a PNG of time against length for the scan suite, and with
`--trace DIR` a `jax.profiler` trace of the timed runs. The scan and gpu suites also write
`DIR/scan_choices.json`, the fastest method per shape: read it with `lru_jax.scan_choices.load`
and pass the table to a model (`scan_table=`) or scan, and its "auto" scans choose from this
machine's measurements.

The package: `report` (rows, tables, plots), `scan_suite`, `layer_suite`, `train_suite` (train
and memory), the command line in `__main__`; the timing itself is `lru_jax.timing`.
"""
