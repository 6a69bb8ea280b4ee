"""The data contract a model carries: how its inputs must be prepared.

Every registered model exposes ``model.contract``; the training data pipeline, the
evaluation transforms and the curation scorer all derive their preprocessing from it, so
a model never meets inputs prepared for another.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(kw_only=True, frozen=True)
class DataContract:
    image_size: int = 224
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # CLIP's
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    interpolation: str = "bicubic"
    tokenizer: str = "clip_bpe"  # a name in the tokenizer registry; "" for image-only models
    tokenizer_path: str = ""  # local files for tokenizers that need them (Hugging Face)
    context_length: int = 77
