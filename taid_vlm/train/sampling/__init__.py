"""Student-generated sequences: the micro-batches of a step replaced by completions the student (or, with
seq_kd, the teacher) generates from the samples' prompts, as the official TAID code's GKD (`mixed`) and
DistiLLM (`adaptive`) baselines and TRL's GKD (`on_policy`, lmbda) train. See docs/sampling.md."""

from .completions import completion_part, cut_completion
from .policy import Decision, SamplingPolicy
from .replay_buffer import ReplayBuffer
from .step_sampler import StepSampler, build_step_sampler

__all__ = ["Decision", "ReplayBuffer", "SamplingPolicy", "StepSampler", "build_step_sampler", "completion_part", "cut_completion"]
