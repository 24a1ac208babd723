"""Every command and snippet in README.md runs verbatim (on the tiny model with room for tools, through
$KVMUX_MODEL).

`make` lines are what the suite itself runs under, so blocks holding them are skipped; a Python snippet
that talks to a server gets one, started the way the README says (`kvmux serve`, or `kvmux serve --port
8000` for the OpenAI SDK's), before it runs.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"```(python|sh)\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
SNIPPETS = [(lang, code) for lang, code in BLOCKS if not re.search(r"^make ", code, flags=re.M)]


def test_the_readme_has_snippets_to_run():
    assert sum(lang == "python" for lang, _ in SNIPPETS) >= 4 and sum(lang == "sh" for lang, _ in SNIPPETS) >= 2


@pytest.fixture
def env(tiny_long, tmp_path) -> dict:
    """The README's environment: the venv's commands on PATH, the tiny model as the default, a private socket."""
    runtime = tmp_path / "run"
    runtime.mkdir()
    bin_dir = str(Path(sys.executable).parent)
    assert shutil.which("kvmux", path=bin_dir), f"no kvmux command in {bin_dir}"
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "KVMUX_MODEL": tiny_long,
            "XDG_RUNTIME_DIR": str(runtime), "PYTHONPATH": str(ROOT)}


def run(args, env, cwd) -> tuple[str, str]:
    """Run to completion in a process group of its own, which is killed whole afterwards: a server a failed
    block left running in the background must not outlive the test."""
    proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, f"{args}\n{out}\n{err}"
    return out, err


@pytest.mark.parametrize("index", range(len(SNIPPETS)), ids=lambda i: f"{SNIPPETS[i][0]}-{i}")
def test_snippet_runs_verbatim(index, env, tmp_path):
    lang, code = SNIPPETS[index]
    if lang == "sh":
        _, err = run(["bash", "-e", "-c", code], env, tmp_path)
        assert "Traceback" not in err, err
        return
    server = None
    if "Client(" in code or "OpenAI(" in code:  # the README says: with a server running (the one its comment names)
        command = ["kvmux", "serve", "--port", "8000"] if "OpenAI(" in code else ["kvmux", "serve"]
        server = subprocess.Popen(command, env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        if server is not None:
            assert any("kvmux: serving" in line for line in server.stderr), "the server did not start"
        out, err = run([sys.executable, "-c", code], env, tmp_path)
        assert out.strip() and "Traceback" not in err, err
        assert "Task was destroyed" not in err
    finally:
        if server is not None:
            server.terminate()
            assert server.wait(timeout=60) == 0
