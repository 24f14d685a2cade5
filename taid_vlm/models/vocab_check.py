"""Teacher/student vocabulary compatibility: the loss compares distributions over the same token ids."""

from __future__ import annotations

from .tokenization_check import check_same_tokenization, describe_tokenizer


def _describe(role: str, model) -> str:
    return (f"{role} tokenizer {describe_tokenizer(model.tokenizer)} with {len(model.tokenizer)} tokens, "
            f"output embedding {model.vocab_size} rows")


def first_difference(t_vocab: dict, s_vocab: dict) -> str:
    """The lowest id whose token differs between the two vocabularies, in words."""
    t_ids = {i: tok for tok, i in t_vocab.items()}
    s_ids = {i: tok for tok, i in s_vocab.items()}
    for i in range(max(len(t_ids), len(s_ids)) + 1):
        if t_ids.get(i) != s_ids.get(i):
            return f"first differing token: id {i} is {t_ids.get(i)!r} in the teacher, {s_ids.get(i)!r} in the student"
    return "same ids, different tokens"


def check_vocab_compatible(teacher, student) -> None:
    """ValueError naming both vocabularies unless the tokenizers map the same tokens to the same ids and
    turn the same texts into the same ids (tokenization_check.check_same_tokenization).

    Output embeddings padded beyond ``len(tokenizer)`` (on either side, by any amount) are fine: only the
    first ``len(tokenizer)`` rows are real tokens.
    """
    problems = []
    t_vocab, s_vocab = teacher.tokenizer.get_vocab(), student.tokenizer.get_vocab()
    if t_vocab != s_vocab:
        only_t = sorted(set(t_vocab) - set(s_vocab))[:5]
        only_s = sorted(set(s_vocab) - set(t_vocab))[:5]
        moved = sorted(k for k in set(t_vocab) & set(s_vocab) if t_vocab[k] != s_vocab[k])[:5]
        problems.append(f"token-to-id maps differ ({first_difference(t_vocab, s_vocab)}; only in teacher: "
                        f"{only_t}, only in student: {only_s}, different ids: {moved})")
    for role, model in (("teacher", teacher), ("student", student)):
        if model.vocab_size < len(model.tokenizer):
            problems.append(f"{role} output embedding has fewer rows ({model.vocab_size}) than its tokenizer "
                            f"has tokens ({len(model.tokenizer)})")
    if problems:
        raise ValueError("teacher and student vocabularies are not compatible: "
                         f"{_describe('teacher', teacher)}; {_describe('student', student)}: " + "; ".join(problems))
    check_same_tokenization(teacher.tokenizer, student.tokenizer)
