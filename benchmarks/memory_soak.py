"""Server memory under sustained load: RSS of every process of the stack, round after round.

    python benchmarks/memory_soak.py [--rounds 8] [--seconds 15] [--clients 64] [--max-tokens 8]

Starts ``resultity demo --preset tiny`` (the same stack as benchmarks/serving.py, whose
``Stack`` and load client it uses), then runs ``--rounds`` rounds of ``--clients`` streaming
clients for ``--seconds`` each and prints, after every round, the requests so far and the RSS
of the Network+Cloud+Agent process and of each Runtime child. Memory is flat when the RSS
stops growing with the request count: the first round warms caches and pools up, later rounds
should add nothing that stays.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving  # benchmarks/ is not a package: found through the path above


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15.0, help="per round (15)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per Runtime")
    args = parser.parse_args()
    if args.rounds < 2 or args.seconds <= 0 or args.clients < 1 or args.max_tokens < 1:
        parser.error("need --rounds >= 2 and positive --seconds, --clients, --max-tokens")
    print(f"# load average {serving.load_average()}; {args.rounds} rounds of {args.clients} "
          f"clients x {args.seconds:g} s, {args.max_tokens} tokens per request")
    with tempfile.TemporaryDirectory() as tmp:
        stack = serving.Stack(Path(tmp), args.threads)
        try:
            start = stack.rss()
            print("| round | requests so far | errors | "
                  + " | ".join(f"{label} RSS (MiB)" for label in start) + " |")
            print("|---" * (3 + len(start)) + "|")
            print("| idle | 0 | 0 | " + " | ".join(f"{v:.1f}" for v in start.values()) + " |")
            total, after = 0, start
            first: dict[str, float] = {}
            for r in range(args.rounds):
                res = anyio.run(serving.measure_load, stack, args.clients, args.seconds,
                                args.max_tokens)
                total += res["requests"]
                after = res["rss_after"]
                first = first or after
                print(f"| {r + 1} | {total} | {len(res['errors'])} | "
                      + " | ".join(f"{after.get(k, float('nan')):.1f}" for k in start) + " |",
                      flush=True)
            for label in start:
                grew = after.get(label, float("nan")) - first.get(label, float("nan"))
                print(f"# {label}: {grew:+.1f} MiB from the end of round 1 to the end of round "
                      f"{args.rounds}")
            print(f"# load average {serving.load_average()}")
        finally:
            stack.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
