"""Regenerate the embedded dataset, deterministically, from real images.

    python -m pipeline.embedded.make --source ../shared/data [--out pipeline/embedded]

Inputs: Fashion-MNIST (IDX files) and seven natural photos. Outputs, beside this file:
``pool.parquet`` (one row per URL of the pool: served bytes, caption and ground truth),
``ground_truth.json`` (counts per planted fault) and ``fashion_mnist/`` (the test split, the
held-out zero-shot benchmark). Every random choice comes from one seeded generator.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from pipeline.embedded import CLASSNAMES, HERE

SEED = 20261123
N_FASHION = 10000  # Fashion-MNIST train images in the pool
N_TRUSTED = 1200  # clean rows marked as a trusted seed source (DFN-style scorer bootstrap)
MISMATCH_RATE = 0.10
SYNONYMS = [
    ["t-shirt", "top", "tee shirt"],
    ["trouser", "pair of trousers", "pants"],
    ["pullover", "sweater", "jumper"],
    ["dress", "summer dress"],
    ["coat", "winter coat"],
    ["sandal", "summer sandal"],
    ["shirt", "button-up shirt"],
    ["sneaker", "running shoe", "trainer shoe"],
    ["bag", "handbag", "tote bag"],
    ["ankle boot", "boot", "leather boot"],
]
TEMPLATES = [
    "a photo of {a}.",
    "a black and white photo of {a}.",
    "{c}",
    "product image: {c}",
    "a small grayscale picture of {a}",
    "close-up of {a} on a plain background",
    "{a} for sale",
    "my new {c}",
    "a low resolution photo of the {c}.",
    "catalog photo of {a}, front view",
    "{c}, studio shot",
    "look at this {c}!",
]
PHOTOS = {
    "astronaut.jpg": "an astronaut in a white space suit with an american flag",
    "chelsea_cat.jpg": "a ginger tabby cat looking at the camera",
    "china_pagoda.jpg": "a chinese pagoda temple under a blue sky",
    "coffee.jpg": "a cup of coffee on a saucer seen from above",
    "flower.jpg": "a pink flower in a garden",
    "motorcycle.jpg": "a red motorcycle parked in a workshop",
    "rocket.jpg": "a rocket on the launch pad",
}
# Faults planted on top of the clean rows: (fault, count).
FAULT_COUNTS = {
    "exact_dup": 60,
    "near_dup": 80,
    "eval_copy": 40,
    "http_404": 20,
    "http_500": 10,
    "not_image": 10,
    "truncated": 10,
    "decompression_bomb": 1,
    "empty_caption": 10,
    "whitespace_caption": 10,
    "noai": 10,
    "duplicate_row": 10,
    "long_caption": 5,
}
NEAR_DUP_KINDS = ["reencode", "resize", "shift", "flip"]
PHOTO_DUP_KINDS = ["reencode", "resize", "crop", "flip"]


def read_idx(path: Path, offset: int) -> np.ndarray:
    return np.frombuffer(gzip.open(path).read(), np.uint8, offset=offset)


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def with_article(name: str) -> str:
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def caption_for(label: int, rng: np.random.Generator) -> str:
    name = SYNONYMS[label][rng.integers(len(SYNONYMS[label]))]
    return TEMPLATES[rng.integers(len(TEMPLATES))].format(a=with_article(name), c=name)


def near_copy(img: Image.Image, kind: str) -> bytes:
    """A near duplicate that a human would call the same picture."""
    if kind == "reencode":
        return jpeg(img, quality=55)
    if kind == "resize":
        w, h = img.size
        return jpeg(img.resize((int(w * 1.3) if w < 100 else int(w * 0.6), int(h * 1.3) if h < 100 else int(h * 0.6)), Image.BICUBIC))
    if kind == "shift":  # one pixel right and down, edge replicated
        a = np.asarray(img)
        a = np.pad(a, [(1, 0), (1, 0)] + [(0, 0)] * (a.ndim - 2), mode="edge")[: a.shape[0], : a.shape[1]]
        return jpeg(Image.fromarray(a))
    if kind == "flip":
        return jpeg(ImageOps.mirror(img))
    if kind == "crop":  # central 85%
        w, h = img.size
        dx, dy = int(w * 0.075), int(h * 0.075)
        return jpeg(img.crop((dx, dy, w - dx, h - dy)))
    raise ValueError(kind)


def decompression_bomb() -> bytes:
    """A 1-bit PNG of 40000 x 40000 pixels (1.6 gigapixels) in a few hundred kilobytes."""
    width = height = 40000
    row = b"\x00" + bytes(width // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    raw = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def distinct_indices(images: np.ndarray, candidates: np.ndarray, against: np.ndarray, min_rms: float) -> np.ndarray:
    """Keep candidates whose nearest other image (among candidates and ``against``) differs by
    more than ``min_rms`` grey levels, so the pool has no unplanted duplicates."""
    import torch

    x = torch.from_numpy(images[candidates].reshape(len(candidates), -1).astype(np.float32))
    keep = []
    for start in range(0, len(x), 2048):
        d = torch.cdist(x[start : start + 2048], x) / np.sqrt(x.shape[1])
        d[torch.arange(d.shape[0]), torch.arange(start, start + d.shape[0])] = float("inf")
        if len(against):
            y = torch.from_numpy(against.reshape(len(against), -1).astype(np.float32))
            d = torch.cat([d, torch.cdist(x[start : start + 2048], y) / np.sqrt(x.shape[1])], dim=1)
        keep.append(d.min(dim=1).values > min_rms)
    return candidates[torch.cat(keep).numpy()]


def build_rows(source: Path, test_images: np.ndarray) -> list[dict]:
    rng = np.random.default_rng(SEED)
    fm = source / "fashion-mnist"
    train_images = read_idx(fm / "train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    train_labels = read_idx(fm / "train-labels-idx1-ubyte.gz", 8)
    order = rng.permutation(len(train_images))
    candidates, spare = order[: int(N_FASHION * 1.3)], iter(order[int(N_FASHION * 1.3) :])
    chosen = distinct_indices(train_images, candidates, test_images, min_rms=12.0)[:N_FASHION]
    assert len(chosen) == N_FASHION, "not enough distinct Fashion-MNIST images"

    rows: list[dict] = []

    def add(content: bytes | None, caption: str, **gt) -> dict:
        row = dict(id=len(rows), path=f"img/{len(rows):06d}.jpg", caption=caption, content=content, http="ok",
                   fault="", dup_of=-1, near_dup_kind="", label=-1, eval_index=-1, source="fashion_mnist_train", trusted=False)
        row.update(gt)
        rows.append(row)
        return row

    for index in chosen:
        label = int(train_labels[index])
        add(jpeg(Image.fromarray(train_images[index])), caption_for(label, rng), label=label)
    fashion = list(range(len(rows)))

    # About 10% of captions describe another class (the CLIP-score filter's target).
    mismatched = rng.choice(fashion, int(MISMATCH_RATE * N_FASHION), replace=False)
    for i in mismatched:
        wrong = (rows[i]["label"] + rng.integers(1, 10)) % 10
        rows[i].update(caption=caption_for(int(wrong), rng), fault="mismatch")
    clean = [i for i in fashion if rows[i]["fault"] == ""]
    for i in rng.choice(clean, N_TRUSTED, replace=False):
        rows[i]["trusted"] = True

    photos = []
    for name, caption in PHOTOS.items():
        img = Image.open(source / "photos" / name).convert("RGB")
        img.thumbnail((320, 320), Image.BICUBIC)
        photos.append((add(jpeg(img, 88), caption, source="photo"), img))
    for row, img in photos:
        for kind in PHOTO_DUP_KINDS:
            add(near_copy(img, kind), row["caption"], fault="near_dup", dup_of=row["id"], near_dup_kind=kind, source="photo")

    # Originals of planted duplicates are distinct clean rows, never trusted ones (a trusted seed stays clean).
    originals = iter(rng.permutation([i for i in clean if not rows[i]["trusted"]]))
    for _ in range(FAULT_COUNTS["exact_dup"]):
        orig = rows[next(originals)]
        add(orig["content"], caption_for(orig["label"], rng), fault="exact_dup", dup_of=orig["id"], label=orig["label"])
    for k in range(FAULT_COUNTS["near_dup"]):
        orig = rows[next(originals)]
        kind = NEAR_DUP_KINDS[k % len(NEAR_DUP_KINDS)]
        img = Image.open(io.BytesIO(orig["content"]))
        add(near_copy(img, kind), caption_for(orig["label"], rng), fault="near_dup", dup_of=orig["id"], near_dup_kind=kind, label=orig["label"])
    for i in range(FAULT_COUNTS["duplicate_row"]):
        orig = rows[next(originals)]
        add(None, orig["caption"], path=orig["path"], fault="duplicate_row", dup_of=orig["id"], label=orig["label"])

    test_labels = read_idx(fm / "t10k-labels-idx1-ubyte.gz", 8)
    for k, index in enumerate(rng.choice(len(test_images), FAULT_COUNTS["eval_copy"], replace=False)):
        img = Image.fromarray(test_images[index])
        kind = "" if k % 2 == 0 else NEAR_DUP_KINDS[k // 2 % len(NEAR_DUP_KINDS)]
        content = near_copy(img, kind) if kind else jpeg(img)
        label = int(test_labels[index])
        add(content, caption_for(label, rng), fault="eval_copy", eval_index=int(index), near_dup_kind=kind, label=label, source="fashion_mnist_test")

    def fresh(**gt) -> dict:  # an image not otherwise in the pool
        index = int(next(spare))
        label = int(train_labels[index])
        return add(jpeg(Image.fromarray(train_images[index])), caption_for(label, rng), label=label, **gt)

    for _ in range(FAULT_COUNTS["http_404"]):
        fresh(fault="http_404", http="404")["content"] = None
    for _ in range(FAULT_COUNTS["http_500"]):
        fresh(fault="http_500", http="500")["content"] = None
    for _ in range(FAULT_COUNTS["noai"]):
        fresh(fault="noai", http="noai")
    for k in range(FAULT_COUNTS["not_image"]):
        fresh(fault="not_image")["content"] = f"<html><body>404 page {k} — not an image</body></html>".encode()
    for _ in range(FAULT_COUNTS["truncated"]):
        row = fresh(fault="truncated")
        row["content"] = row["content"][: len(row["content"]) // 2]
    add(decompression_bomb(), "a very large plain picture", fault="decompression_bomb", path=f"img/{len(rows):06d}.png", source="synthetic")
    for _ in range(FAULT_COUNTS["empty_caption"]):
        fresh(fault="empty_caption")["caption"] = ""
    for k in range(FAULT_COUNTS["whitespace_caption"]):
        fresh(fault="whitespace_caption")["caption"] = [" ", "\t", "  \n ", "\u00a0 "][k % 4]
    for _ in range(FAULT_COUNTS["long_caption"]):
        row = fresh(fault="long_caption")
        row["caption"] = " ".join([row["caption"]] * 400)
    # Shuffle so faults are spread over every download shard; ids stay as assigned. A planted copy
    # is listed after its original, so "the first listed copy survives" keeps the original.
    order = [rows[i] for i in rng.permutation(len(rows))]
    position = {row["id"]: k for k, row in enumerate(order)}
    for row in [r for r in order if r["dup_of"] >= 0]:
        mine, theirs = position[row["id"]], position[row["dup_of"]]
        if mine < theirs:
            order[mine], order[theirs] = order[theirs], order[mine]
            position[row["id"]], position[row["dup_of"]] = theirs, mine
    return order


SCHEMA = pa.schema([
    ("id", pa.int32()), ("path", pa.string()), ("caption", pa.string()), ("http", pa.string()),
    ("fault", pa.string()), ("dup_of", pa.int32()), ("near_dup_kind", pa.string()), ("label", pa.int8()),
    ("eval_index", pa.int32()), ("source", pa.string()), ("trusted", pa.bool_()), ("content", pa.binary()),
])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    fm = args.source / "fashion-mnist"
    test_images = read_idx(fm / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    rows = build_rows(args.source, test_images)
    args.out.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    pq.write_table(table, args.out / "pool.parquet", compression="zstd", row_group_size=2048)
    counts = {}
    for row in rows:
        counts[row["fault"] or "clean"] = counts.get(row["fault"] or "clean", 0) + 1
    summary = {"rows": len(rows), "faults": dict(sorted(counts.items())), "trusted": sum(r["trusted"] for r in rows), "seed": SEED}
    (args.out / "ground_truth.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "fashion_mnist").mkdir(exist_ok=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "COPYRIGHT"):
        shutil.copyfile(fm / name, args.out / "fashion_mnist" / name)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
