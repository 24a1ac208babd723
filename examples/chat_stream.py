"""Streaming chat over the socket: a two-turn conversation with a running `kvmux serve`."""
import argparse
import asyncio

from kvmux import AsyncClient
from kvmux.serve.unix_socket import default_socket_path

NEEDS_SERVER = True  # the examples runner starts `kvmux serve` for this one


async def main(socket_path: str) -> None:
    history = [{"role": "system", "content": "You are a concise assistant."}]
    async with AsyncClient(socket_path) as client:
        for question in ("Name one planet.", "How far is it from the Sun?"):
            print(f"> {question}")
            history.append({"role": "user", "content": question})
            answer = ""
            async for out in client.generate(history, {"max_tokens": 24, "temperature": 0}):
                print(out.text, end="", flush=True)
                answer += out.text
            print()
            # The whole conversation goes back with the next turn: the server keeps no session state.
            history.append({"role": "assistant", "content": answer})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--socket", default=default_socket_path(), help="the server's socket [default: %(default)s]")
    asyncio.run(main(parser.parse_args().socket))
