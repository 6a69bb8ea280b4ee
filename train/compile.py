"""``run.compile``: regional compilation of a model's repeated blocks."""

from __future__ import annotations

from torch import nn


def compile_blocks(module: nn.Module) -> int:
    """Regional compilation, as torchtitan does it: ``Module.compile()`` on every block of each stack
    of identical blocks (ViT and text transformer blocks, BERT layers, ResNet bottlenecks), in place.

    Blocks and not the whole model: objectives call towers through methods (``encode_image``,
    ``image_tokens``) that a compiled ``forward`` would not cover; identical blocks share one
    compiled graph, so compilation stays short; the feature gathers of the losses stay eager (a
    block with global BatchNorm breaks its graph at the collective). In place, so the parameters stay
    the modules' own and
    DeepSpeed partitions them as usual. Returns the number of blocks compiled.
    """
    count = 0
    for child in module.children():
        stack = isinstance(child, (nn.ModuleList, nn.Sequential)) and len(child) > 0
        if stack and len({type(block) for block in child}) == 1 and any(True for _ in child.parameters()):
            for block in child:
                block.compile()
            count += len(child)
        else:
            count += compile_blocks(child)
    return count
