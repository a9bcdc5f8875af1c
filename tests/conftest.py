import numpy as np
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model():
    from omg_llava_ros import OmgLlava

    return OmgLlava.from_config("tiny", seed=0)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
