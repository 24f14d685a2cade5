"""Experiments on top of the trainer: the end-to-end CPU demo and the loss comparison.

    demo.py     `taid-vlm demo`: synthetic data -> teacher (CE) -> TAID student and SFT student -> report
    compare.py  `taid-vlm compare`: losses x seeds on one setup (or a capacity-gap study) -> table + plot
    runs.py     launch `taid-vlm train` / `export` subprocesses, show progress, read metrics.jsonl
    report.py   mean ± std over seeds, markdown tables, matplotlib (Agg) plots
    answers.py  held-out answer exact match (greedy decoding reproduces the answer), by question kind

Each training run is a `taid-vlm train` subprocess: the experiments only use what a user can run by hand.
"""
