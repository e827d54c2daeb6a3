import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(torch.get_num_threads(), 4))

from reference_models import build_hf, save_hf  # noqa: E402


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """family -> (directory with the saved checkpoint + tokenizer, the transformers model). Built once per run."""
    cache = {}

    def get(family: str):
        if family not in cache:
            model = build_hf(family)
            path = save_hf(model, tmp_path_factory.mktemp(family))
            cache[family] = (path, model)
        return cache[family]

    return get
