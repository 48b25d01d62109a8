"""AdvCL: SupCon (float64 transcription of HobbitLong's SupConLoss), the HFC view, the two attacks,
the training loss, pseudo labels by dataset index, and a few training steps."""

import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from advfast.data import Batch
from advfast.engine import Trainer, build_config
from advfast.methods import METHODS


# ---- float64 transcriptions, written from the official code, not from advfast ----------------------
def supcon_loss_official(features, temperature=0.5, base_temperature=0.07):
    """HobbitLong/SupContrast losses.py SupConLoss(contrast_mode='all') with labels=None, mask=None;
    features: [bsz, n_views, dim]."""
    batch_size = features.shape[0]
    mask = torch.eye(batch_size, dtype=features.dtype)
    contrast_count = features.shape[1]
    contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
    anchor_feature, anchor_count = contrast_feature, contrast_count
    anchor_dot_contrast = torch.div(torch.matmul(anchor_feature, contrast_feature.T), temperature)
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()
    mask = mask.repeat(anchor_count, contrast_count)
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(batch_size * anchor_count).view(-1, 1), 0)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    return loss.view(anchor_count, batch_size).mean()


def generate_high_official(images, r):
    """fr_util.generate_high: mask 1 where dist((i,j), centre) < r, keep (1 - mask) of the shifted spectrum."""
    h, w = images.shape[-2:]
    mask = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            if math.hypot(i - h // 2, j - w // 2) < r:
                mask[i, j] = 1
    spec = np.fft.fftshift(np.fft.fftn(images.double().numpy(), axes=(-2, -1)), axes=(-2, -1))
    out = np.fft.ifftn(np.fft.ifftshift(spec * (1 - mask), axes=(-2, -1)), axes=(-2, -1))
    return torch.from_numpy(np.real(out))


# ---- helpers -------------------------------------------------------------------------------------
N_IMAGES = 1024  # the synthetic dataset's default size
KS = (2, 5)


def _labels_file(tmp_path, n=N_IMAGES, ks=KS):
    """The official pickle format (dict of int32 numpy arrays), made here for the synthetic dataset."""
    g = np.random.default_rng(1)
    arrays = {f"pseudo_train_{k}": g.integers(0, k, n).astype(np.int32) for k in ks}
    path = tmp_path / "labels.pkl"
    path.write_bytes(pickle.dumps(arrays, protocol=3))
    return path, {k: torch.from_numpy(arrays[f"pseudo_train_{k}"]).long() for k in ks}


def _synthetic_method(tmp_path, **options):
    opts = dict(head_hidden=32, cluster_ks=",".join(map(str, KS)))
    opts.update(options)
    if "pseudo_labels" not in opts and opts.get("ce_weight", 0.2) > 0:
        opts["pseudo_labels"] = str(_labels_file(tmp_path)[0])
    cfg = build_config("advcl", None, "synthetic", overrides=[{
        "arch": "convnet", "image_size": 8, "batch_size": 8, "epochs": 1, "attack": {"steps": 3},
        "method_options": opts}])
    return METHODS["advcl"](cfg, 10, (0.5,) * 3, (0.25,) * 3), cfg


def _batch(b=8, size=8):
    views = [torch.rand(b, 3, size, size) for _ in range(3)]
    return Batch(views, torch.zeros(b, dtype=torch.int64), torch.randperm(N_IMAGES)[:b])


# ---- loss --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b,dim", [(1, 4), (5, 16), (13, 128)])
def test_contrastive_loss_is_official_supcon(tmp_path, b, dim):
    m, _ = _synthetic_method(tmp_path)
    views = [F.normalize(torch.randn(b, dim, dtype=torch.float64), dim=1).requires_grad_(True) for _ in range(4)]
    ours = m.contrastive_loss(views)
    ref_in = [v.detach().clone().requires_grad_(True) for v in views]
    ref = supcon_loss_official(torch.stack(ref_in, dim=1))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    ours.backward()
    ref.backward()
    for a, r in zip(views, ref_in):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-8, atol=1e-12)


def test_training_loss_is_the_official_recipe(tmp_path):
    m, _ = _synthetic_method(tmp_path)
    _, labels = _labels_file(tmp_path)
    m.double().train()  # float64 throughout: embed, the HFC view and the pseudo-label CE keep the model's dtype
    batch = _batch()
    batch = Batch([v.double() for v in batch.views], batch.labels, batch.indices)
    x1, x2, org = batch.views
    x_cl = (org + 0.03 * torch.randn_like(org).sign()).clamp(0, 1)
    x_ce = (org - 0.03 * torch.randn_like(org).sign()).clamp(0, 1)
    m.attack = lambda *a: (x_cl, x_ce)  # fix the attack: this test is about the loss
    loss, metrics = m.training_step(batch)
    with torch.no_grad():  # train mode: each separate forward depends only on its own batch
        def z(x, branch):
            return F.normalize(m.head(m.backbone(x, branch), branch).double(), dim=1)
        hfc = generate_high_official(org, 8 * 8 / 32)
        feats = torch.stack([z(x_cl, "pgd"), z(x1, "normal"), z(x2, "normal"), z(hfc, "normal")], dim=1)
        h_ce = m.backbone(x_ce, "pgd_ce").double()
        ce = sum(F.cross_entropy(h_ce @ m.cluster_heads[f"fc_{k:03d}"].weight.double().T
                                 + m.cluster_heads[f"fc_{k:03d}"].bias.double(), labels[k][batch.indices])
                 for k in KS) / len(KS)
        expected = supcon_loss_official(feats) + 0.2 * ce
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    assert metrics["loss_pseudo_ce"].item() == pytest.approx(ce.item(), rel=1e-10)


def test_hfc_view_comes_from_the_clean_original_view(tmp_path):
    m, _ = _synthetic_method(tmp_path)
    m.train()
    batch = _batch()
    seen = []
    embed = m.embed
    m.embed = lambda x, branch: (seen.append((x.detach().clone(), branch)), embed(x, branch))[1]
    m.training_step(batch)
    ref = generate_high_official(batch.views[2], 2.0).float()  # r = 8 * H / 32 on 8x8 images
    assert any(branch == "normal" and torch.allclose(x, ref, atol=1e-5) for x, branch in seen)
    assert ref.min() < 0  # unclamped: negative values are fed as they are
    torch.testing.assert_close(m.hfc_view(batch.views[2]), ref, atol=1e-5, rtol=0)


# ---- attack --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_attacks_raise_their_losses_and_stay_in_the_ball(tmp_path, mode):
    m, cfg = _synthetic_method(tmp_path, attack_mode=mode)
    m.train()
    batch = _batch()
    x1, x2, org = batch.views
    hfc = m.hfc_view(org)
    targets = m.pseudo_targets(batch.indices)
    x_cl, x_ce = m.attack(x1, x2, hfc, org, targets)
    eps = cfg.attack.eps
    for x in (x_cl, x_ce):
        assert (x - org).abs().max() <= eps + 1e-6 and x.min() >= 0 and x.max() <= 1
    assert not torch.equal(x_cl, x_ce), "independent random starts"
    assert m.training
    m.train(mode == "train")
    with torch.no_grad():
        rest = [m.embed(x1, "normal"), m.embed(x2, "normal"), m.embed(hfc, "normal")]

        def contrastive(x):
            return m.contrastive_loss([m.embed(x, "pgd")] + rest)

        def ce(x):
            return m.cluster_ce(m.backbone(x, "pgd_ce"), targets, "sum")

        assert contrastive(x_cl) > contrastive(org)
        assert ce(x_ce) > ce(org)


def test_bn_branches_keep_separate_statistics(tmp_path):
    m, _ = _synthetic_method(tmp_path)
    m.train()
    m.training_step(_batch())
    state = m.backbone.state_dict()
    means = {b: state[f"bn1.bns.{b}.running_mean"] for b in ("normal", "pgd", "pgd_ce")}
    assert not torch.allclose(means["normal"], means["pgd"])
    assert not torch.allclose(means["pgd"], means["pgd_ce"])


# ---- pseudo labels ---------------------------------------------------------------------------------
def test_pseudo_labels_are_looked_up_by_dataset_index(tmp_path):
    m, _ = _synthetic_method(tmp_path)
    _, labels = _labels_file(tmp_path)
    idx = torch.tensor([3, 0, 1023, 7])
    got = m.pseudo_targets(idx)
    assert all(torch.equal(got[k], labels[k][idx]) for k in KS)
    assert "pseudo_5" in m.state_dict()  # carried by checkpoints


def test_missing_pseudo_labels_say_how_to_make_them(tmp_path):
    cfg = build_config("advcl", None, "cifar10", overrides=[{"arch": "convnet"}])
    with pytest.raises(ValueError, match=r"python -m advfast\.pseudo_labels --encoder RUN_DIR "
                                         r"--dataset cifar10 --out"):
        METHODS["advcl"](cfg, 10, (0.5,) * 3, (0.25,) * 3)


def test_labels_for_another_dataset_size_are_refused(tmp_path):
    path, _ = _labels_file(tmp_path, n=N_IMAGES + 1)
    with pytest.raises(ValueError, match="has 1025 labels but the dataset has 1024"):
        _synthetic_method(tmp_path, pseudo_labels=str(path))


def test_without_clusterfit(tmp_path):
    m, _ = _synthetic_method(tmp_path, ce_weight=0.0)
    assert not m.ks and len(m.cluster_heads) == 0
    loss, metrics = m.training_step(_batch())
    assert math.isfinite(loss.item()) and set(metrics) == {"loss_supcon"}


# ---- training ----------------------------------------------------------------------------------------
def test_digits_trains_a_few_steps_with_raw_pixel_labels(tmp_path):
    cfg = build_config("advcl", None, "digits", overrides=[{
        "image_size": 8, "batch_size": 32, "epochs": 1, "max_steps": 3, "progress": False, "out": str(tmp_path),
        "attack": {"steps": 2}, "method_options": {"head_hidden": 32, "cluster_ks": "2,5"}}])
    trainer = Trainer(cfg)
    labels = trainer.method.pseudo_5
    assert labels.shape == (len(trainer.dataset.labels),) and int(labels.max()) == 4
    summary = trainer.fit()
    assert summary["step"] == 3 and math.isfinite(summary["last"]["loss"])
    assert math.isfinite(summary["last"]["loss_pseudo_ce"])
    assert (tmp_path / "encoder.safetensors").is_file()


def test_pseudo_labels_from_an_exported_encoder_are_cached_beside_it(tmp_path):
    from advfast.engine import export_encoder
    from advfast import pseudo_labels as pl
    from advfast.io import file_sha256

    donor, cfg = _synthetic_method(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    export_encoder(donor, cfg, run, step=0, image_size=8)  # the real export format
    m, _ = _synthetic_method(tmp_path, pseudo_labels_from=str(run), pseudo_labels=None)
    cache = run / "pseudo_labels_synthetic.safetensors"
    assert cache.is_file()
    assert pl.read_meta(cache)["encoder_sha256"] == file_sha256(run / "encoder.safetensors")
    loaded = pl.load_pseudo_labels(cache, num_images=N_IMAGES, ks=KS)
    assert all(torch.equal(m.pseudo_targets(torch.arange(N_IMAGES))[k], loaded[k]) for k in KS)
