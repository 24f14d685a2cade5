"""Small references transcribed from the code the sampling modes follow, for tests/test_sampling*.py:
the official TAID sampler (SakanaAI/TAID src/sampler.py: SampleGenerator's branch choice and update,
ReplayBuffer.sample, run_sample) and TRL's GKDTrainer (trl/experimental/gkd/gkd_trainer.py:
training_step's lmbda / seq_kd choice, generate_on_policy_outputs). Read from the sources; only the
model call is left out (they take the generated sequences)."""

from __future__ import annotations

import random
from collections import deque

import torch


def official_branch(sampling_type: str, r: float, threshold: float, global_step: int, total_iters: int,
                    buffer_len: int, capacity: int, mixed_alpha: float = 0.5, replay_ratio: str = "decreasing"):
    """SampleGenerator.forward's branch for a uniform draw r: 'mixed', 'fresh', 'replay' or None."""
    if replay_ratio == "constant":
        samp_threshold = threshold * 0.5
    elif replay_ratio == "increasing":
        samp_threshold = threshold * global_step / total_iters
    else:
        samp_threshold = threshold * (1 - global_step / total_iters)
    if sampling_type == "mixed" and r < mixed_alpha:
        return "mixed"
    if sampling_type == "adaptive" and (r < samp_threshold or (r < threshold and buffer_len < capacity)):
        return "fresh"
    if sampling_type == "adaptive" and r < threshold:
        return "replay"
    return None


class OfficialUpdate:
    """SampleGenerator.update (loss_eps 0), the threshold a float32 tensor as there."""

    def __init__(self):
        self.adaptive_threshold = torch.tensor(0.0)
        self.prev_loss = None

    def update(self, loss):
        if self.prev_loss is None:
            self.prev_loss = loss
        elif loss >= self.prev_loss + 0.0:
            self.adaptive_threshold += 0.1
            self.adaptive_threshold = min(self.adaptive_threshold, 1.0)
            self.prev_loss = loss


def official_buffer_sample(entries: list, capacity: int, k: int, seed):
    """ReplayBuffer: deque(maxlen=capacity) filled in order, then random.sample(deque, k) (global random)."""
    memory = deque(maxlen=capacity)
    for e in entries:
        memory.append(e)
    random.seed(seed)
    return random.sample(memory, k=k)


def trl_branch(r: float, lmbda: float, seq_kd: bool):
    """GKDTrainer.training_step: 'student', 'teacher' or None (the fixed data)."""
    if r <= lmbda:
        return "student"
    if seq_kd:
        return "teacher"
    return None


def trl_on_policy_outputs(prompts, prompt_attention_mask, generated, eos_token_id):
    """GKDTrainer.generate_on_policy_outputs after model.generate returned `generated` [B, P + N]."""
    device = generated.device
    prompt_length = prompts.shape[1]
    completion_ids = generated[:, prompt_length:]
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_id, device=device))
    eos_idx = torch.full((is_eos.size(0),), is_eos.size(1), dtype=torch.long, device=device)
    eos_idx[is_eos.any(dim=1)] = is_eos.int().argmax(dim=1)[is_eos.any(dim=1)]
    sequence_indices = torch.arange(is_eos.size(1), device=device).expand(is_eos.size(0), -1)
    completion_mask = (sequence_indices <= eos_idx.unsqueeze(1)).int()
    new_attention_mask = torch.ones_like(generated)
    new_attention_mask[:, prompt_length:] = completion_mask
    new_attention_mask[:, :prompt_length] = prompt_attention_mask
    new_labels = generated.clone()
    new_labels[new_attention_mask == 0] = -100
    new_labels[:, :prompt_length] = -100
    return generated, new_attention_mask, new_labels


def official_run_sample(prompt_ids, full_ids, pad_token_id, max_new_tokens):
    """run_sample after model.generate returned `full_ids` for the left-padded `prompt_ids`."""
    bs = prompt_ids.size(0)
    max_length = prompt_ids.size(1) + max_new_tokens
    results = {"input_ids": torch.ones(bs, max_length, dtype=torch.long) * pad_token_id,
               "labels": torch.ones(bs, max_length, dtype=torch.long) * -100}
    input_ids = full_ids[:, : prompt_ids.size(1)]
    response_ids = full_ids[:, prompt_ids.size(1):]
    for i in range(len(input_ids)):
        result_id = torch.cat((input_ids[i][input_ids[i] != pad_token_id],
                               response_ids[i][response_ids[i] != pad_token_id]))
        input_id = input_ids[i][input_ids[i] != pad_token_id]
        response_id = response_ids[i][response_ids[i] != pad_token_id]
        results["input_ids"][i, : len(result_id)] = result_id
        results["labels"][i, len(input_id): len(result_id)] = response_id
    results["attention_mask"] = torch.where(results["input_ids"] != pad_token_id, 1, 0).long()
    return results
