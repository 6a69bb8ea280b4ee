"""The steps' model inference (torch): imported by a shard phase when it runs a model, so that the
curation registry, the configs and every dataset-wide task load without torch (a task starts in
well under a second, where importing torch alone takes seconds: thousands of array tasks at scale)."""
