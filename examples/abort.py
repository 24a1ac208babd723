"""Aborting a request: stop a long answer over the socket after a few tokens; its KV blocks are freed."""
import argparse
import asyncio

from kvmux import AsyncClient
from kvmux.serve.unix_socket import default_socket_path

NEEDS_SERVER = True  # the examples runner starts `kvmux serve` for this one


async def main(socket_path: str) -> None:
    async with AsyncClient(socket_path) as client:
        params = {"max_tokens": 200, "temperature": 0.7, "ignore_eos": True}
        received = 0
        async for out in client.generate("Tell me a very long story.", params, request_id="story"):
            received += len(out.token_ids)
            print(out.text, end="", flush=True)
            if received >= 5 and not out.finished:
                # The stream goes on until the server's final frame. (Leaving the loop with break aborts too.)
                await client.abort("story")
        print(f"\n[{out.num_output_tokens} of up to 200 tokens, finish: {out.finish_reason}]")
        # The answer goes on while the abort travels: on a fast model or a busy machine it can end first.
        assert out.finish_reason in ("abort", "length"), out.finish_reason
        stats = await client.stats()
        print(f"requests in flight: {stats['requests_in_flight']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--socket", default=default_socket_path(), help="the server's socket [default: %(default)s]")
    asyncio.run(main(parser.parse_args().socket))
