"""The DeepSpeed distillation trainer. Entry points: `taid-vlm train CONFIG` (one process) and
`deepspeed --num_gpus N --module taid_vlm.train CONFIG` (many), both parsed by taid_vlm.cli."""

from .trainer import train

__all__ = ["train"]
