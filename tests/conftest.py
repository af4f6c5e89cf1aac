import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HARP_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

# tiny models gain nothing from threads, and spinning OpenMP workers hurt on a busy 2-core machine
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """The longest files first (the real engines, then files with tests on the real model), each file's tests
    in their own order: run on two workers a file at a time (`make test`), the long ones start at once
    instead of finishing alone at the end."""
    def rank(item) -> int:
        if item.fspath.basename == "test_vllm.py":
            return 0
        return 1 if any(i.get_closest_marker("slow") for i in by_file[item.fspath]) else 2

    by_file: dict = {}
    for item in items:
        by_file.setdefault(item.fspath, []).append(item)
    items.sort(key=rank)
