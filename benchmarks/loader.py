"""Training data pipeline throughput: ours vs open_clip_train's get_wds_dataset, same shards.

Both decode, RandomResizedCrop(224, scale 0.9-1) + normalise and tokenize with CLIP BPE, with
2 DataLoader workers, batch 64. The shards hold 2048 JPEGs of about 512 px made from the
embedded photos (random crops, resized), i.e. larger than the crop, as web images are.
Runs alternate (peer, ours, ...) and the best of ``--repeats`` counts.

    python -m benchmarks.loader [--samples 2048] [--repeats 2] [--no-draft]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import webdataset as wds
from PIL import Image

BATCH, WORKERS, SHARDS = 64, 2, 16


def make_shards(out: Path, samples: int, size: int = 512) -> Path:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-draft", action="store_true", help="decode JPEGs at full size (no PIL draft mode)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = make_shards(Path(tmp), args.samples)
        runs = {"open_clip": [], "ours": []}
        for _ in range(args.repeats):
            runs["open_clip"].append(throughput(lambda: open_clip_pipeline(root, args.samples)))
            runs["ours"].append(throughput(lambda: ours(root, args.samples, draft=not args.no_draft)))
    best = {name: max(values) for name, values in runs.items()}
    print(json.dumps({"benchmark": "loader", "workers": WORKERS, "batch": BATCH, "samples": args.samples,
                      "draft": not args.no_draft, "samples_per_s": best, "runs": runs,
                      "ratio_ours_vs_open_clip": best["ours"] / best["open_clip"]}, indent=2))


if __name__ == "__main__":
    main()
