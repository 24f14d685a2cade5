"""A run whose data is mostly unusable stops with the counts, instead of training all its steps on what is
left; a small share of skipped samples or unaligned tokens is fine."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from taid_vlm.config import DataConfig
from taid_vlm.data.skips import SkipCounter
from taid_vlm.train.data_guard import MIN_SAMPLES, UnusableDataError, check_training_data, data_counts, data_problem


def loader(samples=0, skipped=None, supervised=0, dropped=0):
    skips = SkipCounter()
    for reason, n in (skipped or {}).items():
        skips.add(reason, f"{reason}-0", n)
    stats = {"samples": samples, "supervised_tokens": supervised, "unaligned_tokens_dropped": dropped}
    return SimpleNamespace(stats=stats, skips=skips)


def check(rank_loader, sum_over_ranks=lambda values: values):
    """As the trainer does: this rank's counts, summed over ranks (with the step's other sums), judged."""
    check_training_data(sum_over_ranks(data_counts(rank_loader)), DataConfig(), rank_loader.skips.summary())


def test_one_usable_sample_of_three_thousand_stops_the_run_with_the_skip_counts():
    with pytest.raises(UnusableDataError, match=r"2999 of the 3000 training samples read \(100.0 %\) were skipped, "
                                                r"over data.max_skipped_fraction 0.5: skipped 2999 samples "
                                                r"\(bad_json=2999 \[bad_json-0\]\).*\(data.train\)"):
        check(loader(1, {"bad_json": 2999}, supervised=10))


def test_skips_below_the_limit_or_too_few_samples_pass():
    check(loader(60, {"corrupt_image": 40}, supervised=600))  # 40 %
    check(loader(1, {"bad_json": MIN_SAMPLES - 2}))  # too few read to judge
    with pytest.raises(UnusableDataError):
        check(loader(1, {"bad_json": MIN_SAMPLES - 1}))


def test_unaligned_tokens_over_the_limit_name_the_cause():
    assert data_problem(100, 0, supervised=980, dropped=20, max_skipped=0.5, max_unaligned=0.02, skip_summary="") is None
    message = data_problem(100, 0, supervised=979, dropped=21, max_skipped=0.5, max_unaligned=0.02, skip_summary="")
    assert message.startswith("21 of 1000 supervised tokens (2.1 %) could not be paired between the teacher's and the "
                              "student's rendering") and "data.max_unaligned_fraction 0.02" in message
    assert "chat templates supervise different tokens" in message


def test_counts_are_summed_over_ranks_before_judging():
    """Rank 0 alone is under the limit; the sum over two ranks (the reduction doubles rank 0's skips and adds
    nothing to its used samples) is over it: every rank must judge the sum."""
    def two_ranks(values):
        samples, skipped, supervised, dropped = values
        return [samples, 2 * skipped, supervised, dropped]

    check(loader(40, {"too_long": 30}, supervised=400))
    with pytest.raises(UnusableDataError, match="60 of the 100 training samples"):
        check(loader(40, {"too_long": 30}, supervised=400), two_ranks)


def test_data_counts_are_the_loaders_four_counters():
    assert data_counts(loader(7, {"too_long": 2, "bad_json": 1}, supervised=50, dropped=3)) == [7.0, 3.0, 50.0, 3.0]
