"""Bad inputs raise a clear ValueError naming the problem (not an IndexError deep inside the model)."""

import re

import pytest
import torch
from helpers import VOCAB, random_ids, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(expert_type="recurrent")


def test_token_id_at_vocab_size(model):
    ids = random_ids(2, 6)
    ids[1, 3] = VOCAB
    with pytest.raises(ValueError, match="vocab_size"):
        model(ids)


def test_negative_token_id(model):
    ids = random_ids(2, 6)
    ids[0, 0] = -1
    with pytest.raises(ValueError, match="input_ids"):
        model(ids)


def test_largest_valid_token_id_is_accepted(model):
    ids = random_ids(2, 6)
    ids[0, 0], ids[1, 5] = VOCAB - 1, 0
    with torch.no_grad():
        assert model(ids).logits.shape == (2, 6, VOCAB)


@pytest.mark.parametrize("shape", [(2, 5), (2, 7), (1, 6), (2, 6, 1), (12,)])
def test_attention_mask_wrong_shape(model, shape):
    ids = random_ids(2, 6)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(shape, dtype=torch.long))


@pytest.mark.parametrize("shape", [(2, 5), (2, 7), (1, 6), (12,)])
def test_labels_wrong_shape(model, shape):
    ids = random_ids(2, 6)
    labels = torch.zeros(shape, dtype=torch.long)
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=labels)


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_bad_num_recurrent_steps(model, value):
    ids = random_ids(2, 6)
    with pytest.raises(ValueError, match="num_recurrent_steps"):
        model(ids, num_recurrent_steps=value)


@pytest.mark.parametrize("value", [0, -3])
def test_bad_num_moe_iterations(model, value):
    ids = random_ids(2, 6)
    with pytest.raises(ValueError, match="num_moe_iterations"):
        model(ids, num_moe_iterations=value)


def test_generate_bad_num_recurrent_steps(model):
    ids = random_ids(1, 4)
    with pytest.raises(ValueError, match="num_recurrent_steps"):
        model.generate(ids, max_new_tokens=2, do_sample=False, num_recurrent_steps=0)


def test_input_ids_and_embeds_together(model):
    ids = random_ids(2, 6)
    with pytest.raises(ValueError, match="input_ids"):
        model(ids, inputs_embeds=model.model.embed_tokens(ids))


def test_input_ids_wrong_rank(model):
    with pytest.raises(ValueError, match="input_ids"):
        model(random_ids(2, 6).reshape(-1))


@pytest.mark.parametrize("shape", [(1, 0), (0, 5), (0, 0)])
def test_empty_input_ids(model, shape):
    with pytest.raises(ValueError, match=re.escape(f"`input_ids` has shape {shape}: at least one sequence")):
        model(torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize("shape", [(1, 0), (0, 5)])
def test_empty_inputs_embeds(model, shape):
    embeds = torch.zeros(*shape, model.config.hidden_size)
    with pytest.raises(ValueError, match=re.escape(f"`inputs_embeds` has shape {tuple(embeds.shape)}")):
        model(inputs_embeds=embeds)


@pytest.mark.parametrize("shape", [(1, 0), (0, 5)])
def test_generate_empty_prompt(model, shape):
    with pytest.raises(ValueError, match=re.escape(f"`input_ids` has shape {shape}: at least one sequence")):
        model.generate(torch.zeros(shape, dtype=torch.long), max_new_tokens=2, do_sample=False)


def test_inputs_embeds_wrong_rank(model):
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.zeros(6, model.config.hidden_size))
