import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory):
    """A randomly initialised toy-architecture pipeline in diffusers layout (no trained weights needed)."""
    from diffalign.toy.model import build_random_pipeline

    path = tmp_path_factory.mktemp("tiny") / "pipe"
    build_random_pipeline(path, seed=0)
    return path


@pytest.fixture()
def tiny_pipe(tiny_pipe_dir):
    from diffalign.pipeline import load_pipeline

    return load_pipeline(str(tiny_pipe_dir))


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory):
    """A tiny random StableDiffusionXLPipeline (tests/helpers/tiny_families.py)."""
    from tests.helpers.tiny_families import build_sdxl

    path = tmp_path_factory.mktemp("sdxl") / "pipe"
    build_sdxl(path)
    return path


@pytest.fixture(scope="session")
def vpred_dir(tmp_path_factory):
    """The toy architecture as an SD 2.x-style v-prediction pipeline."""
    from tests.helpers.tiny_families import build_sd_v_prediction

    path = tmp_path_factory.mktemp("vpred") / "pipe"
    build_sd_v_prediction(path)
    return path


def tiny_run_overrides(pipe_dir, out_dir, *extra):
    return [f'model.id="{pipe_dir}"', f'output_dir="{out_dir}"', "sample.num_steps=3", "sample.batch_size=4",
            "sample.num_batches_per_epoch=1", "train.batch_size=2", "log.progress=false", 'log.tracker="none"',
            "reward.workers=0", *extra]
