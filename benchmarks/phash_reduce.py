"""Phash reduce: peak numpy memory and CPU of one reduce task's pair test as the pool grows.

A reduce partition holds about ``dedupe.partition_rows`` records whatever the pool's size, but the
records sharing a key value grow with it: ~2n / 2^21 for a 21-bit key (about 1 at 1M rows, 16 at
16M). This synthesises one partition of ``--records`` records at ``--densities`` records per key
value (random hashes that share only their key's bits) and runs ``filter.phash.close_pairs`` on
it, with tracemalloc counting numpy's allocations. Prints one JSON object per density.

    python -m benchmarks.phash_reduce [--records 1000000] [--densities 1,4,16]
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc

import numpy as np

from filter.phash import PhashConfig, close_pairs, key_masks


def partition(records: int, density: int, cfg: PhashConfig, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    masks = key_masks(cfg)
    group = rng.integers(0, records // density, records)
    key = (group % len(masks)).astype(np.uint8)
    value = rng.integers(0, 2**63, records // density, dtype=np.uint64)[group]
    mask = masks[key]
    h0 = (rng.integers(0, 2**63, records, dtype=np.uint64) & ~mask) | (value & mask)
    h1 = rng.integers(0, 2**63, records, dtype=np.uint64)
    return np.arange(records), np.zeros(records, np.int8), key, h0, h1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--densities", default="1,4,16")
    args = parser.parse_args()
    cfg = PhashConfig()
    for density in map(int, args.densities.split(",")):
        records = partition(args.records, density, cfg)
        tracemalloc.start()
        cpu = time.process_time()
        pairs = close_pairs(*records, cfg)
        cpu = time.process_time() - cpu
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(json.dumps({"records": args.records, "per_key_value": density, "peak_numpy_mib": round(peak / 2**20, 1),
                          "cpu_s": round(cpu, 2), "pairs": len(pairs)}))


if __name__ == "__main__":
    main()
