"""Reading statistics: a running server's health, model and KV-pool statistics, with the blocking client."""
import argparse

from kvmux import Client
from kvmux.serve.unix_socket import default_socket_path

NEEDS_SERVER = True  # the examples runner starts `kvmux serve` for this one


def main(socket_path: str) -> None:
    with Client(socket_path) as client:
        print("health:", client.health()["status"])
        model = client.model()
        print(f"model: {model['model']}, context {model['max_model_len']} tokens, "
              f"{model['num_blocks']} blocks of {model['block_size']} tokens")
        client.complete("Count to five.", {"max_tokens": 16})  # one request, so the counters move
        s = client.stats()
        print(f"blocks used/free/total: {s['blocks_used']}/{s['blocks_free']}/{s['blocks_total']}, "
              f"KV waste {s['kv_waste']:.1%}")
        print(f"requests admitted {s['requests_admitted']}, rejected {s['requests_rejected']}, "
              f"in flight {s['requests_in_flight']}; preemptions {s['preemptions']}")
        print(f"{s['tokens_per_s']:.1f} tokens/s; forward {s['forward_seconds']:.2f} s of {s['step_seconds']:.2f} s "
              f"in steps")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--socket", default=default_socket_path(), help="the server's socket [default: %(default)s]")
    main(parser.parse_args().socket)
