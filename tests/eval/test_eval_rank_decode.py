"""Each evaluation rank decodes only its own samples (index % world == rank): the other ranks' images
here are not images at all, so decoding one of them raises."""

from __future__ import annotations

import io

import pytest
import webdataset as wds
from PIL import Image

from pipeline.evaluation.datasets import EvalSet, WebDatasetShards


def test_each_rank_decodes_only_its_own_samples(tmp_path):
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(jpeg, format="JPEG")
    with wds.TarWriter(str(tmp_path / "eval.tar")) as sink:
        for i in range(9):  # rank 1 of 3 owns 1, 4, 7; everything else is garbage
            sink.write({"__key__": f"s{i}", "jpg": jpeg.getvalue() if i % 3 == 1 else b"not an image", "cls": str(i)})
    data = EvalSet(WebDatasetShards.Config(name="wds", urls=str(tmp_path / "eval.tar")))
    items = list(data.shard(rank=1, world_size=3))
    assert [index for index, _ in items] == [1, 4, 7]
    assert all(record["image"].size == (8, 8) for _, record in items)
    with pytest.raises(ValueError, match="cannot decode the image of .*s0: "):
        list(data.shard(rank=0, world_size=3))
