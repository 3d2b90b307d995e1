"""The toy flow model's trainer (toy/train_flow.py): a few steps, resume after a stop equals an uninterrupted run,
and the exported directory is a StableDiffusion3Pipeline that diffalign loads and samples."""

import pytest
import torch

from diffalign.toy.train_flow import ToyFlowTrainConfig, train_toy_flow_model


def _cfg(out, steps):
    return ToyFlowTrainConfig(out_dir=str(out), steps=steps, batch=4, num_scenes=16, layers=1, heads=2, head_dim=16,
                              checkpoint_every=2)


@pytest.mark.slow
def test_flow_toy_trains_resumes_exactly_and_exports_a_loadable_pipeline(tmp_path):
    from diffalign.families import StableDiffusion3Family, family_for
    from diffalign.pipeline import load_pipeline
    from diffalign.sampling import sample_trajectories

    straight = train_toy_flow_model(_cfg(tmp_path / "a", 4), log=lambda m: None)
    train_toy_flow_model(_cfg(tmp_path / "b", 2), log=lambda m: None)  # stopped after 2 steps ...
    resumed = train_toy_flow_model(_cfg(tmp_path / "b", 4), log=lambda m: None)  # ... and run on to 4
    a = torch.load(tmp_path / "a" / "transformer.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "transformer.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for sa, sb in zip(a["ema"], b["ema"]):
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
    pipe = load_pipeline(str(resumed))
    assert isinstance(family_for(pipe), StableDiffusion3Family)
    traj = sample_trajectories(pipe, ["two red circles"], num_steps=3, guidance_scale=4.0, eta=0.7,
                               generator=torch.Generator().manual_seed(0))
    assert traj.images.shape == (1, 3, 64, 64) and torch.isfinite(traj.log_probs).all()
    assert straight.is_dir()
