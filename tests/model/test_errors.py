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


def test_inputs_embeds_wrong_width(model):
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.zeros(2, 6, model.config.hidden_size // 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_input_ids_not_integers(model, dtype):
    with pytest.raises(ValueError, match="input_ids"):
        model(random_ids(2, 6).to(dtype))


@pytest.mark.parametrize("shape", [(2, 5), (3, 6), (5,), (2, 6, 1)])
def test_position_ids_wrong_shape(model, shape):
    with pytest.raises(ValueError, match="position_ids"):
        model(random_ids(2, 6), position_ids=torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize("shape", [(6,), (1, 6), (2, 6)])
def test_position_ids_shapes_accepted(model, shape):
    positions = torch.arange(6).expand(shape) if len(shape) > 1 else torch.arange(6)
    with torch.no_grad():
        model(random_ids(2, 6), position_ids=positions)


@pytest.mark.parametrize("bad", [VOCAB, -5])
def test_label_outside_the_vocabulary(model, bad):
    labels = random_ids(2, 6)
    labels[0, 0] = -100  # ignored positions stay allowed
    labels[1, 4] = bad
    with pytest.raises(ValueError, match="labels"):
        model(random_ids(2, 6), labels=labels)


def test_float_labels(model):
    with pytest.raises(ValueError, match="labels"):
        model(random_ids(2, 6), labels=random_ids(2, 6).float())


def test_labels_with_logits_to_keep(model):
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(random_ids(2, 6), labels=random_ids(2, 6), logits_to_keep=1)


def test_boolean_adaptive_exit_threshold(model):
    with pytest.raises(ValueError, match="adaptive_exit_threshold"):
        model(random_ids(2, 6), adaptive_exit_threshold=True)
