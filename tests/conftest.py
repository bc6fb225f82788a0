import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Eager step functions unless a test fuses them itself (tests/test_fusion.py, tests/test_multistep.py):
# compiling them for every shape of the small test models would cost minutes.
os.environ.setdefault("ECMT_COMPILE", "0")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
