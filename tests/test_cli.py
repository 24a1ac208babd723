"""The command line: bad usage is refused before anything loads, in one line naming the flag and the fix;
--help shows each default once and the allowed values; the sync LLM wrapper's conveniences."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

import kvmux.engine.supervisor
from kvmux import LLM, SamplingParams
from kvmux.cli import main as cli

from engine_helpers import PROMPT, greedy


@pytest.fixture
def no_load(monkeypatch):
    """Loading the model fails the test: the errors below must come before it."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad setting was refused")
    monkeypatch.setattr(kvmux.engine.supervisor, "load_model", load)


def refused(capsys, argv: list[str]) -> str:
    """Run the CLI; it must exit with status 2 and say why in one error line, without a traceback."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize("argv, says", [
    (["generate", "--max_tokens", "5", "hi"], "did you mean --max-tokens?"),
    (["generate", "--max-tokens", "0", "hi"], "--max-tokens must be an integer >= 1"),
    (["generate", "--device", "gpu", "hi"], "invalid choice: 'gpu' (choose from 'cpu', 'cuda')"),
    (["generate", "--device", "mps", "hi"], "invalid choice: 'mps'"),
    (["generate", "--dtype", "fp16", "hi"], "float16 is not supported"),
    (["generate", "--kv-cache-gib", "0", "hi"], "--kv-cache-gib must be > 0"),
    (["generate", "--num-blocks", "0", "hi"], "--num-blocks must be >= 1"),
    (["generate", "--preemption-mode", "drop", "hi"], "invalid choice: 'drop'"),
    (["generate", "--model", "HuggingFaceTB/SmolLM2-135M", "hi"], "never downloads from a model hub"),
    (["generate", "--model", "./no/such/folder", "hi"], "does not exist; give a safetensors folder or a .gguf"),
    (["serve", "--socket", "/nonexistent/dir/x.sock"], "--socket /nonexistent/dir/x.sock: the folder "
                                                        "/nonexistent/dir does not exist"),
    (["client", "--wait", "0", "--socket", "/nonexistent/x.sock", "hi"], "no kvmux server at /nonexistent/x.sock"),
    (["generate", "--json-schema", "{not json", "hi"], "--json-schema is not valid JSON"),
    (["generate", "--grammar", "@/no/such/file", "hi"], "--grammar cannot read /no/such/file"),
    (["generate", "--regex", "a", "--choice", "b", "hi"], "not allowed with argument"),
])
def test_bad_usage_is_one_clear_line_before_the_load(argv, says, capsys, no_load, tiny, monkeypatch):
    monkeypatch.setenv("KVMUX_MODEL", tiny)
    assert says in refused(capsys, argv)


def test_settings_beyond_the_model_are_refused_before_the_load(capsys, no_load, tiny):
    line = refused(capsys, ["generate", "--model", tiny, "--max-model-len", "999", "hi"])
    assert line == "kvmux: error: --max-model-len is 999, beyond the model's context length of 256 tokens"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a CPU-only torch")
def test_cuda_on_a_cpu_only_torch_says_what_to_use(capsys, no_load, tiny):
    assert "use --device cpu" in refused(capsys, ["generate", "--model", tiny, "--device", "cuda", "hi"])


def test_a_model_without_a_chat_template_suggests_raw(capsys, tiny, tmp_path):
    plain = shutil.copytree(tiny, tmp_path / "plain")
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    assert "--raw" in refused(capsys, ["generate", "--model", str(plain), "--num-blocks", "32", "hi"])


def test_dtype_spellings(tiny, capsys):
    assert cli.build_parser().parse_args(["generate", "--dtype", "bf16", "x"]).dtype == "bfloat16"
    assert cli.build_parser().parse_args(["generate", "--dtype", "FP32", "x"]).dtype == "float32"


def test_help_shows_each_default_once_and_the_choices(capsys):
    for argv in (["generate", "--help"], ["serve", "--help"], ["chat", "--help"], ["stats", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        out = capsys.readouterr().out
        assert "[default: None]" not in out
        for entry in re.split(r"\n  (?=-)", out):  # one option's help: its default is said at most once
            assert entry.count("default:") <= 1, entry
    assert "Print the statistics of a running" in out  # stats --help has a description
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "--preemption-mode {swap,recompute,auto}" in out and "--dtype {auto,float32,bfloat16}" in out
    assert "--temperature TEMPERATURE" in out and "0 for greedy [default: 0.8]" in out
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.startswith("kvmux ")
    bench = subprocess.run([sys.executable, "-m", "kvmux", "bench", "--help"], capture_output=True, text=True)
    flat = " ".join(bench.stdout.split())  # argparse wraps lines anywhere
    assert bench.returncode == 0 and "[default: float32]" in flat and "[default: offline]" in flat
    examples = subprocess.run([sys.executable, "-m", "kvmux", "examples", "--help"], capture_output=True, text=True)
    assert examples.returncode == 0 and "--jobs" in examples.stdout and "--timeout" in examples.stdout


def test_llm_gives_each_prompt_its_own_result_and_chats(tiny):
    # float32: in bf16 the kernel follows the batch's row count, and one[0] and two[0] are batched differently.
    with LLM(tiny, num_blocks=64, block_size=8, dtype="float32") as llm:
        ok, empty = llm.generate([PROMPT, ""], greedy(4))
        assert ok.finish_reason == "length" and len(ok.token_ids) == 4
        assert empty.finish_reason == "error" and "invalid_prompt" in empty.error
        one = llm.chat([{"role": "user", "content": "hello world"}], greedy(3))
        two = llm.chat([[{"role": "user", "content": "hello world"}], [{"role": "user", "content": "bye"}]],
                       greedy(3))
        assert len(one) == 1 and len(two) == 2 and two[0].token_ids == one[0].token_ids
        assert one[0].num_prompt_tokens > 3  # the chat template was applied
        assert llm.stats()["blocks_free"] == 64


def test_an_llm_left_open_closes_quietly_at_exit(tiny):
    script = (f"from kvmux import LLM, SamplingParams\n"
              f"llm = LLM({tiny!r}, num_blocks=32)\n"
              f"print(llm.generate('hello', SamplingParams(max_tokens=2, ignore_eos=True))[0].finish_reason)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "length", done.stderr
    assert "Task was destroyed" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_one_set_of_sampling_defaults():
    d = SamplingParams()
    args = cli.build_parser().parse_args(["generate", "x"])
    assert (args.temperature, args.top_k, args.top_p, args.max_tokens) == (d.temperature, d.top_k, d.top_p,
                                                                           d.max_tokens)


def test_generate_with_a_constraint(capsys, tiny, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                  "maximum": 99}}, "required": ["n"], "additionalProperties": False}))
    assert cli.main(["generate", "--model", tiny, "--raw", "--temperature", "1", "--json-schema", f"@{schema}",
                     "--max-tokens", "40", "hi"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["n"] <= 99
    assert cli.main(["generate", "--model", tiny, "--raw", "--choice", "left", "--choice", "right", "hi"]) == 0
    assert capsys.readouterr().out.strip() in ("left", "right")
