"""The training data path: examples tokenized to their real length give the same batches as examples padded to
`max_length` (after `collate` cuts the padding no row uses), for the comparison job's data and a reasoning task, and
`TensorExamples` (pre-built tensors, one index per column) gives the same batches as the `datasets` path."""

import pytest
import torch

from more_tools.data import (
    TensorExamples,
    build_depth_dataset,
    build_reasoning_dataset,
    tokenize_qa,
    train_bpe_tokenizer,
    train_word_level_tokenizer,
)
from more_tools.training import collate


def assert_same_batches(raw, tokenizer, max_length, answer_only_loss=True):
    short = tokenize_qa(raw, tokenizer, max_length, answer_only_loss=answer_only_loss)
    full = tokenize_qa(raw, tokenizer, max_length, answer_only_loss=answer_only_loss, pad_to_longest=False)
    assert len(full[0]["input_ids"]) == max_length
    assert len(short[0]["input_ids"]) == max(map(sum, full["attention_mask"])) < max_length
    generator = torch.Generator().manual_seed(0)
    for size in (1, 7, 32):
        for _ in range(5):
            index = torch.randperm(len(raw), generator=generator)[:size].tolist()
            # As Trainer's DataLoader fetches a batch: one batched read, then the collator.
            new, old = collate(short.__getitems__(index)), collate(full.__getitems__(index))
            tensors = collate(TensorExamples.from_dataset(short).__getitems__(index))
            assert new.keys() == old.keys() == tensors.keys() == {"input_ids", "attention_mask", "labels"}
            for name in new:
                assert torch.equal(new[name], old[name]), name
                assert torch.equal(tensors[name], old[name]), name


def test_compare_job_batches_are_unchanged():
    raw = build_depth_dataset({"addition": ([1, 2, 3], [2, 3])}, num_train=300, num_test_per_difficulty=4, seed=0)
    tokenizer = train_word_level_tokenizer([*raw["train"]["text"], *raw["test"]["text"]], model_max_length=128)
    assert_same_batches(raw["train"], tokenizer, 128)


@pytest.mark.parametrize("answer_only_loss", [True, False])
def test_reasoning_batches_are_unchanged(answer_only_loss):
    raw = build_reasoning_dataset(["babi1"], 48, 0, 0, seed=3)["train"]
    tokenizer = train_bpe_tokenizer(raw["text"], vocab_size=300, model_max_length=256)
    assert_same_batches(raw, tokenizer, 256, answer_only_loss)


def test_tensor_examples_index_like_the_dataset_and_refuse_ragged_columns():
    raw = build_depth_dataset({"addition": ([1, 2], [2])}, num_train=50, num_test_per_difficulty=4, seed=1)
    tokenizer = train_word_level_tokenizer(raw["train"]["text"], model_max_length=32)
    tokenized = tokenize_qa(raw["train"], tokenizer, 32)
    examples = TensorExamples.from_dataset(tokenized)
    assert len(examples) == len(tokenized) == 50
    assert examples[7]["input_ids"].tolist() == tokenized[7]["input_ids"]
    chosen = [9, 2, 30]
    assert examples.select(chosen).columns["input_ids"].tolist() == tokenized.select(chosen)["input_ids"]
    with pytest.raises(ValueError, match="one row per example"):
        TensorExamples({"input_ids": torch.zeros(3, 4), "labels": torch.zeros(2, 4)})
