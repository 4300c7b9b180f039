"""What the training sampler's per-epoch order costs one rank (``train.sampler_order``): the time and the resident
memory to reach the first item of an epoch (``randperm`` draws the whole permutation there), then the items per
second a rank's sampler yields, and the raw positions per second of the bijection on one core.

    python launch/bench_sampler.py --size 142000000 --order randperm
    python launch/bench_sampler.py --size 142000000 --order bijection

Run each in a fresh process (the peak resident set only grows). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import time

import numpy as np

from dinoreg.data.loader import SAMPLER_BLOCK, SAMPLER_ORDERS, FeistelPermutation, InfiniteShardedSampler


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, required=True, help="images in the dataset (n)")
    parser.add_argument("--order", choices=SAMPLER_ORDERS, required=True, help="the train.sampler_order to measure")
    parser.add_argument("--items", type=int, default=1_000_000,
                        help="items to draw through the sampler after the first (default: %(default)s)")
    parser.add_argument("--positions", type=int, default=10_000_000,
                        help="bijection only: positions to compute by blocks of the sampler's size, outside the "
                             "sampler, for the raw throughput (default: %(default)s)")
    args = parser.parse_args()
    if args.size <= 0 or args.items <= 0 or args.positions <= 0:
        parser.error("--size, --items and --positions must be > 0")
    before = _peak_rss_mib()
    start = time.perf_counter()
    stream = iter(InfiniteShardedSampler(args.size, seed=0, order=args.order))
    next(stream)
    first_seconds = time.perf_counter() - start
    first_rss = _peak_rss_mib()
    start = time.perf_counter()
    for _ in itertools.islice(stream, args.items):
        pass
    sampler_rate = args.items / (time.perf_counter() - start)
    result = {"size": args.size, "order": args.order, "first_item_s": round(first_seconds, 3),
              "peak_rss_growth_mib": round(first_rss - before, 1), "peak_rss_mib": round(_peak_rss_mib(), 1),
              "sampler_items_per_s": round(sampler_rate)}
    if args.order == "bijection":
        perm = FeistelPermutation(args.size, 0, 0)
        blocks = -(-args.positions // SAMPLER_BLOCK)
        start = time.perf_counter()
        for block in range(blocks):
            offsets = (block * SAMPLER_BLOCK + np.arange(SAMPLER_BLOCK, dtype=np.int64)) % args.size
            perm[offsets]
        result["bijection_positions_per_s"] = round(blocks * SAMPLER_BLOCK / (time.perf_counter() - start))
        result["domain_over_size"] = round(4 ** perm.half_bits / args.size, 3)  # network evaluations per position
    print(json.dumps(result))


if __name__ == "__main__":
    main()
