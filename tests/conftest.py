import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

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


OFFICIAL_FIXTURE = Path(os.environ.get("MMI_OFFICIAL_FIXTURE", Path(__file__).parent / "fixtures" / "official-mmi"))


@pytest.fixture(scope="session")
def build_official():
    """build_official() -> (a fresh fp32 eval-mode model from the authors' tiny released checkpoint and its component
    folders in tests/fixtures/official-mmi, fixture.json's metadata). Its LLM folder has no tokenizer.model: the
    model only needs the special ids, set from the metadata."""
    def build():
        from checkpoints import build_model
        meta = json.loads((OFFICIAL_FIXTURE / "fixture.json").read_text())
        mc = meta["model_config"]
        folders = dict(clip=mc["visual_tokenizer_config"]["encoder_model_path"], llm=mc["llm_model_path"],
                       sd=mc["image_decoder_config"]["pretrained_model_name_or_path"])
        m = build_model(released=OFFICIAL_FIXTURE / "mm_interleaved_pretrain", released_config=mc,
                        dtype=torch.float32, **{k: OFFICIAL_FIXTURE / v for k, v in folders.items()}).eval()
        ids = meta["token_ids"]
        m.tok = SimpleNamespace(bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"], boi_id=ids["boi"],
                                image_id=ids["image"])
        return m, meta
    return build
