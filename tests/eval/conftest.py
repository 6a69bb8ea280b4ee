"""Real evaluation inputs written by the tests: WebDataset shards and an image-folder tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from eval_data import colour_png, write_shard
from eval_models import PALETTE

COLOURS = list(PALETTE)


@pytest.fixture(scope="session")
def colour_shards(tmp_path_factory) -> str:
    """Two shards, one image per palette colour, each with two or three captions and its class."""
    root = tmp_path_factory.mktemp("colour_wds")
    samples = []
    for label, colour in enumerate(COLOURS):
        captions = [f"a {colour} square", f"something {colour}"] + ([f"plain {colour}"] if label % 2 else [])
        samples.append({"png": colour_png(colour), "txt": "\n".join(captions).encode(), "cls": str(label).encode()})
    write_shard(root / "00000.tar", samples[:4])
    write_shard(root / "00001.tar", samples[4:])
    return str(root / "{00000..00001}.tar")


@pytest.fixture(scope="session")
def colour_folder(tmp_path_factory) -> Path:
    """root/<colour>/<k>.png: three shades of every palette colour."""
    root = tmp_path_factory.mktemp("colour_folder")
    for colour in COLOURS:
        (root / colour).mkdir()
        for shade in range(3):
            (root / colour / f"{shade}.png").write_bytes(colour_png(colour, shade=20 * shade))
    return root
