import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llada(tmp_path_factory):
    from dllmq.models.tiny import write_tiny_llada

    return write_tiny_llada(tmp_path_factory.mktemp("models") / "tiny-llada", seed=0)


@pytest.fixture(scope="session")
def tiny_dream(tmp_path_factory):
    from dllmq.models.tiny import write_tiny_dream

    return write_tiny_dream(tmp_path_factory.mktemp("models") / "tiny-dream", seed=0)
