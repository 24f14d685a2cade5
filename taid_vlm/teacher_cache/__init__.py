"""Offline teacher: cache the teacher's top-k log-probs (or its final hidden states) beside the shards
once, then distill with no teacher in memory.

Write (once, one or many processes, the training run's teacher placement)::

    python -m data_tools.cache_teacher configs/tiny_text.yaml --k 64 --out data/shapes_text_topk64
    python -m data_tools.cache_teacher configs/tiny_text.yaml --format hidden --out data/shapes_text_hidden

Train from it: ``teacher: {cache: data/shapes_text_topk64}`` (or the override ``teacher.cache=DIR``);
the teacher model is not built. Batches then carry ``batch["teacher_topk"] = {"ids": int32 [K, k],
"logprobs": float16 [K, k], "log_tail": float32 [K], "tail": "uniform"}`` (a hidden-state cache:
``{"hidden": [K, H], "lm_head": LMHead}``), row k paired with ``student.loss_targets[k]``;
``source.cached_teacher`` turns it into the loss's TeacherSource.

Which format (measured in benchmarks/cache_bench.py, table in docs/benchmarks.md):
- ``--format hidden`` (manifest version 2): the teacher's final hidden state per supervised token
  (2H or 4H + 4 bytes) and its lm_head once per cache (lm_head.py). The loss recomputes the teacher's
  logits with the online teacher's own matmul, so stored in the teacher's dtype (the default) the cached
  loss IS the online loss for every loss and every t; bf16 storage of a float32 teacher stays under
  0.2 % gradient error at V = 151,936. Costs H/k-ish more disk than top-k (e.g. 1,796 vs 392 bytes per
  token at H = 896) and the [N, H] x [H, V] teacher matmul per chunk at train time (the teacher's
  lm_head only, no teacher forward). Use it for TAID at small t, reverse KL, AKL, and any run that must
  match online training.
- ``--format topk`` (default, version 1, old caches unchanged): exact for forward KL up to the tail
  mass (<= 0.5 %), but for TAID at small t and reverse KL the error depends on where the STUDENT's
  mass is: with a student far from the teacher (early training) no tail model recovers it (k = 64 at
  V = 151,936: TAID t = 0.4 ~80 %, RKL ~95 % gradient error with either tail). ``--tail student``
  spreads the tail mass like the student's own tail (helps a student near a Zipf teacher: RKL 45 % ->
  12 %, but hurts on a teacher whose tail is a Gaussian bulk); storing sampled tail tokens helps little.

Format (format.py). One companion tar per data shard, same file name, same ``__key__``s in the same
order, one record per raw data sample: for each supervised text token of the TEACHER's rendering, the
target token id, the top-k ids (int32) and log-probs (float16) in decreasing order, and the log of the
remaining probability mass (float32, a log-sum-exp over the other V - k log-probs, so it stays exact
when the tail is tiny). 6k + 8 bytes per supervised token (392 at k = 64) plus 16 bytes and one tar
member per sample. Samples the teacher cannot render get a ``skip`` record with the reason.
``manifest.json`` (manifest.py): teacher config + weights fingerprint, tokenizer vocabulary hash, k,
V, the rendering settings (max_length, text_only, caption instruction, chat template, image tokens,
image transform) and their hash, per-shard statistics. Checked when training starts: a field that
disagrees with the run is an error that names it.

Alignment (reader.py, taid_vlm/data/sample_reader.py). The pipeline pairs each data shard's raw samples
with its companion's raw samples, key checked, BEFORE the block shuffle: shuffling, the split over
ranks and workers, and the exact resume position apply to the pair, so they cannot drift apart. Then
the student's supervised tokens are paired with the cached targets (identical lists: all; otherwise
the longest common subsequence, the online path's rule), and a final check in every batch compares
the cached targets with ``student.loss_targets``. A key mismatch is an error; a truncated companion
makes the rest of its shard counted skips (``teacher_cache_missing``); a record that does not parse
is a counted skip (``teacher_cache_corrupt``); a data shard whose size changed since caching, or that
has no companion, stops the run at startup.

The top-k approximation. The teacher distribution over the full vocabulary is represented as its top-k
log-probs plus the tail mass spread uniformly over the other V - k tokens (``tail: uniform``), or in
proportion to the student's probabilities there (``tail: student``; the evaluator, which has no
student logits at hand, uses the uniform tail):

    log p~_v = log p_v                      for v in top-k
    log p~_v = log_tail - log(V - k)        otherwise (uniform)
    log p~_v = log_tail + log q_v - log q(tail)       otherwise (student)

rebuilt chunk by chunk inside the chunked loss (taid_vlm.losses.chunked.topk_log_probs_into; never as
an [N, V] tensor) into the buffer that online teacher logits would fill. All losses are functions of
softmax(a * z_teacher + b) with a per-row constant b, so log-probs stand in for logits exactly; TAID
interpolates in logit space with them: p_t = softmax((1 - t) * stopgrad(z_S) + t * log p~).
- k = V: p~ = p (up to the 16-bit rounding of the stored log-probs; exact with float32 storage).
- Forward KL (and TAID near t = 1, CE-style metrics) sees the tail only through its mass: the error is
  of the order of the tail mass (measured: 0.3 % of the loss at k = 64 of V = 4096, tail mass 0.9 %).
- Reverse KL, AKL and TAID at small t weigh the teacher's log-probs where the STUDENT has mass, so
  flattening the tail's shape costs more (measured on a Zipf teacher with a far-off student, k = 64:
  TAID t = 0.4 loss -59 %, gradient 41 % relative error; RKL -33 %); k = 256 halves it
  (tests/test_teacher_cache_loss.py prints the numbers); at V = 151,936 it is worse (see above).
  Prefer the hidden-state format for these.
- Eval metrics (taid_vlm.train.evaluate): top-1 agreement and teacher accuracy are exact (the stored
  top-1 is the teacher's argmax); teacher CE is exact when the target is in the top-k (else the
  tail-uniform value); eval_kl is KL(p~ || q_S).
"""

from .format import HiddenRecord, TopKRecord, bytes_per_token, decode, encode, encode_hidden
from .manifest import CacheMismatchError, check_manifest, read_manifest, vocab_hash
from .reader import TeacherCache

__all__ = ["TeacherCache", "TopKRecord", "HiddenRecord", "encode", "encode_hidden", "decode",
           "bytes_per_token",
           "CacheMismatchError", "check_manifest", "read_manifest", "vocab_hash"]
