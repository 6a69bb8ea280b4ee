"""Objectives; each module registers its objective in ``train.registry.OBJECTIVES``."""
