"""The sampling modes' semantics against references transcribed from the official TAID sampler and TRL's
GKD trainer (tests/sampling_reference.py): which micro-batches generate or replay, the adaptive threshold,
the replay buffer, the prompt, and the batch built from generated completions; plus the config rules."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from taid_vlm.config import ConfigError, SamplingConfig, load_config
from taid_vlm.data.render import IGNORE_INDEX, Renderer
from taid_vlm.data.samples import Sample
from taid_vlm.spec import InputSpec
from taid_vlm.train.sampling import Decision, ReplayBuffer, SamplingPolicy, completion_part, cut_completion
from taid_vlm.train.sampling.completions import left_padded
from taid_vlm.train.sampling.policy import STUDENT, TEACHER, draw
from tests.sampling_reference import (OfficialUpdate, official_branch, official_buffer_sample, official_run_sample,
                                      trl_branch, trl_on_policy_outputs)
from tests.train_helpers import CONFIGS

NAMES = {Decision(STUDENT, push=True, replay=True): "mixed", Decision(STUDENT, push=True): "fresh",
         Decision(replay=True): "replay", Decision(): None}


@pytest.mark.parametrize("mode", ["mixed", "adaptive"])
@pytest.mark.parametrize("ratio", ["decreasing", "constant", "increasing"])
def test_decisions_are_the_official_samplers_branches(mode, ratio):
    capacity, total = 8, 50
    policy = SamplingPolicy(SamplingConfig(mode=mode, replay_ratio=ratio, capacity=capacity), seed=3)
    seen = Counter()
    for threshold in (0.0, 0.3, 0.7, 1.0):
        policy.threshold = threshold
        for step in range(0, total, 7):
            for micro in range(8):
                for buffer_len in (0, 5, capacity):
                    got = NAMES[policy.decide(step, total, micro, buffer_len >= capacity)]
                    want = official_branch(mode, draw(3, step, micro), threshold, step, total, buffer_len, capacity,
                                           replay_ratio=ratio)
                    assert got == want, (threshold, step, micro, buffer_len)
                    seen[got] += 1
    assert set(seen) == ({"mixed", None} if mode == "mixed" else {"fresh", "replay", None})
    if mode == "mixed":  # probability 0.5 per micro-batch
        share = sum(policy.decide(step, 10**4, 0, False).replay for step in range(2000)) / 2000
        assert share == pytest.approx(0.5, abs=0.03)


def test_adaptive_threshold_rises_as_the_official_update():
    policy = SamplingPolicy(SamplingConfig(mode="adaptive"), seed=0)
    ref = OfficialUpdate()
    losses = [3.0, 2.5, 2.6, 3.1, 2.0, 3.1, 3.2, 3.3, 3.4, 3.5, 3.6, 3.7, 3.8, 3.9, 1.0]
    thresholds = []
    for loss in losses:
        policy.after_eval(loss)
        ref.update(loss)
        assert policy.threshold == pytest.approx(float(ref.adaptive_threshold), abs=1e-6)
        thresholds.append(round(policy.threshold, 6))
    # 2.6 and 3.1 are below 3.0 / at or above it: the recorded loss moves only when the threshold rises
    assert thresholds[:6] == [0.0, 0.0, 0.0, 0.1, 0.1, 0.2] and thresholds[-1] == 1.0


@pytest.mark.parametrize("lmbda,seq_kd", [(0.0, False), (0.3, False), (0.3, True), (1.0, True)])
def test_on_policy_is_trls_lmbda_choice(lmbda, seq_kd):
    policy = SamplingPolicy(SamplingConfig(mode="on_policy", lmbda=lmbda, seq_kd=seq_kd), seed=5)
    names = {Decision(STUDENT): "student", Decision(TEACHER): "teacher", Decision(): None}
    got = [names[policy.decide(step, 100, micro, False)] for step in range(200) for micro in range(4)]
    want = [trl_branch(draw(5, step, micro), lmbda, seq_kd) for step in range(200) for micro in range(4)]
    assert got == want
    assert got.count("student") / len(got) == pytest.approx(lmbda, abs=0.04)


def test_replay_buffer_keeps_and_samples_as_the_official_one():
    entries = [{"index": i, "completion": [i, i + 1]} for i in range(30)]
    buffer = ReplayBuffer(capacity=20)
    for start in range(0, 30, 7):
        buffer.push(entries[start:start + 7])
    assert [e["index"] for e in buffer.entries] == list(range(10, 30)) and buffer.full
    picked = buffer.sample(6, random.Random(11))
    assert picked == official_buffer_sample(entries, 20, 6, seed=11)
    assert len({e["index"] for e in picked}) == 6  # without replacement
    restored = ReplayBuffer(capacity=20)
    restored.load_state_dict(buffer.state_dict())
    assert restored.sample(6, random.Random(11)) == picked
    with pytest.raises(ValueError, match="sampling.capacity"):
        ReplayBuffer(capacity=10).load_state_dict(buffer.state_dict())


def _generated(eos: int, pad: int):
    """Left-padded prompts and what `generate` returns for them: row 0 stops early (eos, then pads),
    row 1 runs to max_new_tokens, row 2 stops at its last token."""
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
    completions = [[20, 21, eos, pad, pad, pad], [22, 23, 24, 25, 26, 27], [28, 29, 30, 31, 32, eos]]
    ids, mask = left_padded(prompts, pad)
    return prompts, ids, mask, torch.cat([ids, torch.tensor(completions)], dim=1)


def _supervised(ids, mask, labels):
    """[(row, context tokens without padding, target)] per supervised token (labels unshifted: labels[j]
    is the token at j, predicted from the tokens before it)."""
    out = []
    for b in range(ids.shape[0]):
        for j in range(1, ids.shape[1]):
            if labels[b, j] != IGNORE_INDEX:
                context = ids[b, :j][mask[b, :j] == 1].tolist()
                out.append((b, tuple(context), int(labels[b, j])))
    return out


def test_completion_batch_trains_on_what_trl_and_the_official_code_train_on():
    eos, pad = 2, 0
    prompts, ids, mask, generated = _generated(eos, pad)
    completions = [cut_completion(row, {eos}, limit=6) for row in generated[:, ids.shape[1]:].tolist()]
    assert completions == [[20, 21, eos], [22, 23, 24, 25, 26, 27], [28, 29, 30, 31, 32, eos]]
    ours = completion_part(prompts, completions, pad)
    mine = _supervised(ours["input_ids"], ours["attention_mask"], ours["labels"])
    # our loss rows: the hidden state at loss_positions[k] predicts loss_targets[k]
    T = ours["input_ids"].shape[1]
    rows = [(int(p) // T, tuple(ours["input_ids"][int(p) // T, : int(p) % T + 1].tolist()), int(t))
            for p, t in zip(ours["loss_positions"], ours["loss_targets"])]
    assert rows == mine
    trl = trl_on_policy_outputs(ids, mask, generated, eos_token_id=[eos])
    assert _supervised(*trl) == mine
    official = official_run_sample(ids, generated, pad_token_id=pad, max_new_tokens=6)
    assert _supervised(official["input_ids"], official["attention_mask"], official["labels"]) == mine
    assert ours["prompt_lengths"].tolist() == [5, 3, 4]
    assert [t for _, _, t in mine] == [t for c in completions for t in c]  # labels: exactly the completions


def test_cut_completion_stops_at_any_stop_token_and_the_length_limit():
    assert cut_completion([4, 5, 9, 6], {9, 7}, limit=10) == [4, 5, 9]
    assert cut_completion([4, 7, 9, 6], {9, 7}, limit=10) == [4, 7]
    assert cut_completion([4, 5, 6, 8], {9}, limit=3) == [4, 5, 6]


def test_prompt_is_the_conversation_up_to_its_last_assistant_turn(tiny_tokenizer):
    msgs = [{"role": "user", "content": "how many circles"}, {"role": "assistant", "content": "two"},
            {"role": "user", "content": "which color"}, {"role": "assistant", "content": "red and blue"}]
    rendered = Renderer(InputSpec(tiny_tokenizer), max_length=256)(Sample("k", messages=msgs))
    # what TRL's GKD collator and the official data preparation generate from
    want = tiny_tokenizer.apply_chat_template(msgs[:-1], tokenize=True, add_generation_prompt=True,
                                              return_dict=True)["input_ids"]
    assert rendered.input_ids[: rendered.prompt_length] == list(want)
    assert rendered.labels[rendered.prompt_length] != IGNORE_INDEX
    assert rendered.labels[rendered.prompt_length - 1] == IGNORE_INDEX


def test_a_raw_documents_prompt_is_its_first_prompt_tokens(tiny_tokenizer):
    """data.prompt_tokens P: the student continues a raw document from its first P tokens and is trained on
    exactly its completion; the fixed-data row still supervises every token but the first, prompt included."""
    from taid_vlm.data.collate import collate
    from taid_vlm.train.sampling.completions import prompts_of

    doc = Sample("doc", text="def add(a, b):\n    return a + b\n")
    plain = Renderer(InputSpec(tiny_tokenizer), max_length=256)(doc)
    rendered = Renderer(InputSpec(tiny_tokenizer), max_length=256, prompt_tokens=6)(doc)
    assert len(rendered) > 8 and plain.prompt_length == 1 and rendered.prompt_length == 6
    assert rendered.input_ids == plain.input_ids and rendered.labels == plain.labels  # the loss is unchanged
    assert rendered.labels[1:] == rendered.input_ids[1:] and rendered.labels[0] == IGNORE_INDEX
    part = collate([rendered, plain], tiny_tokenizer.pad_token_id)
    prompts = prompts_of(part)
    assert prompts == [rendered.input_ids[:6], rendered.input_ids[:1]]
    completions = [[40, 41, 42], [43]]
    sampled = completion_part(prompts, completions, tiny_tokenizer.pad_token_id)
    assert sampled["loss_targets"].tolist() == [40, 41, 42, 43]
    assert sampled["input_ids"][0, :9].tolist() == rendered.input_ids[:6] + [40, 41, 42]


def test_a_raw_prompt_always_leaves_a_continuation(tiny_tokenizer):
    doc = Sample("doc", text="x = 1")
    full = Renderer(InputSpec(tiny_tokenizer), max_length=256)(doc)
    short = Renderer(InputSpec(tiny_tokenizer), max_length=256, prompt_tokens=len(full) + 5)(doc)
    assert short.prompt_length == len(full) - 1  # the last token (eos) is still the continuation
    cut = Renderer(InputSpec(tiny_tokenizer), max_length=4, prompt_tokens=10)(doc)
    assert len(cut) == 4 and cut.prompt_length == 3


def _cfg(*overrides):
    return load_config(CONFIGS / "tiny_text.yaml", ["data.synthetic=null", *overrides])


@pytest.mark.parametrize("overrides,key", [
    (["sampling.mode=greedy"], "sampling.mode"),
    (["sampling.mode=on_policy", "sampling.lmbda=1.5"], "sampling.lmbda"),
    (["sampling.mode=mixed", "sampling.seq_kd=true"], "sampling.seq_kd"),
    (["sampling.mode=on_policy", "sampling.top_p=0"], "sampling.top_p"),
    (["sampling.mode=on_policy", "loss.name=ce"], "sampling.mode"),
    (["sampling.mode=adaptive", "data.val=null", "train.eval_every=5"], "sampling.mode"),
    (["sampling.mode=adaptive", "train.eval_every=0"], "sampling.mode"),
    (["sampling.mode=mixed", "data.pack=true"], "sampling.mode"),
    (["data.prompt_tokens=-1"], "data.prompt_tokens"),
    (["data.max_length=64", "data.prompt_tokens=64"], "data.prompt_tokens"),
])
def test_bad_sampling_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        _cfg(*overrides)
    assert e.value.where == key


def test_a_teacher_cache_is_refused_with_sampling(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match="teacher cache .* cannot") as e:
        _cfg("sampling.mode=on_policy", f"teacher.cache={tmp_path}")
    assert e.value.where == "sampling.mode"
    assert _cfg().sampling.mode == "off"


def test_sampling_off_written_unquoted_in_yaml_is_off():
    assert _cfg("sampling.mode=off").sampling.mode == "off"  # YAML reads it as false
    with pytest.raises(ConfigError, match="sampling.mode: must be one of"):
        _cfg("sampling.mode=on")


@pytest.fixture(scope="module")
def tiny_student():
    from taid_vlm.train.components import build_role_model
    from tests.models_helpers import load_cfg

    torch.manual_seed(0)
    return build_role_model(load_cfg("tiny_text_student"), "student")


def _completions(model, prompts, indices, **sampling):
    from taid_vlm.train.sampling.generation import generate_completions

    cfg = SamplingConfig(mode="on_policy", max_new_tokens=12, **sampling)
    pad = model.tokenizer.pad_token_id
    return generate_completions(model, prompts, indices, [12] * len(prompts), cfg, seed=7, pad_id=pad,
                                device=torch.device("cpu"))


@pytest.mark.parametrize("do_sample", [False, True])
def test_a_completion_depends_on_its_prompt_and_global_index_only(tiny_student, do_sample):
    """Alone or in a batch (other rows, other order, other left padding): the same completion; sampled
    rows are seeded by their global sample index, so 1x4 / 2x2 / 4x1 generate the same text."""
    tok = tiny_student.tokenizer
    prompts = [tok.encode(t) for t in ("how many red circles are there", "the color of", "a blue square is at the left")]
    sampling = {"do_sample": True, "temperature": 1.5, "top_p": 0.95} if do_sample else {}
    batch = _completions(tiny_student, prompts, [40, 41, 42], **sampling)
    alone = [_completions(tiny_student, [p], [i], **sampling)[0] for p, i in zip(prompts, [40, 41, 42])]
    reordered = _completions(tiny_student, prompts[::-1], [42, 41, 40], **sampling)[::-1]
    assert batch == alone == reordered
    assert all(1 <= len(c) <= 12 for c in batch)
    eos = tok.eos_token_id
    assert all(eos not in c[:-1] for c in batch)  # nothing after the end-of-turn token
    if do_sample:  # another global index draws another completion
        assert _completions(tiny_student, prompts, [50, 51, 52], **sampling) != batch
    else:  # greedy is HF's own greedy decoding of the prompt alone
        ids = torch.tensor([prompts[1]])
        ref = tiny_student.llm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                        do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id)
        assert ref[0, ids.shape[1]:].tolist()[: len(batch[1])] == batch[1]
