"""Shard builders and checkers: make_shards, check_shards, synth_shapes (each `python -m data_tools.<name>`)."""
