"""The examples runner: `python -m examples [NAME ...] [--list] [--model PATH]`.

Runs each example as its own process and reports it as passed (exit status 0)
or failed. Examples that talk to a server share one `kvmux serve` that the
runner starts on a private socket and a free loopback port, and stops with
SIGTERM at the end; a server that does not exit cleanly fails the run. An
example with NEEDS_SERVER = True in its source gets `--socket PATH`, one with
NEEDS_SERVER = "http" gets `--base-url http://127.0.0.1:PORT/v1`.
"""
from __future__ import annotations

import argparse
import ast
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SERVER_START_TIMEOUT = 300  # seconds; the first load of the default model converts its GGUF


@dataclass
class Example:
    name: str
    path: Path
    summary: str
    needs_server: bool | str  # False, True (the socket) or "http"


def discover() -> list[Example]:
    found = []
    for path in sorted(HERE.glob("*.py")):
        if path.name.startswith("_"):
            continue
        tree = ast.parse(path.read_text())
        # Read the marker without importing: importing an example would load torch in the runner.
        needs_server = next((node.value.value for node in tree.body
                             if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                             and any(getattr(t, "id", None) == "NEEDS_SERVER" for t in node.targets)), False)
        summary = (ast.get_docstring(tree) or "").split("\n")[0]
        found.append(Example(path.stem, path, summary, needs_server))
    return found


class ServerProcess:
    """A `kvmux serve` child on a socket in a private temporary folder and on a free loopback port."""

    def __init__(self, model: str | None) -> None:
        self.folder = tempfile.TemporaryDirectory(prefix="kvmux-examples-")
        self.socket_path = os.path.join(self.folder.name, "kvmux.sock")
        self.log = open(os.path.join(self.folder.name, "server.log"), "w+")
        # float32: the examples run side by side on this one server and check that greedy and seeded outputs
        # repeat; in bf16 a matmul's kernel follows the step's row count, so their last bits would not.
        command = [sys.executable, "-m", "kvmux", "serve", "--socket", self.socket_path, "--port", "0",
                   "--dtype", "float32"]
        self.process = subprocess.Popen(command + (["--model", model] if model else []),
                                        stdout=self.log, stderr=subprocess.STDOUT)
        self.started = time.monotonic()
        self.base_url: str | None = None

    def wait_ready(self) -> None:
        """Block until the server accepts connections on both; raise if it died or never did."""
        while not self._accepts() or self.base_url is None:
            # The server says where it serves HTTP (the port it was given is 0: any free one).
            found = re.search(r"on (http://\S+)", self.output())
            self.base_url = found.group(1) if found else None
            if self.process.poll() is not None or time.monotonic() > self.started + SERVER_START_TIMEOUT:
                raise RuntimeError(f"the server did not start:\n{self.output()}")
            time.sleep(0.1)

    def _accepts(self) -> bool:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(self.socket_path)
                return True
            except OSError:
                return False

    def output(self) -> str:
        return Path(self.log.name).read_text()  # its own handle: examples wait on the server from several threads

    def stop(self) -> str | None:
        """SIGTERM, then wait; returns a problem if the server did not shut down cleanly."""
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return "the server did not exit within 60 s of SIGTERM"
        problem = None
        if code != 0:
            problem = f"the server exited with status {code}:\n{self.output()}"
        elif os.path.exists(self.socket_path):
            problem = "the server left its socket file behind"
        self.log.close()
        self.folder.cleanup()
        return problem


def run_one(example: Example, model: str | None, server: ServerProcess | None, timeout: float) -> tuple[bool, str]:
    if example.needs_server:
        try:
            server.wait_ready()
        except RuntimeError as exc:
            return False, str(exc)
        args = ["--base-url", server.base_url] if example.needs_server == "http" else ["--socket", server.socket_path]
    else:
        args = ["--model", model] if model else []
    try:
        done = subprocess.run([sys.executable, str(example.path), *args], capture_output=True, text=True,
                              timeout=timeout, cwd=HERE.parent)
    except subprocess.TimeoutExpired as exc:
        return False, f"timed out after {timeout:g} s\n{exc.stdout or ''}{exc.stderr or ''}"
    return done.returncode == 0, done.stdout + done.stderr


def main(argv: list[str] | None = None) -> int:
    examples = discover()
    parser = argparse.ArgumentParser(prog="python -m examples", description="List or run the kvmux examples.")
    parser.add_argument("names", nargs="*", help="examples to run [default: all]")
    parser.add_argument("--list", action="store_true", help="list the examples and exit")
    parser.add_argument("--model", default=None, help="model passed to every example and to the server")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per example [default: %(default)s]")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1,
                        help="examples run at once [default: the number of CPUs, %(default)s]")
    parser.add_argument("-v", "--verbose", action="store_true", help="show every example's output, not only failures")
    args = parser.parse_args(argv)

    if args.list:
        for ex in examples:
            print(f"{ex.name:<18} {'[server] ' if ex.needs_server else '         '}{ex.summary}")
        return 0
    by_name = {ex.name: ex for ex in examples}
    unknown = [n for n in args.names if n.removesuffix(".py") not in by_name]
    if unknown:
        parser.error(f"no example named {', '.join(unknown)}; choose from {', '.join(by_name)}")
    selected = [by_name[n.removesuffix(".py")] for n in args.names] or examples

    # One server for every example that needs it, started now so that it loads while the others run.
    server = ServerProcess(args.model) if any(ex.needs_server for ex in selected) else None
    failed = []
    try:
        # Examples are independent processes: run up to --jobs at once, report in list order.
        with ThreadPoolExecutor(args.jobs) as pool:
            started = time.monotonic()
            results = pool.map(lambda ex: run_one(ex, args.model, server, args.timeout), selected)
            for ex, (ok, output) in zip(selected, results):
                print(f"{'PASS' if ok else 'FAIL'}  {ex.name}  (done after {time.monotonic() - started:.1f} s)",
                      flush=True)
                if args.verbose or not ok:
                    print("    " + output.strip().replace("\n", "\n    "), flush=True)
                if not ok:
                    failed.append(ex.name)
    finally:
        problem = server.stop() if server else None
    if problem:
        print(f"FAIL  server shutdown: {problem}")
        failed.append("server shutdown")
    print(f"{len(selected) - len(failed) + bool(problem)} passed, {len(failed)} failed"
          + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
