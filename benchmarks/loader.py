"""Training data pipeline throughput: ours vs open_clip_train's get_wds_dataset, same shards.

Both decode, RandomResizedCrop(224, scale 0.9-1) + normalise and tokenize with CLIP BPE, with
2 DataLoader workers, batch 64. The shards hold 2048 JPEGs of 640 x 480 px made from the
embedded photos (random crops, resized), i.e. larger than the crop, as web images are.
Runs alternate (peer, ours, ...) and the best of ``--repeats`` counts.

    pip install --no-deps --target /tmp/wds086 webdataset==0.2.86   # the version open_clip pins
    python -m benchmarks.loader --peer-pythonpath /tmp/wds086 [--samples 2048] [--repeats 2] [--no-draft]

Each run is a child process (open_clip's with ``--peer-pythonpath`` first on PYTHONPATH, since
its ``group_by_keys_nothrow`` predates the end-of-shard markers of webdataset 0.2.100+).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import webdataset as wds
from PIL import Image

BATCH, WORKERS, SHARDS = 64, 2, 16


def make_shards(out: Path, samples: int, size: int = 640) -> Path:
    from pipeline.embedded import load_pool

    pool = load_pool(with_content=True).to_pandas()
    photos = [Image.open(io.BytesIO(c)).convert("RGB") for c in pool[(pool.source == "photo") & (pool.fault == "")
                                                                      & pool.content.notna()].content]
    rng = random.Random(0)
    sizes, per_shard = {}, samples // SHARDS
    (out / "shards").mkdir(parents=True, exist_ok=True)
    for shard in range(SHARDS):
        name = f"shards/{shard:06d}.tar"
        with wds.TarWriter(str(out / name)) as sink:
            for i in range(per_shard):
                photo = rng.choice(photos)
                w, h = photo.size
                box = (rng.randrange(w // 4), rng.randrange(h // 4), w - rng.randrange(w // 4), h - rng.randrange(h // 4))
                image = photo.crop(box).resize((size, size * 3 // 4), Image.BICUBIC)
                jpeg = io.BytesIO()
                image.save(jpeg, format="JPEG", quality=90)
                sink.write({"__key__": f"s{shard:03d}_{i:05d}", "jpg": jpeg.getvalue(), "txt": f"a photo number {i}"})
        sizes[name] = per_shard
    (out / "sizes.json").write_text(json.dumps(sizes))
    return out


def ours(root: Path, samples: int, draft: bool):
    from train.config import DataConfig
    from train.contract import DataContract
    from train.data import TrainLoader

    cfg = DataConfig(path=str(root), batch_size=BATCH, workers=WORKERS, shuffle_buffer=1000, draft=draft)
    loader = TrainLoader(cfg, DataContract(image_size=224), rank=0, world=1, seed=0)
    return iter(loader), loader.batches_per_epoch


def open_clip_pipeline(root: Path, samples: int):
    import open_clip
    from open_clip_train.data import get_wds_dataset

    args = SimpleNamespace(train_data=f"{root}/shards/{{000000..{SHARDS - 1:06d}}}.tar", val_data=None,
                           dataset_resampled=False, train_num_samples=samples, train_data_upsampling_factors=None,
                           seed=0, batch_size=BATCH, world_size=1, workers=WORKERS)
    preprocess = open_clip.image_transform(224, is_train=True)
    data = get_wds_dataset(args, preprocess, is_train=True, tokenizer=open_clip.get_tokenizer("ViT-B-32"))
    return iter(data.dataloader), data.dataloader.num_batches


def throughput(make) -> float:
    """Samples/s from the first batch (workers started) to the end of one epoch."""
    batches, count = make()
    next(batches)
    start = time.perf_counter()
    for _ in range(count - 1):
        next(batches)
    return (count - 1) * BATCH / (time.perf_counter() - start)


def run_child(pipeline: str, root: Path, args, pythonpath: str = "") -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (pythonpath, os.getcwd()) if p)}
    cmd = [sys.executable, "-m", "benchmarks.loader", "--child", pipeline, "--root", str(root),
           "--samples", str(args.samples)] + (["--no-draft"] if args.no_draft else [])
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-draft", action="store_true", help="decode JPEGs at full size (no PIL draft mode)")
    parser.add_argument("--peer-pythonpath", default="", help="a directory holding webdataset 0.2.86 for open_clip")
    parser.add_argument("--child", choices=["ours", "open_clip"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:  # one measurement, printed as a number
        make = {"ours": lambda: ours(Path(args.root), args.samples, draft=not args.no_draft),
                "open_clip": lambda: open_clip_pipeline(Path(args.root), args.samples)}[args.child]
        print(throughput(make))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = make_shards(Path(tmp), args.samples)
        runs = {"open_clip": [], "ours": []}
        for _ in range(args.repeats):
            runs["open_clip"].append(run_child("open_clip", root, args, args.peer_pythonpath))
            runs["ours"].append(run_child("ours", root, args))
    best = {name: max(values) for name, values in runs.items()}
    print(json.dumps({"benchmark": "loader", "workers": WORKERS, "batch": BATCH, "samples": args.samples,
                      "draft": not args.no_draft, "samples_per_s": best, "runs": runs,
                      "ratio_ours_vs_open_clip": best["ours"] / best["open_clip"]}, indent=2))


if __name__ == "__main__":
    main()
