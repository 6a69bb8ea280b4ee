"""CLIP-score inference: this stage's clip_score step vs clip-retrieval's approach, same model, same shards.

Shards in the download layout (``download/{part}.tar``: jpg, txt, json with row and uid) hold
``--samples`` embedded-pool images. Both sides use the same random-init open_clip model (``--model``,
a train.encoder spec; no weights offline), batch 256, ``--workers`` DataLoader workers, and save
L2-normalised float16 image and text embeddings:

- ours: filter.clip_score.ClipScore.run_shards (what ``build_shards`` runs per array task);
- clip-retrieval's inference (re-implemented from its reader/mapper, the package is not installed):
  ``wds.WebDataset(shards).decode("pilrgb").to_tuple("jpg", "txt")`` mapped through the model's
  preprocess and tokenizer, ``DataLoader(batch_size=256, num_workers=W)``, encode, normalise,
  float16, ``np.save`` per batch.

    python -m benchmarks.scoring [--samples 2048] [--shards 8] [--workers 2] [--repeats 2] [--model open_clip:ViT-B-32]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import pyarrow.compute as pc
import torch
import webdataset as wds

from filter import StepContext
from filter.clip_score import ClipScore, ClipScoreConfig
from pipeline.build_shards import PartSamples
from pipeline.embedded import load_pool
from train.encoder import load_encoder
from pipeline.core.log import setup_logging
from pipeline.core.shards import Layout

BATCH = 256


def make_shards(layout: Layout, samples: int, shards: int) -> list[int]:
    pool = load_pool(with_content=True)
    pool = pool.filter(pc.and_(pc.equal(pool["fault"], ""), pc.equal(pool["http"], "ok")))
    rows = pool.select(["content", "caption", "path"]).to_pylist()
    os.makedirs(f"{layout.root}/download")
    for part in range(shards):
        with wds.TarWriter(layout.download(part, ".tar")) as sink:
            for row in range(part * samples // shards, (part + 1) * samples // shards):
                item = rows[row % len(rows)]
                meta = {"row": row, "uid": f"{row:032x}"}
                sink.write({"__key__": f"{row:09d}", "jpg": item["content"], "txt": item["caption"], "json": json.dumps(meta)})
    return list(range(shards))


def run_ours(layout: Layout, parts: list[int], args) -> int:
    cfg = ClipScoreConfig(model=args.model, batch_size=BATCH, workers=args.workers)
    step = ClipScore(cfg, StepContext(layout, "clip_score"))
    everything = PartSamples(layout, {p: set(range(args.samples)) for p in parts})
    return sum(table.num_rows for _, table in step.run_shards(parts, everything))


def run_clip_retrieval(layout: Layout, parts: list[int], args) -> int:
    encoder = load_encoder(args.model)
    dataset = (wds.WebDataset([layout.download(p, ".tar") for p in parts], handler=wds.warn_and_continue, shardshuffle=False)
               .decode("pilrgb", handler=wds.warn_and_continue).to_tuple("jpg", "txt")
               .map_tuple(encoder.preprocess, lambda text: encoder.tokenize([text])["input_ids"][0]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, num_workers=args.workers)
    out, count = f"{layout.root}/clip_retrieval", 0
    os.makedirs(out)
    for k, (images, tokens) in enumerate(loader):
        with torch.no_grad():
            image = torch.nn.functional.normalize(encoder.model.encode_image(images).float(), dim=-1)
            text = torch.nn.functional.normalize(encoder.model.encode_text(tokens).float(), dim=-1)
        np.save(f"{out}/img_emb_{k}.npy", image.numpy().astype(np.float16))
        np.save(f"{out}/text_emb_{k}.npy", text.numpy().astype(np.float16))
        count += len(images)
    return count


def timed(fn, layout: Layout, parts: list[int], args) -> dict:
    start = time.perf_counter()
    count = fn(layout, parts, args)
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 2), "samples": count, "samples_per_s": round(count / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the inference process")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs; the best of each counts")
    parser.add_argument("--model", default="open_clip:configs/data/open_clip/tiny-vit.json")
    args = parser.parse_args()
    setup_logging("WARNING")
    torch.set_num_threads(args.threads)
    load_encoder(args.model)  # imports and first model build outside the timings
    runs = {"clip_retrieval": [], "ours": []}
    with tempfile.TemporaryDirectory() as tmp:
        parts = make_shards(Layout(tmp), args.samples, args.shards)
        for repeat in range(args.repeats):
            for name, fn in (("clip_retrieval", run_clip_retrieval), ("ours", run_ours)):
                layout = Layout(f"{tmp}/{name}{repeat}")
                os.makedirs(layout.root)
                os.symlink(f"{tmp}/download", f"{layout.root}/download")  # the same shards, a fresh output folder
                runs[name].append(timed(fn, layout, parts, args))
    best = {name: max(r, key=lambda x: x["samples_per_s"]) for name, r in runs.items()}
    print(json.dumps({
        "model": args.model, "samples": args.samples, "shards": args.shards, "batch": BATCH, "workers": args.workers,
        "runs": runs, "best": best,
        "ours_vs_clip_retrieval": round(best["ours"]["samples_per_s"] / best["clip_retrieval"]["samples_per_s"], 3),
        "loadavg": os.getloadavg(), "cpus": os.cpu_count(),
    }, indent=2))


if __name__ == "__main__":
    main()
