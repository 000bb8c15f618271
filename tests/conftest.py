import os

# Tests never download: everything is generated or shipped.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: the tiny models here run faster single-threaded, and far faster on a loaded machine.
torch.set_num_threads(1)

from _settings import FAST  # noqa: E402


@pytest.fixture
def fast_overrides():
    return list(FAST)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One head/expert cache for the whole session (heads are built once)."""
    return tmp_path_factory.mktemp("cache")
