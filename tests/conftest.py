import json
import os
import shutil

# Tests never reach a model hub: everything they load is built by the tests or shipped in a package.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from engine_helpers import MAX_NEW, PROMPTS, hf_greedy  # noqa: E402
from tiny_model import make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> str:
    """The tiny random-weight Llama (4 query heads, 2 KV heads, vocab 320) with its tokenizer: the model
    every engine, server and example test runs."""
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "m"))


@pytest.fixture(scope="session")
def tiny_draft(tmp_path_factory) -> str:
    """Another tiny random model with the tiny model's tokenizer (one layer, other weights): a draft model that
    agrees with the tiny one now and then."""
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny_draft") / "m", num_layers=1, seed=1))


@pytest.fixture(scope="session")
def tiny_long(tiny, tmp_path_factory) -> str:
    """The tiny model with 2048 positions instead of 256 (its random weights take any position): room for a
    conversation with tools, whose description in the generic tool-calling format alone outgrows 256 tokens
    of its tokenizer (about one token per character)."""
    model = tmp_path_factory.mktemp("tiny_long") / "m"
    shutil.copytree(tiny, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))
    return str(model)


@pytest.fixture(scope="module")
def scratch_cache(tmp_path_factory):
    """The folders kvmux derives from the model files a module writes (converted copies, metadata) go to a
    scratch cache of the module's own, not ~/.cache/kvmux."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVMUX_CACHE_DIR", str(tmp_path_factory.mktemp("kvmux-cache")))
        yield


@pytest.fixture(scope="session")
def hf_tiny(tiny):
    """transformers' own model on the same weights: the reference outputs are checked against."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def reference(hf_tiny) -> list[list[int]]:
    """transformers' greedy continuation of each of PROMPTS, MAX_NEW tokens, past end-of-sequence."""
    return hf_greedy(hf_tiny, PROMPTS, MAX_NEW)
