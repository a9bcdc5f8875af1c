from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)  # tiny models; 2 threads collapse when the machine is busy


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # Two intra-op threads on a busy 2-core machine run the tiny model ~50x slower (threads spin
    # against each other): every module starts at one thread, whatever the one before it set.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model():
    from omg_llava_ros import OmgLlava

    return OmgLlava.from_config("tiny", seed=0)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="module")
def perception_setup(tmp_path_factory):
    """An untrained embedded-config model for the training steps (one per test module) and its config."""
    from omg_llava_ros.training import checkpoints, config

    cfg = config.TrainConfig(out_dir=str(tmp_path_factory.mktemp("train")), bf16=False)
    torch.manual_seed(0)
    model = checkpoints.build_model(cfg, Path(cfg.out_dir))
    return cfg, model
