"""`kvmux chat` driven through a pseudo-terminal, as a person types at it."""
from __future__ import annotations

import os
import sys

import pexpect
import pytest

from kvmux.engine import messages

from engine_helpers import ForwardGate, until
from server_helpers import Served

PROMPT = "you> "


def spawn(args: list[str]) -> pexpect.spawn:
    child = pexpect.spawn(sys.executable, ["-m", "kvmux", "chat", *args], encoding="utf-8", timeout=60,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, dimensions=(40, 200))
    child.expect("kvmux chat with ")
    child.expect_exact(PROMPT)
    return child


def test_a_conversation_with_commands_on_a_local_engine(tiny):
    child = spawn(["--model", tiny, "--num-blocks", "64", "--temperature", "0", "--max-tokens", "6",
                   "--ignore-eos"])
    child.sendline("hello world")
    child.expect_exact(PROMPT)  # the reply streamed, then the prompt came back
    child.sendline("/params")
    child.expect(r"max_tokens=6 temperature=0.0 ")
    child.sendline("/params temperature=0.5 top_k=3")
    child.expect(r"temperature=0.5 top_k=3 ")
    child.sendline("/params temperature=-1")
    child.expect_exact("[temperature must be a finite number >= 0]")
    child.sendline("/stats")
    child.expect(r"blocks_total=64 ")
    child.expect_exact(PROMPT)
    child.sendline("/system answer briefly")
    child.expect_exact("[system message set; conversation cleared]")
    child.sendline("/clear")
    child.expect_exact("[conversation cleared]")
    child.sendline("/fly")
    child.expect_exact("[unknown command /fly; /help lists them]")
    child.expect_exact(PROMPT)  # consumed here, so the next one matched is the prompt after the reply
    child.sendline("again")
    child.expect_exact(PROMPT)
    child.sendcontrol("c")  # at the prompt: a fresh prompt, the chat goes on
    child.expect_exact(PROMPT)
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.fixture
def served(tiny):
    s = Served(tiny, {"max_pending": 8})
    yield s
    s.close()


def test_ctrl_c_stops_a_reply_frees_its_blocks_and_the_chat_goes_on(served):
    with ForwardGate(served.engine) as gate:
        child = spawn(["--socket", served.path, "--temperature", "0", "--max-tokens", "200", "--ignore-eos"])
        history = "hello world"
        child.sendline(history)
        gate.allow(3)  # three tokens, then the engine holds the reply mid-stream
        gate.wait_held()
        assert served.stats()["running"] == 1
        child.sendcontrol("c")
        # The chat aborts the request; decode, holding the forward, keeps the abort for the step's end.
        served.call(until(lambda: any(isinstance(m, messages.Abort) for m in served.engine.decode.deferred)))
        gate.release()
        child.expect_exact("[stopped]")
        child.expect_exact(PROMPT)
        served.settle()  # the reply's request was aborted: nothing is live, every block is back
        assert served.stats()["output_tokens"] < 200
        child.sendline("/stats")  # the chat is still there, and so is its connection
        child.expect(r"requests_in_flight=0 ")
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0


def test_a_conversation_with_an_http_server_and_ctrl_c(tiny):
    from server_helpers import ServedHttp

    served = ServedHttp(tiny)
    try:
        with ForwardGate(served.engine) as gate:
            child = spawn(["--url", served.url, "--temperature", "0", "--max-tokens", "200", "--ignore-eos"])
            child.sendline("hello world")
            gate.allow(3)
            gate.wait_held()
            child.sendcontrol("c")  # the chat drops the connection, which the server takes for an abort
            child.expect_exact("[stopped]")
            child.expect_exact(PROMPT)
            gate.release()
            served.settle()
            child.sendline("/stats")
            child.expect(r"sequences_running=0 ")
            child.sendcontrol("d")
            child.expect(pexpect.EOF)
            child.close()
            assert child.exitstatus == 0
    finally:
        served.close()
