"""`pipeline("text-generation")` on a saved tiny MoRE checkpoint and a tokenizer built offline, and streamers.

The pipeline loads the model by path (Auto classes), tokenizes, left-pads batches, forwards generate kwargs and
decodes: its text must be what `model.generate` produces, with or without the cache, at any per-call depth; a
streamer must receive exactly the generated text."""

import functools
import threading

import pytest
import torch
from helpers import EXPERT_TYPES, VOCAB, tiny_model
from test_generation import scale_weights
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TextIteratorStreamer, TextStreamer, pipeline

import modeling_more  # noqa: F401  (registers MoRE with the Auto classes)


NEW_TOKENS = 8
PROMPTS = ["w17 w42 w8 w99 w23", "w5 w6", "w61 w30 w71"]
# min_new_tokens: no early eos, so every run makes the same number of steps (the forward spies count them).
GREEDY = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
SPECIAL = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def word_tokenizer():
    """A word-level tokenizer over the tiny vocabulary: ids 0-3 special (matching `tiny_config`), "w4".."w99" words.

    Word level (rather than byte-level BPE) so that any id a random model emits decodes to whole words: streamed
    text is then comparable piece by piece with the decoded sequence."""
    vocab = {token: i for i, token in enumerate(SPECIAL.values())}
    vocab.update({f"w{i}": i for i in range(len(vocab), VOCAB)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Left padding: decoder-only batches must end with their last real token.
    return PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="left", **SPECIAL)


CASES = [(e, "linear", 1) for e in EXPERT_TYPES] + [("recurrent", "gru_token", 2), ("parallel", "rnn_token", 2)]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: "-".join(map(str, c)))
def checkpoint(request, tmp_path_factory):
    """A saved tiny model and tokenizer in one directory; the in-memory model is returned for reference runs."""
    expert_type, router_type, iterations = request.param
    model = scale_weights(
        tiny_model(
            expert_type=expert_type, router_type=router_type, num_moe_iterations=iterations, num_experts_per_tok=2
        )
    )
    tokenizer = word_tokenizer()
    path = tmp_path_factory.mktemp(f"{expert_type}-{router_type}-{iterations}")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer, str(path)


@pytest.fixture(scope="module")
def generator(checkpoint):
    _, _, path = checkpoint
    return pipeline("text-generation", model=path, tokenizer=path)


def _reference(model, tokenizer, prompt, **kwargs):
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        return model.generate(ids, pad_token_id=tokenizer.pad_token_id, **GREEDY, **kwargs)[0]


def test_pipeline_loads_the_checkpoint(checkpoint, generator):
    model, _, _ = checkpoint
    assert isinstance(generator.model, type(model))
    assert not generator.model.training
    # The pipeline's model is the saved one (not a fresh init), so every comparison below is about generation.
    for (name, p), q in zip(model.state_dict().items(), generator.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def _new_text(tokenizer, prompt, sequence):
    """What the pipeline and the streamers show of a generated sequence: its new tokens, decoded."""
    return tokenizer.decode(sequence[len(tokenizer(prompt).input_ids) :], skip_special_tokens=True)


def test_pipeline_matches_generate(checkpoint, generator):
    model, tokenizer, _ = checkpoint
    for prompt in PROMPTS:
        expected = _reference(model, tokenizer, prompt)
        (result,) = generator(prompt, return_tensors=True, **GREEDY)
        assert result["generated_token_ids"] == expected.tolist()
        new_text = _new_text(tokenizer, prompt, expected)
        assert new_text
        # Transformers 5 builds the full text as prompt + decoded new tokens (a word-level tokenizer has no space
        # token, so none is inserted at the seam).
        (result,) = generator(prompt, **GREEDY)
        assert result["generated_text"] == prompt + new_text
        (result,) = generator(prompt, return_full_text=False, **GREEDY)
        assert result["generated_text"] == new_text


def test_pipeline_without_cache_gives_the_same_tokens(checkpoint, generator, monkeypatch):
    model = generator.model
    seen = []
    original = model.forward

    @functools.wraps(original)
    def spy(*args, **kwargs):
        seen.append((kwargs.get("use_cache"), kwargs["input_ids"].shape[1]))
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    for prompt in PROMPTS:
        seen.clear()
        (cached,) = generator(prompt, return_tensors=True, use_cache=True, **GREEDY)
        # The flag really reached forward: after prefill, cached decoding feeds one token per step ...
        assert [flag for flag, _ in seen] == [True] * NEW_TOKENS and seen[-1][1] == 1
        seen.clear()
        (uncached,) = generator(prompt, return_tensors=True, use_cache=False, **GREEDY)
        # ... and cache-free decoding feeds the whole sequence every step.
        assert [flag for flag, _ in seen] == [False] * NEW_TOKENS and seen[-1][1] > 1
        assert cached["generated_token_ids"] == uncached["generated_token_ids"]


def test_pipeline_left_padded_batch_matches_single_prompts(generator):
    """The pipeline pads a batch on the left (tokenizer setting) and masks it: rows equal their single runs."""
    single = [generator(prompt, **GREEDY)[0]["generated_text"] for prompt in PROMPTS]
    batched = [out[0]["generated_text"] for out in generator(PROMPTS, batch_size=len(PROMPTS), **GREEDY)]
    assert batched == single
    assert len(set(single)) == len(PROMPTS)


def test_pipeline_forwards_depth(checkpoint, generator):
    """Depth kwargs go through the pipeline to generate (same tokens as generate at that depth; that generate applies
    them at every step is `test_generation.test_generate_num_recurrent_steps`)."""
    model, tokenizer, _ = checkpoint
    prompt = PROMPTS[0]
    texts = {}
    for steps, iterations in ((1, 1), (6, 3)):
        expected = _reference(model, tokenizer, prompt, num_recurrent_steps=steps, num_moe_iterations=iterations)
        (result,) = generator(
            prompt, return_tensors=True, num_recurrent_steps=steps, num_moe_iterations=iterations, **GREEDY
        )
        assert result["generated_token_ids"] == expected.tolist()
        texts[steps] = result["generated_token_ids"]
    # Expert depth changes recurrent experts, iterations change every expert type.
    assert texts[1] != texts[6], "depth passed through the pipeline changed nothing"


def test_text_streamer_receives_the_generated_text(checkpoint, generator, capsys):
    model, tokenizer, _ = checkpoint
    prompt = PROMPTS[0]
    expected = _reference(model, tokenizer, prompt)
    new_text = _new_text(tokenizer, prompt, expected)
    capsys.readouterr()
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    (result,) = generator(prompt, streamer=streamer, **GREEDY)
    # TextStreamer prints the new text piece by piece and a newline at the end of the stream.
    assert capsys.readouterr().out == new_text + "\n"
    assert result["generated_text"] == prompt + new_text


def test_text_iterator_streamer_receives_the_generated_text(checkpoint):
    """The documented pattern: generate in a thread, iterate the streamer in the caller."""
    model, tokenizer, _ = checkpoint
    prompt = PROMPTS[1]
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = _reference(model, tokenizer, prompt)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)

    def run():
        with torch.no_grad():
            model.generate(ids, streamer=streamer, pad_token_id=tokenizer.pad_token_id, **GREEDY)

    thread = threading.Thread(target=run)
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert "".join(pieces) == _new_text(tokenizer, prompt, expected)
    assert len(pieces) > 1, "the text arrived in one piece: nothing was streamed"


def test_pipeline_from_auto_classes_with_remote_code_flag(checkpoint):
    """`trust_remote_code=True` (what a Hub user passes) on a local checkpoint also works with the pipeline."""
    model, tokenizer, path = checkpoint
    loaded = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    generator = pipeline("text-generation", model=loaded, tokenizer=tokenizer)
    (result,) = generator(PROMPTS[2], return_tensors=True, **GREEDY)
    assert result["generated_token_ids"] == _reference(model, tokenizer, PROMPTS[2]).tolist()
