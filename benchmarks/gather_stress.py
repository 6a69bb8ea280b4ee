"""Autograd all-gather on 2 gloo ranks, many steps: ours (blocking c10d) vs torch's functional
collective (``all_gather_single_autograd``, which train/gather.py used before).

Each step gathers two (b, d) feature tensors, as the CLIP loss does, builds logits against the
gathered ones, and runs backward, while the allocator is churned. A rank that dies (SIGSEGV,
heap abort) is reported with its exit code; the other rank then fails on a reset connection.
We report steps per second, how each implementation ended and how many steps it completed.

    python -m benchmarks.gather_stress                          # both, 20,000 steps each (~10 min each)
    python -m benchmarks.gather_stress --impls ours --steps 2000
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from train.parallel import free_port


def torch_functional(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed._functional_collectives as funcol

    return funcol.all_gather_single_autograd(x.contiguous(), gather_dim=0, group=dist.group.WORLD)


def ours(x: torch.Tensor) -> torch.Tensor:
    from train.gather import all_gather_with_grad

    return all_gather_with_grad(x)


IMPLEMENTATIONS = {"ours": ours, "torch_functional": torch_functional}


def worker(rank: int, world: int, port: int, impl: str, steps: int, batch: int, dim: int, timings,
           progress) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    gather = IMPLEMENTATIONS[impl]
    g = torch.Generator().manual_seed(rank)
    start = time.perf_counter()
    for step in range(steps):
        image = torch.randn(batch, dim, generator=g, requires_grad=True)
        text = torch.randn(batch, dim, generator=g, requires_grad=True)
        logits = image @ gather(text).t() + text @ gather(image).t()
        churn = [torch.empty(int(torch.randint(1, 100_000, (), generator=g))) for _ in range(4)]
        logits.logsumexp(dim=1).sum().backward()
        if not torch.isfinite(image.grad).all():
            raise FloatingPointError("non-finite gradient")
        del churn
        progress[rank] = step + 1
    timings.put(time.perf_counter() - start)
    dist.destroy_process_group()


def run(impl: str, args) -> dict:
    port = free_port()
    spawn = mp.get_context("spawn")
    timings, progress = spawn.Queue(), spawn.Array("q", args.world, lock=False)
    ranks = [spawn.Process(target=worker, daemon=True,
                           args=(rank, args.world, port, impl, args.steps, args.batch, args.dim, timings,
                                 progress))
             for rank in range(args.world)]
    for p in ranks:
        p.start()
    while any(p.exitcode is None for p in ranks) and all(p.exitcode in (None, 0) for p in ranks):
        time.sleep(0.5)
    for p in ranks:  # a dead rank leaves its peer blocked on the connection: give it a moment, then stop it
        p.join(timeout=30)
        if p.exitcode is None:
            p.kill()
            p.join()
    exit_codes = [p.exitcode for p in ranks]
    completed = all(code == 0 for code in exit_codes)
    seconds = max(timings.get() for _ in ranks) if completed else None  # the loop only, slowest rank
    return {"impl": impl, "steps": args.steps, "completed": completed, "steps_completed": min(progress),
            "rank_exit_codes": exit_codes, "seconds": seconds,
            "steps_per_second": args.steps / seconds if completed else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impls", nargs="+", default=list(IMPLEMENTATIONS), choices=list(IMPLEMENTATIONS))
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    results = [run(impl, args) for impl in args.impls]
    by = {r["impl"]: r for r in results}
    ratio = None
    if all(by.get(k, {}).get("steps_per_second") for k in ("ours", "torch_functional")):
        ratio = by["ours"]["steps_per_second"] / by["torch_functional"]["steps_per_second"]
    print(json.dumps({"benchmark": "gather_stress", "world": args.world, "batch": args.batch, "dim": args.dim,
                      "results": results, "speed_ratio_vs_torch_functional": ratio}, indent=2))


if __name__ == "__main__":
    main()
