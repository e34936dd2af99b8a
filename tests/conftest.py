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


@pytest.fixture
def error_line(capsys):
    """error_line(main, args) -> the one line a user sees when a script's main(args) stops on bad input: it must
    exit non-zero with exactly one line "error: ..." (printed, or the message of SystemExit, which Python prints
    at exit) and no traceback."""
    def run(main, args):
        with pytest.raises(SystemExit) as e:
            main(args)
        shown = capsys.readouterr().err.strip().splitlines()
        if isinstance(e.value.code, str):
            shown += e.value.code.splitlines()
        assert e.value.code not in (0, None) and len(shown) == 1 and shown[0].startswith("error: "), shown
        return shown[0]
    return run
