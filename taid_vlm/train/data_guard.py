"""Stop a run whose data is mostly unusable, instead of training all its steps on what is left.

Two shares, summed over all ranks so that every rank stops after the same step (the four counters ride on
train_step's one sum over ranks: `data_counts`):
- skipped samples (corrupt, too long, unaligned, ...) over all samples read: `data.max_skipped_fraction`
  (a run that read 3,000 samples and could use one used to train all its steps on that one and exit 0);
- supervised tokens dropped because the teacher's and the student's renderings did not pair them, over the
  student's supervised tokens: `data.max_unaligned_fraction`. The same tokenizer and chat template drop
  none; the default leaves room for the family pairs measured in docs/bring_your_own_models.md.
Nothing is judged before MIN_SAMPLES samples were read. The check runs before the divergence guard: a run
of unusable samples trains on fillers without supervised tokens, which the guard would call a collapse.
"""

from __future__ import annotations

from taid_vlm.errors import UserError

MIN_SAMPLES = 16


class UnusableDataError(UserError):
    """Too much of the training data is skipped or unaligned; nothing after the last checkpoint is lost."""


def data_problem(samples: float, skipped: float, supervised: float, dropped: float, max_skipped: float,
                 max_unaligned: float, skip_summary: str) -> str | None:
    """The message for the first share over its limit, or None. Counts are totals over all ranks."""
    read = samples + skipped
    if read < MIN_SAMPLES:
        return None
    if skipped / read > max_skipped:
        return (f"{int(skipped)} of the {int(read)} training samples read ({100 * skipped / read:.1f} %) were "
                f"skipped, over data.max_skipped_fraction {max_skipped}: {skip_summary} (rank 0's examples); fix the "
                "data or raise the limit")
    paired = supervised + dropped
    if paired and dropped / paired > max_unaligned:
        return (f"{int(dropped)} of {int(paired)} supervised tokens ({100 * dropped / paired:.1f} %) could not be "
                f"paired between the teacher's and the student's rendering of the same samples, over "
                f"data.max_unaligned_fraction {max_unaligned}: the two chat templates supervise different tokens (an "
                "end-of-turn token, a newline) or the tokenizers differ; the loss would skip those tokens. Use the "
                "same template for both, or raise the limit")
    return None


def data_counts(loader) -> list[float]:
    """This rank's counters (samples used, skipped, supervised tokens, unaligned tokens dropped), to be summed
    over ranks with the step's other sums."""
    stats = loader.stats
    return [float(stats.get("samples", 0)), float(loader.skips.total), float(stats.get("supervised_tokens", 0)),
            float(stats.get("unaligned_tokens_dropped", 0))]


def check_training_data(totals, data_cfg, skip_summary: str) -> None:
    """Raise UnusableDataError on every rank alike; ``totals``: data_counts summed over all ranks."""
    message = data_problem(*totals, data_cfg.max_skipped_fraction, data_cfg.max_unaligned_fraction, skip_summary)
    if message is not None:
        raise UnusableDataError(message, "data.train")
