import pytest
import torch

from diffalign.algorithms.d3po import D3PO, dpo_loss, preference_pairs
from diffalign.algorithms.hero import HERO, RoundLabels, cosine_distance, make_triplets, triplet_loss
from diffalign.config import D3POConfig, HEROConfig


def _labels(good, best=None, prev=False):
    return RoundLabels(torch.tensor(good, dtype=torch.bool), best, prev)


def test_triplet_loss_uses_cosine_distance_and_margin():
    a = torch.tensor([[1.0, 0.0]])
    same, opposite = torch.tensor([[2.0, 0.0]]), torch.tensor([[-1.0, 0.0]])
    assert cosine_distance(a, same).item() == pytest.approx(0.0)
    assert cosine_distance(a, opposite).item() == pytest.approx(1.0)
    assert triplet_loss(a, same, opposite, margin=0.5).item() == 0.0  # 0 - 1 + 0.5 < 0
    assert triplet_loss(a, opposite, same, margin=0.5).item() == pytest.approx(1.5)


def test_triplets_edge_cases():
    # Normal round: anchor = best, positives = other good, negatives = bad.
    assert sorted(make_triplets(_labels([1, 1, 0, 0], best=0), 4, 0)) == [(0, 1, 2), (0, 1, 3)]
    # Only the best is good: the anchor is its own positive.
    assert make_triplets(_labels([1, 0, 0], best=0), 3, 0) == [(0, 0, 1), (0, 0, 2)]
    # No good image (no best) or no bad image: nothing to learn.
    assert make_triplets(_labels([0, 0, 0]), 3, None) == []
    assert make_triplets(_labels([1, 1], best=1), 2, 1) == []


def test_best_from_candidate_list_is_the_previous_best():
    torch.manual_seed(0)
    hero = HERO(HEROConfig(encoder="latent-cnn", embed_steps=5))
    prev = torch.randn(4, 16, 16)
    hero.best_latent = prev.clone()
    latents = torch.randn(3, 4, 16, 16)
    # Evaluators preferred the previous best over this batch: it anchors, batch good images are positives.
    stats = hero.update(latents, _labels([1, 0, 0], best=None, prev=True), torch.Generator().manual_seed(0))
    assert stats["triplets"] == 2  # (prev, good 0, bad 1), (prev, good 0, bad 2)
    torch.testing.assert_close(hero.best_latent, prev)


def test_no_good_round_keeps_encoder_and_gives_zero_advantage_rewards():
    hero = HERO(HEROConfig(encoder="latent-cnn", embed_steps=5))
    before = {k: v.clone() for k, v in hero.encoder.state_dict().items()}
    latents = torch.randn(4, 4, 16, 16)
    stats = hero.update(latents, _labels([0, 0, 0, 0]), torch.Generator().manual_seed(0))
    assert stats["triplets"] == 0
    assert all(torch.equal(before[k], v) for k, v in hero.encoder.state_dict().items())
    r = hero.rewards(latents, torch.zeros(4, dtype=torch.bool))
    assert torch.all(r == r[0])  # no preference yet: equal rewards, so no policy update


def test_encoder_learns_to_rank_good_above_bad():
    torch.manual_seed(0)
    hero = HERO(HEROConfig(encoder="latent-cnn", embed_steps=200, learning_rate=3e-3))
    good_kind = torch.randn(1, 4, 16, 16)
    bad_kind = torch.randn(1, 4, 16, 16)
    latents = torch.cat([good_kind + 0.3 * torch.randn(4, 4, 16, 16), bad_kind + 0.3 * torch.randn(4, 4, 16, 16)])
    labels = _labels([1, 1, 1, 1, 0, 0, 0, 0], best=0)
    hero.update(latents, labels, torch.Generator().manual_seed(0))
    fresh = torch.cat([good_kind + 0.3 * torch.randn(6, 4, 16, 16), bad_kind + 0.3 * torch.randn(6, 4, 16, 16)])
    r = hero.rewards(fresh, torch.zeros(12, dtype=torch.bool))
    assert r[:6].min() > r[6:].max()


def test_noise_reuse_fractions_and_perturbation():
    hero = HERO(HEROConfig(encoder="latent-cnn", best_noise_fraction=0.5, noise_perturbation=0.1))
    noises = torch.randn(8, 4, 16, 16)
    nxt = hero.next_noises(noises, _labels([1, 0, 1, 0, 0, 1, 0, 0], best=2), 8, torch.Generator().manual_seed(0))
    corr = [torch.nn.functional.cosine_similarity(nxt[i].flatten(), noises[j].flatten(), dim=0).item()
            for i in range(8) for j in (2,)]
    assert sum(c > 0.95 for c in corr) == 4  # half from the best's noise, close but not equal
    assert all(not torch.equal(nxt[i], noises[2]) for i in range(8))
    rest = nxt[4:]
    for i, j in enumerate([0, 5, 0, 5]):  # the other good images' noises, in turn
        assert torch.nn.functional.cosine_similarity(rest[i].flatten(), noises[j].flatten(), dim=0) > 0.95
    # Unit variance is kept: sqrt(1 - s^2) eps + s z.
    assert 0.9 < nxt.std().item() < 1.1
    # Nothing preferred ever: fresh noise.
    assert HERO(HEROConfig(encoder="latent-cnn")).next_noises(noises, _labels([0] * 8), 8, torch.Generator()) is None


def test_preference_pairs_best_good_bad_within_groups():
    good = [True, True, False, False]
    pairs = preference_pairs(good, best=0, groups=[[0, 1], [2, 3]])
    assert pairs == [(0, 1)]  # group 2 has two bad images: no preference
    pairs = preference_pairs([True, False, True, False], best=2, groups=[[0, 1, 2, 3]])
    assert set(pairs) == {(0, 1), (0, 3), (2, 0), (2, 1), (2, 3)}


def test_dpo_loss_prefers_winner():
    w = torch.zeros(3, requires_grad=True)
    loss = dpo_loss(w, torch.zeros(3), beta=0.1)
    loss.backward()
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert torch.all(w.grad < 0)  # raising the winner's log-ratio lowers the loss


def test_d3po_schedule_pairs_share_a_step():
    algo = D3PO(D3POConfig())
    algo.set_pairs([(0, 1), (2, 3), (4, 5)])
    items = list(algo.schedule(6, steps=5, trained_steps=5, batch_size=4, gen=torch.Generator().manual_seed(0)))
    assert len(items) == 2 * 5
    for rows, k in items:
        m = len(rows) // 2
        assert all((int(rows[i]), int(rows[m + i])) in {(0, 1), (2, 3), (4, 5)} for i in range(m))
        assert torch.all(k == k[0])


def test_reward_modes_best_and_good_mean():
    torch.manual_seed(0)
    latents = torch.randn(5, 4, 16, 16)
    good = torch.tensor([1, 1, 0, 0, 0], dtype=torch.bool)
    hero = HERO(HEROConfig(encoder="latent-cnn", embed_steps=50))
    hero.update(latents, _labels(good.tolist(), best=1), torch.Generator().manual_seed(0))
    r = hero.rewards(latents, good)
    assert r.argmax().item() == 1 and r[1].item() == pytest.approx(1.0, abs=1e-5)  # the best is most like itself
    assert torch.all((r >= 0) & (r <= 1 + 1e-6))
    hero.cfg = HEROConfig(encoder="latent-cnn", reward_mode="good-mean")
    emb = torch.nn.functional.normalize(hero.encoder.embed(latents), dim=-1).detach()
    expected = ((emb @ emb[good].T + 1) / 2).mean(dim=1)
    torch.testing.assert_close(hero.rewards(latents, good), expected)


def test_only_best_good_round_pushes_bad_away_from_best():
    torch.manual_seed(1)
    latents = torch.randn(4, 4, 16, 16)
    hero = HERO(HEROConfig(encoder="latent-cnn", embed_steps=100, learning_rate=3e-3))
    labels = _labels([0, 1, 0, 0], best=1)
    before = hero.rewards(latents, labels.good) if hero.best_latent is not None else None
    assert before is None
    stats = hero.update(latents, labels, torch.Generator().manual_seed(0))
    assert stats["triplets"] == 3  # (best, best, bad) for each bad image
    r = hero.rewards(latents, labels.good)
    assert r[1] > r[[0, 2, 3]].max()


def test_collapsed_encoder_update_is_undone():
    torch.manual_seed(0)
    latents = torch.randn(6, 4, 16, 16)
    hero = HERO(HEROConfig(encoder="latent-cnn", embed_steps=50))
    # A fresh encoder maps everything to nearly one direction (its biases dominate); one round of triplets
    # spreads the embeddings apart.
    hero.update(latents, _labels([1, 1, 0, 0, 0, 0], best=0), torch.Generator().manual_seed(0))
    assert not hero.collapsed(latents)
    # An encoder whose output no longer depends on its input is what the triplet loss's trivial minimum looks like.
    constant = HERO(HEROConfig(encoder="latent-cnn"))
    torch.nn.init.zeros_(constant.encoder.mlp[-1].weight)
    assert constant.collapsed(latents)
    before = {k: v.clone() for k, v in hero.encoder.state_dict().items()}
    hero.collapsed = lambda z: True  # force the guard: this round's training must leave no trace
    stats = hero.update(latents, _labels([1, 0, 1, 0, 0, 0], best=2), torch.Generator().manual_seed(1))
    assert stats["encoder_collapsed"] and stats["triplets"] == 4
    assert all(torch.equal(before[k], v) for k, v in hero.encoder.state_dict().items())
    torch.testing.assert_close(hero.best_latent, latents[2])  # the new best is still remembered


def test_noise_reuse_keeps_previous_best_noise_and_only_best_fills_the_batch():
    hero = HERO(HEROConfig(encoder="latent-cnn", best_noise_fraction=0.5, noise_perturbation=0.1))
    noises = torch.randn(4, 4, 16, 16)
    gen = torch.Generator().manual_seed(0)
    # Only the best is good: every next noise comes from it.
    nxt = hero.next_noises(noises, _labels([0, 1, 0, 0], best=1), 4, gen)
    cos = torch.nn.functional.cosine_similarity(nxt.flatten(1), noises[1].flatten()[None], dim=1)
    assert torch.all(cos > 0.95)
    # Next round the previous best wins again (best index None): its noise is still the one reused.
    fresh = torch.randn(4, 4, 16, 16)
    nxt = hero.next_noises(fresh, _labels([1, 0, 0, 0], best=None, prev=True), 4, gen)
    from_best = torch.nn.functional.cosine_similarity(nxt.flatten(1), noises[1].flatten()[None], dim=1) > 0.95
    from_good = torch.nn.functional.cosine_similarity(nxt.flatten(1), fresh[0].flatten()[None], dim=1) > 0.95
    assert from_best.tolist() == [True, True, False, False] and from_good.tolist() == [False, False, True, True]


def _features(pipe, **kw):
    from diffalign.algorithms.hero import UNetFeatures
    return UNetFeatures(pipe, kw.get("block", "up_blocks.1"), kw.get("timestep", 50))


def test_unet_features_are_per_image_and_ignore_the_lora(tiny_pipe):
    from diffalign.pipeline import attach_lora
    from diffalign.sampling import encode_prompts

    embeds = encode_prompts(tiny_pipe, ["two red circles"], 1.0)[0]
    c, s = tiny_pipe.unet.config.in_channels, tiny_pipe.unet.config.sample_size
    latents = torch.randn((3, c, s, s), generator=torch.Generator().manual_seed(0))
    features = _features(tiny_pipe)
    base = features(latents, embeds)
    assert base.shape == (3, tiny_pipe.unet.config.block_out_channels[-2])
    # An image's features do not depend on its batch or its position in it.
    torch.testing.assert_close(features(latents[[2, 0]], embeds), base[[2, 0]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features(latents, embeds, chunk=2), base, atol=1e-5, rtol=1e-5)
    # One prompt embedding per image, split with its image across chunks.
    per_image = embeds.expand(len(latents), -1, -1).contiguous()
    torch.testing.assert_close(features(latents, per_image, chunk=2), base, atol=1e-5, rtol=1e-5)
    # The LoRA is switched off while reading them (the embedding must not move as the policy trains), and on after.
    torch.manual_seed(0)
    params = attach_lora(tiny_pipe.unet, 4, 4, ["to_q", "to_k", "to_v", "to_out.0"])
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p))
    torch.testing.assert_close(features(latents, embeds), base)
    out_on = tiny_pipe.unet(latents, 50, encoder_hidden_states=embeds.expand(3, -1, -1)).sample
    from diffalign.pipeline import set_lora_enabled
    set_lora_enabled(tiny_pipe.unet, False)
    out_off = tiny_pipe.unet(latents, 50, encoder_hidden_states=embeds.expand(3, -1, -1)).sample
    assert not torch.allclose(out_on, out_off)  # the adapter was enabled again after the features call


def test_unet_features_bad_block_or_timestep_names_the_field(tiny_pipe):
    with pytest.raises(ValueError, match=r"hero.feature_block = 'up_blocks.9'.*up_blocks"):
        _features(tiny_pipe, block="up_blocks.9")
    with pytest.raises(ValueError, match="hero.feature_timestep"):
        _features(tiny_pipe, timestep=5000)


def test_feature_encoder_learns_to_rank_good_above_bad():
    torch.manual_seed(0)
    hero = HERO(HEROConfig(encoder="unet-features", embed_steps=200, learning_rate=3e-3), feature_dim=64)
    good_kind, bad_kind = torch.randn(1, 64), torch.randn(1, 64)
    feats = torch.cat([good_kind + 0.3 * torch.randn(4, 64), bad_kind + 0.3 * torch.randn(4, 64)])
    stats = hero.update(feats, _labels([1, 1, 1, 1, 0, 0, 0, 0], best=0), torch.Generator().manual_seed(0))
    assert stats["triplets"] == 3 * 4
    torch.testing.assert_close(hero.best_latent, feats[0])
    fresh = torch.cat([good_kind + 0.3 * torch.randn(6, 64), bad_kind + 0.3 * torch.randn(6, 64)])
    r = hero.rewards(fresh, torch.zeros(12, dtype=torch.bool))
    assert r[:6].min() > r[6:].max()
    with pytest.raises(ValueError, match="feature"):
        HERO(HEROConfig(encoder="unet-features"))
