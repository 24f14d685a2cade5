"""taid-vlm: distil vision-language and language models with TAID (ICLR 2025) and its baselines."""

__version__ = "0.1.0"
