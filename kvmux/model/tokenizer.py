"""The model's tokenizer, run by the `tokenizers` library without transformers in the serving process.

transformers decides how a checkpoint's tokenizer files become a tokenizer (which class, its post-processor,
its special tokens, its chat template). kvmux lets it decide once per set of files and keeps the result under
the disk cache: the fast tokenizer as transformers configured it, and the few settings around it. Every later
load reads that with `tokenizers` alone, so the tokens are transformers' own while the process saves the
memory its import and its tokenizer objects take (about 100 MB of the 500 MB `make run` used to peak at). Chat
templates are rendered by transformers' own renderer, whose module loads without the rest of the library.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import tokenizers

from kvmux.model.conversion_cache import cached_folder

# The files transformers may read to build a tokenizer (config.json names its class when tokenizer_config.json
# does not): a change to any of them is a new cache entry.
SOURCE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                "chat_template.jinja", "chat_template.json", "tokenizer.model", "tekken.json", "vocab.json",
                "merges.txt", "config.json")
_BACKEND, _SETTINGS = "tokenizer.json", "kvmux_tokenizer.json"
_FORMAT = 4  # of the settings file: a change to what _build writes makes new entries


@dataclass
class Tokenizer:
    backend: tokenizers.Tokenizer
    special_tokens: dict[str, str]  # bos_token, eos_token, ...: what a chat template sees by those names
    chat_template: str | None
    clean_up_spaces: bool  # transformers' space clean-up after decoding (WordPiece-style tokenizers only)

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def detokenize(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        text = self.backend.decode(token_ids, skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self.clean_up_spaces else text

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """The conversation as the model's template writes it, as transformers' apply_chat_template renders it
        (keys whose value is None dropped, the special tokens passed by name, `tools` as the template's `tools`)."""
        if not self.chat_template:
            raise ValueError("the model has no chat template")
        if not messages:
            raise ValueError("cannot apply the chat template to an empty conversation")
        chat = [{k: v for k, v in message.items() if v is not None} for message in messages]
        rendered, _ = chat_renderer()([chat], tools=tools, chat_template=self.chat_template,
                                      add_generation_prompt=add_generation_prompt, **self.special_tokens)
        return rendered[0]


def chat_renderer():
    """transformers' chat-template renderer. Its import takes half a second and 25 MB (it brings huggingface_hub
    and more), so the engine imports it once the weights are in, where it neither raises the peak of loading nor
    makes a first request wait for it."""
    from transformers.utils.chat_template_utils import render_jinja_template

    return render_jinja_template


def _merges_as_strings(path: Path) -> None:
    """Rewrite a BPE's merges ["a", "b"] as "a b", the older form tokenizers still reads, where no token has a
    space: parsing a 262k vocabulary's 515k merges as pairs peaked at 355 MB over the start (Gemma 3), as strings at
    164 MB (the Rust parser buffers every element of the list, a pair as three allocations)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    merges = data["model"].get("merges") or []
    if not merges or not isinstance(merges[0], list) or any(" " in a or " " in b for a, b in merges):
        return
    data["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _read_backend(path: Path, bpe_parts: bool) -> tokenizers.Tokenizer:
    """The tokenizer saved at `path`; with `bpe_parts`, its BPE's vocabulary and merges read by Python and handed
    to tokenizers as a dict and a list. tokenizers' own reader parses the model into a JSON tree first, whose
    nodes (one per dozen entries) it frees from among the vocabulary's strings, which it keeps: Gemma 3's 262k
    vocabulary held 89 MB, 16 of them freed heap pinned between live strings, against 74 MB this way (read in
    0.1 s more). _build checks that both ways give the same tokenizer."""
    if not bpe_parts:
        return tokenizers.Tokenizer.from_file(str(path))
    data = json.loads(path.read_bytes())
    model, added = data["model"], data["added_tokens"]
    vocab, merges = model.pop("vocab"), model.pop("merges")
    options = {k: v for k, v in model.items() if k != "type" and v is not None}  # None: the constructor's default
    data["model"], data["added_tokens"] = {**model, "vocab": {}, "merges": []}, []
    backend = tokenizers.Tokenizer.from_str(json.dumps(data))  # the normalizer, pre-tokenizer, decoder and so on
    # Merges as "a b" strings (_merges_as_strings) split where tokenizers' reader splits them.
    backend.model = tokenizers.models.BPE(vocab, [tuple(m.split(" ") if isinstance(m, str) else m) for m in merges],
                                          **options)
    del vocab, merges
    # The added tokens take their ids from the model's vocabulary (or the ids after it), so they are added once the
    # model is in, in the file's order, as tokenizers' reader adds them (in runs of one kind: each call rebuilds
    # the matcher of every added token).
    for special, run in itertools.groupby(added, key=lambda t: t["special"]):
        tokens = [tokenizers.AddedToken(t["content"], single_word=t["single_word"], lstrip=t["lstrip"],
                                        rstrip=t["rstrip"], normalized=t["normalized"], special=special) for t in run]
        (backend.add_special_tokens if special else backend.add_tokens)(tokens)
    return backend


def _same_from_parts(path: Path) -> bool:
    """Whether _read_backend builds from a BPE's parts exactly the tokenizer tokenizers reads from `path`."""
    try:
        parts = _read_backend(path, True).to_str()  # one tokenizer at a time: each holds 100 MB for a large vocabulary
        return parts == tokenizers.Tokenizer.from_file(str(path)).to_str()
    except Exception:  # noqa: BLE001 - tokenizers raises plain Exception; any failure: it reads the file itself
        return False


def clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization: no space before punctuation and common English contractions. A copy:
    transformers keeps it as a method of its tokenizer base class, whose import this module exists to avoid."""
    for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                           (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(spaced, joined)
    return text


def load_tokenizer(folder: Path) -> Tokenizer:
    """The tokenizer of a model folder, built by transformers on first use of these files and cached."""
    settings_folder = cached_folder(f"tokenizer-{_source_key(folder)}", lambda dst: _build(folder, dst))
    settings = json.loads((settings_folder / _SETTINGS).read_text())
    backend = _read_backend(settings_folder / _BACKEND, settings["bpe_parts"])
    backend.encode_special_tokens = settings["split_special_tokens"]  # transformers sets it on every encode
    return Tokenizer(backend, settings["special_tokens"], settings["chat_template"], settings["clean_up_spaces"])


def _source_key(folder: Path) -> str:
    # Other versions of transformers or tokenizers may build or read it otherwise.
    versions = f"{_FORMAT} {importlib.metadata.version('transformers')} {importlib.metadata.version('tokenizers')}"
    h = hashlib.sha256(versions.encode())
    for name in SOURCE_FILES:
        if (folder / name).is_file():
            h.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return h.hexdigest()[:24]


def _build(folder: Path, dst: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(folder)
    if not hf.is_fast:
        raise ValueError(f"the tokenizer in {folder} has no fast (tokenizers) form; kvmux runs fast tokenizers only")
    try:
        template = hf.get_chat_template()
    except ValueError:  # transformers raises when the tokenizer has none
        template = None
    backend = hf.backend_tokenizer
    bpe = type(backend.model).__name__ == "BPE"
    forced = getattr(hf, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
    # A tokenizer.json may carry truncation or padding settings, which transformers switches off on every encode
    # call: saved with them, every prompt would be cut or padded.
    backend.no_truncation()
    backend.no_padding()
    backend.save(str(dst / _BACKEND))
    if bpe:
        _merges_as_strings(dst / _BACKEND)
    (dst / _SETTINGS).write_text(json.dumps({
        "special_tokens": hf.special_tokens_map, "chat_template": template,
        "clean_up_spaces": bool(hf.clean_up_tokenization_spaces) and (not bpe or forced),
        "split_special_tokens": bool(getattr(hf, "split_special_tokens", False)),
        "bpe_parts": bpe and _same_from_parts(dst / _BACKEND)}))
