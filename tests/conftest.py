import os
import sys

import pytest
import torch

# Tests import the top-level modules (vit.py, llm.py, ...) straight from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models run fastest on one intra-op thread; on a shared 2-core machine two threads slow them ~10x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
