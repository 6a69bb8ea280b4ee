"""Model families; each module registers its models in ``train.registry.MODELS``."""
