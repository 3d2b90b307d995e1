import contextlib
import math

import pytest
import torch
from torch import nn

from diffalign.algorithms.base import Policy, Transition
from diffalign.algorithms.dag import DAG, db_residual, leave_one_out_advantages
from diffalign.algorithms.flow import (
    FlowNetwork,
    ForwardLookingRewards,
    annealed_beta,
    backward_log_prob,
    forward_looking_rewards,
)
from diffalign.config import load_config
from diffalign.pipeline import attach_lora
from diffalign.rewards import WeightedReward
from diffalign.sampling import sample_trajectories
from diffalign.trainer import train
from tests.conftest import tiny_run_overrides


def _mean_brightness(images, prompts, metadata):
    return images.reshape(len(images), -1).mean(axis=1) / 255.0


REWARD = WeightedReward([("brightness", 1.0, _mean_brightness)])


def _transitions(traj, step):
    b = len(traj)
    rows = torch.arange(b)
    k = torch.full((b,), step, dtype=torch.long)
    return Transition(
        latents=traj.latents[rows, k], next_latents=traj.latents[rows, k + 1], timesteps=traj.timesteps[k],
        step_index=k, old_log_prob=traj.log_probs[rows, k], old_eps=traj.guided_eps[rows, k],
        prompt_embeds=traj.prompt_embeds, negative_embeds=traj.negative_embeds, sample_index=rows)


class LookupFlow(nn.Module):
    """f(x_t) read from a table keyed by the exact latents: a flow constructed to satisfy DB."""

    def __init__(self, latents, values):
        super().__init__()
        self.latents, self.values = latents, values  # (N, C, h, w), (N,)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, c):
        d = (x[:, None] - self.latents[None]).flatten(2).abs().amax(-1)  # (B, N)
        assert (d.min(dim=1).values < 1e-6).all(), "queried a state outside the table"
        return self.values[d.argmin(dim=1)] + 0 * self.dummy


def _dag(pipe, objective="db", **dag):
    cfg = load_config(overrides=[f"dag.{k}={v}" for k, v in dag.items()])
    return DAG(cfg, pipe, objective)


def test_db_residual_is_zero_for_a_constructed_consistent_flow(tiny_pipe):
    steps, beta = 4, 7.0
    traj = sample_trajectories(tiny_pipe, ["two red circles", "one blue square"], num_steps=steps, guidance_scale=3.0,
                               generator=torch.Generator().manual_seed(0))
    terminal = torch.tensor([0.3, 0.8])
    algo = _dag(tiny_pipe, proximal_weight=0.0, step_baseline="false")  # the paper's raw residual
    fl = forward_looking_rewards(tiny_pipe, traj, REWARD)  # (B, T)
    prepared = {"forward_reward": fl, "terminal_reward": terminal, "beta": beta}
    # Walk back from log F(x_0) = beta r(x_0): log F(x_k) = log F(x_k+1) + log p_B - log p_F.
    log_f = [None] * (steps + 1)
    log_f[steps] = beta * terminal
    for k in reversed(range(steps)):
        log_pb = backward_log_prob(tiny_pipe.scheduler, traj.latents[:, k], traj.latents[:, k + 1],
                                   traj.timesteps[k], "mean")
        log_f[k] = log_f[k + 1] + log_pb - traj.log_probs[:, k]
    table_x = torch.cat([traj.latents[:, k] for k in range(steps)])
    table_f = torch.cat([log_f[k] - beta * fl[:, k] for k in range(steps)])  # the learned part f_phi
    algo.bind_prepared({"flow": LookupFlow(table_x, table_f)})
    policy = Policy(tiny_pipe.unet, tiny_pipe.scheduler, 3.0, 1.0, "mean", torch.autocast("cpu", enabled=False).__class__)
    policy.autocast = lambda: torch.autocast("cpu", enabled=False)
    for k in range(steps):
        loss, stats = algo.loss(_transitions(traj, k), policy, prepared, epoch=0)
        assert stats["db_loss"] < 1e-8, f"step {k}: DB residual {stats['db_residual_abs']}"
    # A wrong terminal reward breaks balance at the last step only.
    prepared["terminal_reward"] = terminal + 0.1
    _, stats = algo.loss(_transitions(traj, steps - 1), policy, prepared, epoch=0)
    assert abs(stats["db_residual_abs"] - beta * 0.1) < 1e-4


def _grads_after(pipe, objective, **dag):
    algo = _dag(pipe, objective, **dag)
    lora = attach_lora(pipe.unet, 4, 4.0)
    with torch.no_grad():  # a non-zero LoRA so that every LoRA weight receives gradient
        for p in lora:
            p.add_(0.05 * torch.randn_like(p))
    algo.bind_prepared({"flow": algo.flow})
    nn.init.normal_(algo.flow.head.weight, std=0.1)
    traj = sample_trajectories(pipe, ["two red circles"] * 3, num_steps=3, guidance_scale=3.0,
                               generator=torch.Generator().manual_seed(1))
    prepared = {"forward_reward": forward_looking_rewards(pipe, traj, REWARD), "terminal_reward": torch.rand(3),
                "beta": 5.0}
    policy = Policy(pipe.unet, pipe.scheduler, 3.0, 1.0, "mean", lambda: torch.autocast("cpu", enabled=False))
    loss, _ = algo.loss(_transitions(traj, 1), policy, prepared, epoch=0)
    loss.backward()
    lora_grad = sum(p.grad.abs().sum().item() for p in lora if p.grad is not None)
    flow_grad = sum(p.grad.abs().sum().item() for p in algo.flow.parameters() if p.grad is not None)
    frozen = [n for n, p in pipe.unet.named_parameters() if "lora_" not in n and p.grad is not None]
    frozen += [n for n, p in pipe.text_encoder.named_parameters() if p.grad is not None]
    return lora_grad, flow_grad, frozen


def test_db_gradients_reach_lora_and_flow_only(tiny_pipe):
    lora_grad, flow_grad, frozen = _grads_after(tiny_pipe, "db", proximal_weight=0.0)
    assert lora_grad > 0 and flow_grad > 0 and frozen == []


def test_kl_flow_loss_does_not_reach_the_lora(tiny_pipe_dir):
    from diffalign.pipeline import load_pipeline

    # With the policy surrogate and the proximal term switched (almost) off, only the flow loss remains:
    # it must train the flow network and leave the LoRA without gradient (log p_F is detached there).
    lora_grad, flow_grad, frozen = _grads_after(load_pipeline(str(tiny_pipe_dir)), "kl", proximal_weight=0.0,
                                                klpf=1e-30)
    assert flow_grad > 0 and lora_grad < 1e-20 and frozen == []
    lora_grad, _, _ = _grads_after(load_pipeline(str(tiny_pipe_dir)), "kl", proximal_weight=0.0, klpf=1.0)
    assert lora_grad > 0


def test_leave_one_out_advantages():
    delta = torch.tensor([1.0, 2.0, 3.0, 10.0])
    adv = leave_one_out_advantages(delta, clip=100.0)
    base = (delta.sum() - delta) / 3
    assert torch.all(torch.sign(adv) == torch.sign(delta - base))
    assert leave_one_out_advantages(torch.tensor([0.0, 0.1, -0.1, 1e6]), clip=2.0).max() == 2.0
    with pytest.raises(ValueError, match="batch_size >= 2"):
        leave_one_out_advantages(torch.tensor([1.0]), 5.0)


def test_beta_annealing_is_linear_then_flat():
    betas = [annealed_beta(100.0, e, num_epochs=10, anneal_fraction=0.5) for e in range(10)]
    # As the reference: 0 at the first epoch, the final value from the end of the ramp on.
    assert betas[:6] == pytest.approx([0, 20, 40, 60, 80, 100]) and betas[5:] == [100.0] * 5
    assert annealed_beta(100.0, 0, 10, 0.0) == 100.0


def test_backward_kernel_is_the_forward_noising_kernel():
    from diffusers import DDIMScheduler

    from diffalign.toy.model import SCHEDULER_CONFIG

    s = DDIMScheduler(**SCHEDULER_CONFIG, set_alpha_to_one=False)
    s.set_timesteps(10)
    t = s.timesteps[2]
    a = s.alphas_cumprod[t] / s.alphas_cumprod[t - 100]
    x_next, x_t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    expected = torch.distributions.Normal(a.sqrt() * x_next, (1 - a).sqrt()).log_prob(x_t).sum(dim=(1, 2, 3))
    torch.testing.assert_close(backward_log_prob(s, x_t, x_next, t, "sum"), expected, rtol=1e-5, atol=1e-3)


def test_db_residual_formula():
    assert db_residual(1.0, 2.0, 0.5, 2.5) == 0.0


def test_flow_network_shapes_and_zero_start():
    net = FlowNetwork(in_channels=4, cross_attention_dim=64)
    out = net(torch.randn(3, 4, 16, 16), torch.tensor([900, 500, 1]), torch.randn(3, 16, 64))
    assert out.shape == (3,) and torch.count_nonzero(out) == 0  # head starts at zero


def test_flow_channels_set_the_flow_networks_widths(tiny_pipe):
    small = _dag(tiny_pipe, flow_channels="[16, 32]").flow
    assert [b.resnets[0].out_channels for b in small.down_blocks] == [16, 32]
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in _dag(tiny_pipe).flow.parameters())
    with pytest.raises(ValueError, match="flow_channels.*multiple of 16"):
        load_config(overrides=["dag.flow_channels=[16, 24]"])


@pytest.mark.parametrize("algorithm", ["dag-db", "dag-kl"])
def test_short_run_with_large_beta_stays_finite(tiny_pipe_dir, tmp_path, algorithm):
    cfg = load_config(overrides=tiny_run_overrides(
        tiny_pipe_dir, tmp_path / algorithm, 'reward.terms=[{name="jpeg_incompressibility"}]',
        f'train.algorithm="{algorithm}"', "train.epochs=2", "dag.reward_exp=10000.0", "dag.anneal_fraction=0.0",
        "train.learning_rate=1e-2"))
    result = train(cfg, log=lambda m: None)
    for h in result.history:
        for k, v in h.items():
            if isinstance(v, float):
                assert math.isfinite(v), f"{k} = {v}"
    assert (tmp_path / algorithm / "flow.safetensors").is_file()


def test_forward_looking_rewards_score_each_needed_state_once(tiny_pipe):
    traj = sample_trajectories(tiny_pipe, ["two red circles", "one blue square", "three green triangles"],
                               num_steps=5, guidance_scale=3.0, generator=torch.Generator().manual_seed(1))
    scored = []

    def counting(images, prompts, metadata):
        scored.append(len(prompts))
        return _mean_brightness(images, prompts, metadata)

    lazy = ForwardLookingRewards(tiny_pipe, traj, WeightedReward([("brightness", 1.0, counting)]))
    rows, steps = torch.tensor([0, 2, 0, 2]), torch.tensor([1, 3, 1, 4])  # (0, 1) asked twice in one lookup
    first = lazy[rows, steps]
    assert lazy.decoded == 3 and sum(scored) == 3
    again = lazy[torch.tensor([2, 0]), torch.tensor([3, 1])]  # already cached: no decode, no reward call
    assert lazy.decoded == 3 and sum(scored) == 3
    eager = forward_looking_rewards(tiny_pipe, traj, REWARD)
    torch.testing.assert_close(first, eager[rows, steps], atol=1e-5, rtol=0)
    torch.testing.assert_close(again, eager[torch.tensor([2, 0]), torch.tensor([3, 1])], atol=1e-5, rtol=0)
    assert lazy.values.isnan().sum() == 3 * 5 - 3  # states nobody asked for were never decoded


def test_step_baseline_removes_a_per_step_constant_and_is_checkpointed(tiny_pipe):
    algo = _dag(tiny_pipe, step_baseline="true", step_baseline_decay=0.5)
    k = torch.tensor([0, 0, 1, 1, 2, 2])
    bias = torch.tensor([3.0, 3.0, -1.0, -1.0, 0.5, 0.5])
    noise = torch.tensor([0.2, -0.2, 0.1, -0.1, 0.0, 0.0])
    centered = algo.center_by_step(bias + noise, k, num_steps=4)
    torch.testing.assert_close(centered, noise)  # first visit: b_k is that step's mean
    assert algo.step_seen.tolist() == [True, True, True, False]
    again = algo.center_by_step(torch.tensor([5.0, 5.0]), torch.tensor([0, 3]), num_steps=4)
    # step 0: running mean 0.5 * 3 + 0.5 * 5 = 4; step 3 is new: its own mean
    torch.testing.assert_close(again, torch.tensor([1.0, 0.0]))
    restored = _dag(tiny_pipe, step_baseline="true")
    restored.load_state_dict(algo.state_dict())
    torch.testing.assert_close(restored.step_offset, algo.step_offset)
    assert restored.step_seen.tolist() == algo.step_seen.tolist()


# --- Issue 21: the reference's forward-looking prediction, per-module clipping, the flow's learning rate ---------

def _brightness_of_x0(pipe, traj, eps, rows, steps):
    from diffalign.sampling import decode_latents, predict_x0_eps

    x = traj.latents[rows, steps]
    x0, _ = predict_x0_eps(pipe.scheduler, eps[rows, steps], traj.timesteps[steps], x)
    return torch.as_tensor(_mean_brightness(decode_latents(pipe, x0).permute(0, 2, 3, 1).numpy() * 255, None, None),
                           dtype=torch.float32)


def test_forward_looking_reward_reads_the_conditional_prediction_by_default(tiny_pipe):
    traj = sample_trajectories(tiny_pipe, ["two red circles", "one blue square"], num_steps=4, guidance_scale=4.0,
                               generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(traj.cond_eps, traj.guided_eps)  # with CFG the two predictions differ
    rows, steps = torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2])
    default = ForwardLookingRewards(tiny_pipe, traj, REWARD)[rows, steps]
    guided = ForwardLookingRewards(tiny_pipe, traj, REWARD, source="guided")[rows, steps]
    torch.testing.assert_close(default, _brightness_of_x0(tiny_pipe, traj, traj.cond_eps, rows, steps),
                               atol=2e-3, rtol=0)
    torch.testing.assert_close(guided, _brightness_of_x0(tiny_pipe, traj, traj.guided_eps, rows, steps),
                               atol=2e-3, rtol=0)
    assert _dag(tiny_pipe).dag.forward_looking == "conditional"


def test_sampler_stores_the_conditional_half_of_the_cfg_call(tiny_pipe):
    traj = sample_trajectories(tiny_pipe, ["one blue square"], num_steps=3, guidance_scale=4.0,
                               generator=torch.Generator().manual_seed(0))
    k = 1
    with torch.no_grad():
        cond = tiny_pipe.unet(traj.latents[:, k], traj.timesteps[k], encoder_hidden_states=traj.prompt_embeds).sample
    torch.testing.assert_close(traj.cond_eps[:, k], cond, atol=1e-5, rtol=1e-4)


def test_current_model_forward_looking_equals_the_sampling_models_before_any_update(tiny_pipe):
    """forward_looking = "current" makes the reference's extra conditional pass; before the model moves it must
    give what the sampling-time conditional prediction gives."""
    policy = Policy(tiny_pipe.unet, tiny_pipe.scheduler, 4.0, 1.0, "mean", contextlib.nullcontext)
    traj = sample_trajectories(tiny_pipe, ["two red circles", "one blue square"], num_steps=4, guidance_scale=4.0,
                               generator=torch.Generator().manual_seed(5))
    tr = _transitions(traj, 1)
    flow = FlowNetwork(in_channels=4, cross_attention_dim=tiny_pipe.unet.config.cross_attention_dim)
    out = {}
    for mode in ("current", "conditional"):
        algo = _dag(tiny_pipe, forward_looking=f'"{mode}"')
        prepared = {"forward_reward": ForwardLookingRewards(tiny_pipe, traj, REWARD), "beta": 10.0,
                    "terminal_reward": torch.zeros(2)}
        out[mode] = algo.log_flows(tr, prepared, flow, policy)
    for a, b in zip(out["current"], out["conditional"]):
        torch.testing.assert_close(a, b, atol=5e-3, rtol=0)


def _dag_trainer(tiny_pipe_dir, tmp_path, *extra):
    from diffalign.trainer import Trainer

    cfg = load_config(overrides=tiny_run_overrides(
        tiny_pipe_dir, tmp_path, 'reward.terms=[{name="jpeg_compressibility"}]', 'train.algorithm="dag-kl"',
        "train.learning_rate=2e-3", *extra))
    return Trainer(cfg, log=lambda m: None)


@pytest.mark.parametrize("mode", ["per_module", "joint"])
def test_gradients_are_clipped_per_module_by_default(tiny_pipe_dir, tmp_path, mode):
    trainer = _dag_trainer(tiny_pipe_dir, tmp_path, f'train.grad_clip="{mode}"', "train.max_grad_norm=1.0")
    flow_params = list(trainer.heads[0].parameters())
    for p in trainer.lora_params:
        p.grad = torch.full_like(p, 1e-4)
    for p in flow_params:
        p.grad = torch.full_like(p, 1.0)  # a flow gradient far above the clip norm
    lora_before = torch.cat([p.grad.flatten() for p in trainer.lora_params]).norm().item()
    stats = trainer.clip_gradients()
    lora_after = torch.cat([p.grad.flatten() for p in trainer.lora_params]).norm().item()
    flow_after = torch.cat([p.grad.flatten() for p in flow_params]).norm().item()
    assert stats["grad_norm"] == pytest.approx(lora_before, rel=1e-4)  # logged: the LoRA's own norm
    assert stats["grad_norm_flow"] > 100
    if mode == "per_module":
        assert lora_after == pytest.approx(lora_before, rel=1e-5)  # the flow's size does not shrink the policy's step
        assert flow_after == pytest.approx(1.0, rel=1e-3)
    else:
        assert lora_after < 0.02 * lora_before  # one norm over both: the policy's update scaled down
        assert "grad_norm_joint" in stats


def test_flow_learning_rate_defaults_to_the_policys(tiny_pipe_dir, tmp_path):
    trainer = _dag_trainer(tiny_pipe_dir, tmp_path)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [2e-3, 2e-3]
    trainer = _dag_trainer(tiny_pipe_dir, tmp_path / "b", "dag.flow_learning_rate=3e-4")
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [2e-3, 3e-4]


def test_flow_warmup_trains_the_flow_only(tiny_pipe_dir, tmp_path):
    trainer = _dag_trainer(tiny_pipe_dir, tmp_path, "dag.flow_warmup_epochs=1", "train.epochs=2",
                           "dag.anneal_fraction=0.0")
    lora0 = [p.detach().clone() for p in trainer.lora_params]
    flow0 = [p.detach().clone() for p in trainer.heads[0].parameters()]
    metrics = trainer.run_epoch(0)
    assert metrics["train/warmup"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(lora0, trainer.lora_params))  # the policy did not move
    assert any(not torch.equal(a, b) for a, b in zip(flow0, trainer.heads[0].parameters()))
    metrics = trainer.run_epoch(1)
    assert "train/warmup" not in metrics
    assert any(not torch.equal(a, b) for a, b in zip(lora0, trainer.lora_params))


def test_forward_decoder_is_used_for_the_forward_looking_decodes(tiny_pipe, tmp_path):
    from diffalign.algorithms.flow import load_forward_decoder
    from diffalign.toy.decoder import build_tiny_autoencoder

    assert load_forward_decoder("") is None
    with pytest.raises(ValueError, match="dag.forward_decoder"):
        load_forward_decoder(str(tmp_path / "nothing-here"))
    torch.manual_seed(0)
    build_tiny_autoencoder().save_pretrained(tmp_path / "tiny")
    decoder = load_forward_decoder(str(tmp_path / "tiny"))
    traj = sample_trajectories(tiny_pipe, ["two red circles"], num_steps=3, guidance_scale=4.0,
                               generator=torch.Generator().manual_seed(0))
    rows, steps = torch.tensor([0, 0]), torch.tensor([0, 2])
    with_small = ForwardLookingRewards(tiny_pipe, traj, REWARD, decoder=decoder)[rows, steps]
    with_vae = ForwardLookingRewards(tiny_pipe, traj, REWARD)[rows, steps]
    from diffalign.sampling import decode_latents, predict_x0_eps

    x0, _ = predict_x0_eps(tiny_pipe.scheduler, traj.cond_eps[rows, steps], traj.timesteps[steps], traj.latents[rows, steps])
    expected = _mean_brightness(decode_latents(tiny_pipe, x0, vae=decoder).permute(0, 2, 3, 1).numpy() * 255, 0, 0)
    torch.testing.assert_close(with_small, torch.as_tensor(expected, dtype=torch.float32), atol=2e-3, rtol=0)
    assert not torch.allclose(with_small, with_vae, atol=1e-3)


def test_small_decoder_training_resumes_and_exports(tiny_pipe, tmp_path):
    from diffalign.toy.decoder import DecoderTrainConfig, train_decoder

    cfg = DecoderTrainConfig(out_dir=str(tmp_path / "d"), num_trajectories=16, steps=4, batch=4, checkpoint_every=2)
    logs = []
    first = train_decoder(DecoderTrainConfig(**{**cfg.__dict__, "steps": 2}), pipe=tiny_pipe, log=logs.append)
    assert (tmp_path / "d" / "decoder.pt").is_file() and (first / "config.json").is_file()
    target = train_decoder(cfg, pipe=tiny_pipe, log=logs.append)
    assert any("resumed at step 2" in m for m in logs)  # the data and the first steps were not redone
    from diffusers import AutoencoderTiny

    dec = AutoencoderTiny.from_pretrained(target)
    assert dec.decoder(torch.randn(1, 4, 16, 16)).shape == (1, 3, 64, 64)


def test_db_huber_bounds_the_residuals_weight_on_the_policy(tiny_pipe):
    policy = Policy(tiny_pipe.unet, tiny_pipe.scheduler, 4.0, 1.0, "mean", contextlib.nullcontext)
    traj = sample_trajectories(tiny_pipe, ["two red circles", "one blue square"], num_steps=4, guidance_scale=4.0,
                               generator=torch.Generator().manual_seed(2))
    tr = _transitions(traj, 1)
    flow = FlowNetwork(in_channels=4, cross_attention_dim=tiny_pipe.unet.config.cross_attention_dim)
    grads = {}
    for name, extra in {"squared": {}, "huber": {"db_huber_delta": 0.5}}.items():
        algo = _dag(tiny_pipe, proximal_weight=0.0, step_baseline="false", **extra)
        algo._flow_module = flow
        # The forward-looking reward drops by 5 across step 1: a residual of beta x 5 = 50 nats.
        fl = torch.zeros(2, 4)
        fl[:, 1] = 5.0
        prepared = {"forward_reward": fl, "beta": 10.0, "terminal_reward": torch.zeros(2)}
        log_pf = torch.zeros(2, requires_grad=True)
        base_lp, eps = policy.log_prob(tr)

        class Fixed:  # the policy with log p_theta replaced by a leaf we can read the gradient of
            reduction = "mean"

            def log_prob(self, tr, lp=log_pf, base=base_lp.detach(), eps=eps.detach()):
                return lp + base, eps

        loss, _ = algo.loss(tr, Fixed(), prepared, epoch=5)
        loss.backward()
        grads[name] = log_pf.grad.abs().max().item()
    assert grads["squared"] > 5  # 2 |residual| / B with |residual| in the tens
    assert grads["huber"] == pytest.approx(2 * 0.5 / 2, rel=1e-4)  # capped at 2 delta, averaged over B = 2
