"""`more_tools.metrics.score_answers`, which scores every table of the main job, counts an example exactly when
greedy decoding (`generate`, with its cache) would produce its answer and then stop."""

import pytest
import torch
from helpers import EXPERT_TYPES, VOCAB, random_ids, tiny_model

from more_tools.data import IGNORE_INDEX, TensorExamples
from more_tools.metrics import score_answers


PAD, BOS, EOS = 0, 1, 2
FIRST_WORD = 3  # ids below are special tokens


def _greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([[BOS, *prompt]])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    return out[0, ids.shape[1] :].tolist()


def _answers(model, prompt: list[int]) -> list[list[int]]:
    """Candidate answers to `prompt`: the model's own greedy answer (the tokens before its eos), the same one token
    short, and with its first token changed."""
    continuation = _greedy(model, prompt, max_new_tokens=5)
    answer = continuation[: continuation.index(EOS)] if EOS in continuation else continuation
    candidates = [answer]
    if answer:
        candidates.append(answer[:-1])
        changed = FIRST_WORD + (answer[0] - FIRST_WORD + 1) % (VOCAB - FIRST_WORD)
        candidates.append([changed, *answer[1:]])
    return [candidate for candidate in candidates if candidate]


def _examples(rows: list[tuple[list[int], list[int]]]) -> TensorExamples:
    """(prompt, answer) pairs as `tokenize_qa` lays them out: bos + prompt + answer + eos, labels on answer and eos,
    right-padded to the longest."""
    width = max(len(prompt) + len(answer) + 2 for prompt, answer in rows)
    columns = {
        "input_ids": torch.full((len(rows), width), PAD),
        "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE_INDEX),
    }
    for row, (prompt, answer) in enumerate(rows):
        tokens = [BOS, *prompt, *answer, EOS]
        columns["input_ids"][row, : len(tokens)] = torch.tensor(tokens)
        columns["attention_mask"][row, : len(tokens)] = 1
        columns["labels"][row, len(prompt) + 1 : len(tokens)] = torch.tensor([*answer, EOS])
    return TensorExamples(columns)


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
def test_score_answers_counts_exactly_what_greedy_decoding_answers(expert_type):
    # Untied: with tied embeddings a fresh tiny model repeats its last input token forever.
    model = tiny_model(expert_type=expert_type, tie_word_embeddings=False)
    with torch.no_grad():  # eos the argmax at a good share of positions, so greedy answers end within a few tokens
        model.lm_head.weight[EOS] = 3 * model.lm_head.weight[FIRST_WORD]
    prompts = [random_ids(1, length, seed=seed)[0].tolist() for seed, length in enumerate([3, 5, 7, 4, 6, 8] * 3)]
    rows = [(prompt, answer) for prompt in prompts for answer in _answers(model, prompt)]
    # Independent of teacher forcing: decode one token past the answer and compare.
    expected = [_greedy(model, prompt, len(answer) + 1) == [*answer, EOS] for prompt, answer in rows]
    assert 0 < sum(expected) < len(expected)  # both outcomes occur, or the comparison proves little
    hits = score_answers(model, _examples(rows), batch_size=4)  # several batches, sorted by length inside
    assert hits.tolist() == [int(hit) for hit in expected]
