"""train.eval_generation inside the trainer (a world of one): the metric lands in metrics.jsonl and equals a
recomputation from the student's own greedy answers (each prompt alone) against the raw answers of the shards;
with the setting off the evaluation is as before (no new keys, the same numbers)."""

from __future__ import annotations

import dataclasses
import json
import tarfile
from pathlib import Path

import pytest

from taid_vlm.data.render import pad_token_id
from taid_vlm.train.generation_metric import exact_match, rouge_l
from taid_vlm.train.sampling.completions import prompts_of
from taid_vlm.train.sampling.generation import generate_completions
from taid_vlm.train.trainer import Trainer
from tests.test_generation_metric import fit_answers
from tests.test_trainer_recipe import config, small_text  # noqa: F401 (a fixture)
from tests.train_helpers import evals

N = 6


def _answers(shards: Path) -> dict[str, str]:
    """key -> the last assistant message, read from the tar files themselves."""
    out = {}
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as f:
            for m in f.getmembers():
                if m.name.endswith(".json"):
                    out[m.name[: -len(".json")]] = json.loads(f.extractfile(m).read())["messages"][-1]["content"]
    return out


@pytest.mark.slow
def test_eval_generation_is_the_students_greedy_answers_scored(small_text, tmp_path, one_process_group):
    run = Trainer(config(small_text, tmp_path / "run", f"train.eval_generation={N}", "train.eval_max_new_tokens=6",
                         "train.micro_batch_size=4")).setup().resume()
    first = next(iter(run.make_val_loader()))
    fit_answers(run.student_model, first["student"])  # so that the answers are words, not repeated newlines
    got = run.evaluate()
    logged = evals(tmp_path / "run")[0]  # metrics.jsonl holds what evaluate returned
    assert {k: logged[k] for k in got} == pytest.approx(got)

    references, tokenizer = _answers(small_text / "val"), run.student_model.tokenizer
    greedy = dataclasses.replace(run.cfg.sampling, do_sample=False, max_new_tokens=6)
    want, seen = [], 0
    for batch in run.make_val_loader():
        for key, prompt in zip(batch["keys"], prompts_of(batch["student"])):
            if seen < N:
                (answer,) = generate_completions(run.student_model, [prompt], [0], [6], greedy, 0,
                                                 pad_token_id(tokenizer), run.device)
                text = tokenizer.decode(answer, skip_special_tokens=True)
                want.append((rouge_l(text, references[key]), exact_match(text, references[key])))
                seen += 1
    assert got["eval_generated"] == N
    assert got["eval_rougeL"] == pytest.approx(sum(r for r, _ in want) / N, abs=1e-12)
    assert got["eval_exact_match"] == pytest.approx(sum(e for _, e in want) / N, abs=1e-12)
    assert got["eval_rougeL"] > 0  # the fitted student answers some held-out questions in words

    run.generation_scorer = None  # what setup builds for train.eval_generation 0: the evaluation of before, number for number
    plain = run.evaluate()
    assert set(got) - set(plain) == {"eval_rougeL", "eval_exact_match", "eval_generated"}
    assert plain == {k: v for k, v in got.items() if k in plain}
