"""The DeepSpeed distillation trainer. Entry points: `taid-vlm train CONFIG` (one process) and
`deepspeed --num_gpus N --module taid_vlm.train CONFIG` (many), both parsed by taid_vlm.cli.
In Python: `train(cfg)`, or the recipe's pieces: `Trainer(cfg).setup().resume()`, then `train_step()`,
`evaluate()`, `save()`, `fit()` (trainer.py; the layers: docs/architecture.md)."""

from .trainer import Trainer, train

__all__ = ["Trainer", "train"]
