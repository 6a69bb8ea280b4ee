"""img2dataset's downloader, fetching under a :class:`pipeline.fetch.FetchPolicy` in whichever process runs it.

img2dataset builds its ``Downloader`` inside ``img2dataset.download`` and pickles it to its download
processes (multiprocessing, pyspark or ray). :func:`download` has it build ours instead; ours, on
its first shard in a process, installs the policy's urllib opener (what img2dataset's fetch opens
URLs with) and wraps img2dataset's ``download_image`` so that at most ``per_host`` requests to one
host run at once in that process.
"""

from __future__ import annotations

import functools
import importlib
import threading
import urllib.parse
import urllib.request

import img2dataset
import img2dataset.downloader

from pipeline.fetch import FetchPolicy, opener

_MAIN = importlib.import_module("img2dataset.main")  # the module; the package's ``main`` attribute is its CLI function
_IMG2DATASET_FETCH = img2dataset.downloader.download_image
_slots: dict[str, threading.BoundedSemaphore] = {}
_slots_lock = threading.Lock()


def _capped_fetch(policy: FetchPolicy, row, *args, **kwargs):
    """img2dataset's download_image, holding one of ``per_host`` slots of the URL's host throughout."""
    if not policy.per_host:
        return _IMG2DATASET_FETCH(row, *args, **kwargs)
    host = (urllib.parse.urlsplit(row[1]).hostname or "").lower()
    with _slots_lock:
        slot = _slots.setdefault(host, threading.BoundedSemaphore(policy.per_host))
    with slot:
        return _IMG2DATASET_FETCH(row, *args, **kwargs)


@functools.lru_cache(maxsize=1)
def install(policy: FetchPolicy) -> None:
    """Make this process's urllib and img2dataset fetch under ``policy`` (once per process)."""
    urllib.request.install_opener(opener(policy))
    img2dataset.downloader.download_image = functools.partial(_capped_fetch, policy)


class Downloader(img2dataset.downloader.Downloader):
    """img2dataset's downloader, fetching under a FetchPolicy in whichever process runs it."""

    def __init__(self, *, policy: FetchPolicy, **kwargs):
        super().__init__(**kwargs)
        self.policy = policy

    def __call__(self, row):
        install(self.policy)
        return super().__call__(row)


def download(policy: FetchPolicy, **options) -> None:
    """``img2dataset.download(**options)`` with its downloads made by :class:`Downloader` under ``policy``."""
    original = _MAIN.Downloader
    _MAIN.Downloader = functools.partial(Downloader, policy=policy)
    try:
        img2dataset.download(**options)
    finally:
        _MAIN.Downloader = original
