"""CLIP loss on 2 ranks: ours (dense, chunked) vs open_clip's ClipLoss(local_loss, gather_with_grad).

For each local batch size, every implementation runs forward + backward on the same
(b, 512) features on 2 gloo ranks (spawned here); we report the time and the peak RSS
added above the process's idle baseline (sampled every millisecond), the max over ranks.
Implementations alternate within one process pair, so machine load hits all alike.

    python -m benchmarks.clip_loss                         # 1024 4096 8192 32768 (open_clip up to 8192)
    python -m benchmarks.clip_loss --sizes 1024 4096       # quick
    python -m benchmarks.clip_loss --sizes 32768 --impls ours_chunked --repeats 1   # dense forms need > 16 GiB
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.measure import PeakRSS
from train.parallel import free_port

DIM = 512


def implementations(rank: int, world: int, chunk: int) -> dict:
    from open_clip.loss import ClipLoss

    from train.objectives.clip import clip_loss

    peer = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    return {
        "open_clip": lambda i, t, s: peer(i, t, s.exp()),
        "ours_dense": lambda i, t, s: clip_loss(i, t, s, chunk=0),
        "ours_chunked": lambda i, t, s: clip_loss(i, t, s, chunk=chunk),
    }


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS, so the next measurement starts from idle RSS."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(loss_fn, batch: int, rank: int) -> dict:
    g = torch.Generator().manual_seed(rank)
    image = torch.nn.functional.normalize(torch.randn(batch, DIM, generator=g), dim=1).requires_grad_(True)
    text = torch.nn.functional.normalize(torch.randn(batch, DIM, generator=g), dim=1).requires_grad_(True)
    log_scale = torch.tensor([2.659], requires_grad=True)
    release_freed_memory()
    dist.barrier()
    with PeakRSS() as mem:
        start = time.perf_counter()
        loss = loss_fn(image, text, log_scale)
        loss.backward()
        seconds = time.perf_counter() - start
    del loss, image, text, log_scale
    release_freed_memory()
    return {"seconds": seconds, "added_gib": mem.added_gib}


def worker(rank: int, world: int, port: int, args, out: dict) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    impls = {name: fn for name, fn in implementations(rank, world, args.chunk).items() if name in args.impls}
    results = []
    for batch in args.sizes:
        runs = {}
        for _ in range(args.repeats):  # interleaved, so load changes hit every implementation alike
            for name, fn in impls.items():
                if name == "open_clip" and batch > args.peer_max:
                    continue
                gathered = [None] * world
                dist.all_gather_object(gathered, measure(fn, batch, rank))
                runs.setdefault(name, []).append(gathered)
        for name, reps in runs.items():  # slowest rank per repeat; best time, worst memory over repeats
            results.append({"impl": name, "local_batch": batch,
                            "seconds": min(max(s["seconds"] for s in rep) for rep in reps),
                            "added_gib": max(max(s["added_gib"] for s in rep) for rep in reps)})
    if rank == 0:
        out["results"] = results
    dist.destroy_process_group()


def ratios(results: list[dict]) -> list[dict]:
    by = {(r["impl"], r["local_batch"]): r for r in results}
    rows = []
    for (impl, batch), r in by.items():
        peer = by.get(("open_clip", batch))
        if impl != "open_clip" and peer:
            rows.append({"impl": impl, "local_batch": batch, "time_ratio": r["seconds"] / peer["seconds"],
                         "memory_ratio": r["added_gib"] / max(peer["added_gib"], 1e-9)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192, 32768])
    parser.add_argument("--peer-max", type=int, default=8192, help="largest local batch run with open_clip "
                        "(its logits need > 8 GiB per rank at 32768)")
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--impls", nargs="+", default=["open_clip", "ours_dense", "ours_chunked"])
    args = parser.parse_args()
    port = free_port()
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(worker, args=(args.world, port, args, out), nprocs=args.world)
    results = out["results"]
    print(json.dumps({"benchmark": "clip_loss", "world": args.world, "dim": DIM, "chunk": args.chunk,
                      "results": results, "ratios_vs_open_clip": ratios(results)}, indent=2))


if __name__ == "__main__":
    main()
