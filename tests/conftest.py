import numpy as np
import pytest
import torch

torch.set_num_threads(1)  # tiny models; 2 threads collapse when the machine is busy


@pytest.fixture(scope="session")
def tiny_model():
    from omg_llava_ros import OmgLlava

    return OmgLlava.from_config("tiny", seed=0)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
