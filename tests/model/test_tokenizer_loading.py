"""`AutoTokenizer.from_pretrained(checkpoint)` on a MoRE checkpoint needs neither `trust_remote_code` nor a prompt."""

import os
import subprocess
import sys
import textwrap

import pytest
from helpers import REPO_ROOT, tiny_model


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from more_tools.data import train_bpe_tokenizer

    path = tmp_path_factory.mktemp("ckpt")
    tiny_model().save_pretrained(path)
    train_bpe_tokenizer(["Mary went to the kitchen. Where is Mary? kitchen"] * 10, vocab_size=300).save_pretrained(
        path
    )
    return path


def _load_tokenizer(checkpoint, first_lines):
    """Run a fresh Python with stdin closed, outside the repository (MoRE's files come from the checkpoint only)."""
    code = textwrap.dedent(
        f"""
        import sys
        sys.path = [p for p in sys.path if p not in ("", {os.getcwd()!r})]
        {first_lines}
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained({str(checkpoint)!r})
        print("LOADED", type(tokenizer).__name__, tokenizer.pad_token_id)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=ENV,
        cwd=str(checkpoint.parent),
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "LOADED" in result.stdout
    assert "custom code" not in output and "trust_remote_code" not in output, output
    assert "model of type" not in output, output


def test_tokenizer_after_loading_the_model_as_remote_code(checkpoint):
    _load_tokenizer(
        checkpoint,
        "from transformers import AutoModelForCausalLM; "
        f"AutoModelForCausalLM.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)",
    )


def test_tokenizer_on_the_installed_path(checkpoint):
    repo = REPO_ROOT
    _load_tokenizer(checkpoint, f"sys.path.insert(0, {repo!r}); import modeling_more")
