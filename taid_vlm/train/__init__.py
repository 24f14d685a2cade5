"""The DeepSpeed distillation trainer. Entry points: `taid-vlm train CONFIG` (one process) and
`deepspeed --num_gpus N --module taid_vlm.train CONFIG` (many), both parsed by train/command.py.
In Python: `train(cfg)`, or the recipe's pieces: `Trainer(cfg).setup().resume()`, then `train_step()`,
`evaluate()`, `save()`, `fit()` (trainer.py; the layers: docs/architecture.md)."""

__all__ = ["Trainer", "train"]


def __getattr__(name: str):
    """``Trainer`` and ``train`` load the trainer (torch, DeepSpeed) on first use, so that the command line's
    parser (train/command.py, also behind `taid-vlm --help`) starts in a fraction of a second."""
    if name in __all__:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
