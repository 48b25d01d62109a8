"""ClusterFit pseudo labels: torch k-means vs scikit-learn, the cache, the official-pickle reader."""

import json
import os
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from advfast import pseudo_labels as pl
from advfast.io import file_sha256
from advfast.pseudo_labels.cli import main as generate


def _blobs(k, dim, n_per, spread, g):
    """k Gaussian blobs whose centres are at least 12 spreads apart (so the optimum is the true
    partition), with their labels."""
    while True:
        centers = g.uniform(-10, 10, (k, dim))
        gaps = np.linalg.norm(centers[:, None] - centers[None], axis=-1) + np.eye(k) * 1e9
        if gaps.min() > 12 * spread:
            break
    pts = np.concatenate([c + spread * g.standard_normal((n_per, dim)) for c in centers])
    return torch.from_numpy(pts), torch.arange(k).repeat_interleave(n_per)


@pytest.mark.parametrize("k,dim", [(4, 2), (7, 5), (12, 16)])
def test_torch_kmeans_matches_sklearn_inertia(k, dim):
    g = np.random.default_rng(int(torch.randint(1 << 30, ())))
    x, truth = _blobs(k, dim, 53, 0.4, g)  # ragged: 53 points per blob
    ours = pl.kmeans(x, k, seed=3)
    ref = pl.kmeans_sklearn(x, k, seed=3)
    true_inertia = sum(((x[truth == c] - x[truth == c].mean(0)) ** 2).sum().item() for c in range(k))
    # well separated blobs: both find the true partition, so the inertias agree closely
    assert ref.inertia == pytest.approx(true_inertia, rel=1e-6)
    assert ours.inertia == pytest.approx(ref.inertia, rel=1e-6)
    # and the result is self-consistent: labels are nearest centres, inertia their sum of squares
    d = torch.cdist(x, ours.centers) ** 2
    assert torch.equal(ours.labels, d.argmin(1))
    assert ours.inertia == pytest.approx(d.min(1).values.sum().item(), rel=1e-9)
    # every centre is the mean of its cluster
    for c in range(k):
        assert torch.allclose(ours.centers[c], x[ours.labels == c].mean(0), atol=1e-9)


def test_torch_kmeans_is_seeded_and_handles_duplicates():
    x = torch.randn(40, 3, dtype=torch.float64)
    a, b = pl.kmeans(x, 5, seed=11), pl.kmeans(x, 5, seed=11)
    assert torch.equal(a.labels, b.labels)
    dup = torch.cat([torch.zeros(30, 2), torch.ones(2, 2)]).double()  # 2 distinct points, k=3
    res = pl.kmeans(dup, 3, seed=0)
    assert res.inertia == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="k must be in"):
        pl.kmeans(x, 41)


def _fake_dataset(n=60, name="fake"):
    g = torch.Generator().manual_seed(0)
    return SimpleNamespace(images=torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=g),
                           labels=torch.zeros(n, dtype=torch.int64), name=name)


def test_raw_pixel_labels_are_written_and_reused(tmp_path):
    ds = _fake_dataset()
    out = tmp_path / "labels.safetensors"
    msgs = []
    first = pl.build_pseudo_labels(ds, out, source="raw_pixels", ks=[2, 5], device="cpu", log=msgs.append)
    meta = json.loads((tmp_path / "labels.json").read_text())
    assert meta["ks"] == [2, 5] and meta["dataset"] == "fake" and meta["num_images"] == 60
    assert set(first) == {2, 5} and first[5].dtype == torch.int64 and first[5].shape == (60,)
    assert int(first[5].max()) < 5
    # a matching sidecar is a cache hit: the file is read back, not recomputed
    msgs.clear()
    again = pl.build_pseudo_labels(ds, out, source="raw_pixels", ks=[2, 5], device="cpu", log=msgs.append)
    assert any("reusing" in m for m in msgs)
    assert all(torch.equal(first[k], again[k]) for k in first)
    # other settings (another seed) rebuild and overwrite the cache
    msgs.clear()
    pl.build_pseudo_labels(ds, out, source="raw_pixels", ks=[2, 5], seed=1, device="cpu", log=msgs.append)
    assert any("rebuilding" in m for m in msgs)
    assert json.loads((tmp_path / "labels.json").read_text())["seed"] == 1


def test_load_refuses_other_dataset_and_size(tmp_path):
    ds = _fake_dataset()
    out = tmp_path / "l.safetensors"
    pl.build_pseudo_labels(ds, out, source="raw_pixels", ks=[2], device="cpu", log=lambda m: None)
    with pytest.raises(ValueError, match="made for dataset 'fake'"):
        pl.load_pseudo_labels(out, num_images=60, ks=[2], dataset_name="cifar10")
    with pytest.raises(ValueError, match="has 60 labels but the dataset has 61"):
        pl.load_pseudo_labels(out, num_images=61, ks=[2])
    with pytest.raises(ValueError, match="has no pseudo_train_10"):
        pl.load_pseudo_labels(out, num_images=60, ks=[10])
    with pytest.raises(ValueError, match="python -m advfast.pseudo_labels --encoder RUN_DIR"):
        pl.load_pseudo_labels(tmp_path / "missing.safetensors", num_images=60, ks=[2])


def _official_pickle(arrays: dict) -> bytes:
    data = pickle.dumps(arrays, protocol=3)
    # the shipped file was written by numpy 1.x, which names numpy.core; numpy 2 writes numpy._core
    return data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def test_official_pickle_is_read(tmp_path):
    g = np.random.default_rng(0)
    arrays = {f"pseudo_train_{k}": g.integers(0, k, 30).astype(np.int32) for k in (2, 10)}
    arrays["pseudo_test_2"] = g.integers(0, 2, 7).astype(np.int32)
    path = tmp_path / "official.pkl"
    path.write_bytes(_official_pickle(arrays))
    back = pl.read_official_pickle(path)
    assert set(back) == set(arrays) and all(np.array_equal(back[k], arrays[k]) for k in arrays)
    labels = pl.load_pseudo_labels(path, num_images=30, ks=[2, 10])
    assert labels[10].dtype == torch.int64
    assert torch.equal(labels[10], torch.from_numpy(arrays["pseudo_train_10"]).long())


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"pseudo_train_2": _Evil(marker)}, protocol=3))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load (posix|os|nt).system"):
        pl.read_official_pickle(path)
    assert not marker.exists()
    # a plain builtin call is refused too
    path.write_bytes(pickle.dumps({"x": SimpleNamespace(a=1)}, protocol=3))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load types.SimpleNamespace"):
        pl.read_official_pickle(path)


def _encoder_run_dir(path, seed):
    """A run dir as advfast-train exports it: encoder.safetensors + encoder.json (build_args)."""
    from safetensors.torch import save_file

    from advfast.models import build_encoder

    torch.manual_seed(seed)
    enc = build_encoder("convnet", ("normal",), widths=(8, 16), strides=(2, 1))
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(path / "encoder.safetensors"))
    from advfast.models.export import FORMAT

    (path / "encoder.json").write_text(json.dumps({"format": FORMAT, "bn_branch": "normal",
                                                   "build_args": dict(enc.build_args, bn_branches=["normal"])}))
    return enc


def test_encoder_labels_cache_follows_the_encoder_hash(tmp_path, capsys):
    run = tmp_path / "run"
    enc = _encoder_run_dir(run, seed=0)
    out = tmp_path / "labels.safetensors"
    argv = ["--encoder", str(run), "--dataset", "synthetic", "--image-size", "8", "--out", str(out),
            "--ks", "2,3", "--device", "cpu"]
    assert generate(argv) == 0
    meta = json.loads((tmp_path / "labels.json").read_text())
    assert meta["encoder_sha256"] == file_sha256(run / "encoder.safetensors")
    assert meta["dataset"] == "synthetic" and meta["num_images"] == 1024 and meta["ks"] == [2, 3]
    # the labels are k-means of the encoder's L2-normalised features
    from advfast.data import load_dataset

    ds = load_dataset("synthetic", image_size=8)
    feats = pl.encoder_features(enc.eval(), ds.images, "cpu")
    first = pl.load_pseudo_labels(out, num_images=1024, ks=[2, 3], dataset_name="synthetic")
    assert torch.equal(first[3], pl.kmeans(feats, 3, seed=0).labels)
    # same encoder file: a cache hit
    capsys.readouterr()
    generate(argv)
    assert "reusing" in capsys.readouterr().err
    # another encoder in the same run dir: the hash differs, the cache is rebuilt
    _encoder_run_dir(run, seed=1)
    generate(argv)
    assert "rebuilding" in capsys.readouterr().err
    assert json.loads((tmp_path / "labels.json").read_text())["encoder_sha256"] == \
        file_sha256(run / "encoder.safetensors")


def test_encoder_dir_must_hold_an_export(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no encoder.json"):
        pl.build_pseudo_labels(_fake_dataset(), tmp_path / "l.safetensors", encoder=tmp_path, ks=[2])
