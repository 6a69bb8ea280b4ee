"""Run by torchrun on every rank of a Slurm job: one gloo all-reduce, then the env as JSON."""

import json
import os

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
total = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(total)
keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME", "SLURM_NODEID")
print("PROBE " + json.dumps({"sum": total.item(), **{k: os.environ.get(k) for k in keys}}), flush=True)
dist.destroy_process_group()
