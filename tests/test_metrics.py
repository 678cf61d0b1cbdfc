import numpy as np
import pytest
import torch

from eval import metrics
from eval.digits_classifier import DigitsClassifier, load_classifier


def gaussian_fd(mu1, var1, mu2, var2):
    return float(((mu1 - mu2) ** 2).sum() + (var1 + var2 - 2 * np.sqrt(var1 * var2)).sum())


def test_frechet_distance_matches_torch_fidelity_and_closed_form():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(loc=0.3, size=(1500, 16)) @ rng.normal(size=(16, 16))
    ours = metrics.frechet_distance(a, b)
    stats = [{"mu": x.mean(0), "sigma": np.cov(x, rowvar=False)} for x in (a, b)]
    ref = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    assert ours == pytest.approx(ref, rel=1e-6)
    # Diagonal Gaussians: exact value from moments.
    a = rng.normal(size=(200_000, 4)) * [1, 2, 3, 4]
    b = rng.normal(size=(200_000, 4)) * [2, 2, 1, 1] + [1, 0, 0, 0]
    assert metrics.frechet_distance(a, b) == pytest.approx(gaussian_fd(np.array([0] * 4), np.array([1, 4, 9, 16]),
                                                                       np.array([1, 0, 0, 0]), np.array([4, 4, 1, 1])), rel=0.02)
    assert abs(metrics.frechet_distance(a, a)) < 1e-6


def test_kid_and_precision_recall_behave():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(500, 8)), rng.normal(size=(500, 8))
    far = rng.normal(loc=5, size=(500, 8))
    assert abs(metrics.kernel_inception_distance(a, b)) < 0.01 < metrics.kernel_inception_distance(a, far)
    assert metrics.kernel_inception_distance(a, b) == metrics.kernel_inception_distance(a, b)  # seeded
    p, r = metrics.precision_recall(a, b)
    assert p > 0.8 and r > 0.8
    p, r = metrics.precision_recall(far, b)
    assert p < 0.05 and r < 0.05


@pytest.mark.parametrize("resolution", [16, 32])  # 32: the mini-gpu scale, 28 px digits upscaled
def test_committed_classifier_accuracy_and_batch_size_independence(resolution):
    from core.config import DataConfig
    from core.data import ImageData

    test = ImageData(DataConfig(resolution=resolution, split="test", allow_upscale=True))
    x, y = test.images(range(len(test))), np.array(test.labels)
    feats, probs = metrics.classifier_outputs(x, resolution, batch_size=500)
    assert (probs.argmax(1) == y).mean() >= 0.97
    feats_small, _ = metrics.classifier_outputs(x, resolution, batch_size=7)
    np.testing.assert_allclose(feats, feats_small, rtol=1e-5, atol=1e-6)


def test_proxy_metrics_separate_real_from_noise():
    from core.config import DataConfig
    from core.data import ImageData

    train, test = ImageData(DataConfig(split="train")), ImageData(DataConfig(split="test"))
    real, held = train.images(range(500)), test.images(range(500))
    same = metrics.digits_proxy_metrics(held, real, labels=np.array(test.labels))
    noise = metrics.digits_proxy_metrics(torch.rand(500, 1, 16, 16) * 2 - 1, real)
    assert same["fd_digits"] < 0.1 * noise["fd_digits"]
    assert same["prompt_acc"] >= 0.97 and same["confident_digits"] > 0.9
    assert metrics.perceptual_distance_digits(held[:4], held[:4]).max() < 1e-9
    assert (metrics.perceptual_distance_digits(held[:4], held[4:8]) > 0).all()


def test_masked_mse_and_psnr():
    a, b = torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)
    b[:, :, :2] = 1.0  # differs only in the top half
    top = torch.zeros(1, 1, 4, 4)
    top[..., :2, :] = 1
    np.testing.assert_allclose(metrics.masked_mse(a, b, top), [1.0, 1.0])
    np.testing.assert_allclose(metrics.masked_mse(a, b, 1 - top), [0.0, 0.0])
    assert metrics.psnr(np.array([1.0]))[0] == pytest.approx(10 * np.log10(4))


def test_missing_weights_stop_with_the_file_name(tmp_path, monkeypatch):
    monkeypatch.setenv(metrics.WEIGHTS_ENV, str(tmp_path))
    with pytest.raises(metrics.MissingWeightsError, match="inception-2015-12-05.pt.*CONPREDIFF_WEIGHTS"):
        metrics.clean_fid_feature_extractor("cpu")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(metrics.MissingWeightsError, match="alexnet-owt-7be5be79.pth"):
        metrics.lpips_alex()
    with pytest.raises(metrics.MissingWeightsError, match="clip-vit-large-patch14"):
        metrics.clip_score(torch.zeros(1, 3, 8, 8), ["a"])


def test_missing_classifier_weights_say_how_to_make_them():
    with pytest.raises(FileNotFoundError, match="python -m eval.digits_classifier --resolution 12"):
        load_classifier(12)
    assert isinstance(DigitsClassifier()(torch.zeros(1, 1, 16, 16)), torch.Tensor)


def test_fd_context_is_zero_for_identical_sets_permutation_invariant_and_separates_noise():
    import torch

    from eval.context_stats import fd_context, neighborhood_vectors

    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(64, 1, 18, 18, generator=g), 3, 1) * 2 - 1  # (64,1,16,16)
    other = torch.nn.functional.avg_pool2d(torch.rand(64, 1, 18, 18, generator=g), 3, 1) * 2 - 1
    noise = torch.rand(64, 1, 16, 16, generator=g) * 2 - 1
    assert fd_context(smooth, smooth) == pytest.approx(0, abs=1e-6)
    assert fd_context(other, smooth) < 0.1 * fd_context(noise, smooth)
    # A point's neighbors form a set: mirroring every image permutes each ring, the centre stays put.
    v = neighborhood_vectors(smooth, 2)
    assert v.shape == (64 * 12 * 12, 9)
    mirrored = neighborhood_vectors(smooth.flip(-1), 2)
    assert sorted(map(tuple, v.round(6))) == sorted(map(tuple, mirrored.round(6)))
    # By hand, one interior point of stride 1: its value, then its 8 neighbors in ascending order.
    x = torch.arange(9.0).view(1, 1, 3, 3)
    assert neighborhood_vectors(x, 1).tolist() == [[4.0, 0, 1, 2, 3, 5, 6, 7, 8]]


def test_fd_context_record_beside_matches_the_direct_value_and_refuses_twice(tmp_path):
    import json

    import torch

    from core.config import DataConfig
    from core.data import ImageData
    from eval.context_stats import fd_context, metric_name, record_beside
    from core.sample import load_pngs as load_samples

    test = ImageData(DataConfig(source="digits", resolution=16, split="test"))
    images = test.images(range(8))
    samples = tmp_path / "runs" / "mini-x-s0" / "samples" / "ddim-50-noclip"
    samples.mkdir(parents=True)
    from core.sample import save_png

    for i, img in enumerate(images):
        save_png(((img[0].numpy() + 1) * 127.5).round().clip(0, 255).astype("uint8"), samples / f"{i:06d}.png")
    anchor = {"experiment": "unconditional", "preset": "mini-x", "seed": 0, "checkpoint": 10, "n_samples": 8,
              "scale": "mini", "sampler": "ddim-50-noclip", "benchmark": "digits16", "method": "baseline",
              "metric": "fd_digits", "value": 1.0, "ema": True, "reference": "r", "backend": "b",
              "git_commit": "x", "time": "t", "device": "cpu"}
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps(anchor) + "\n")
    rec = record_beside(samples, records)
    real = ImageData(DataConfig(source="digits", resolution=16))
    direct = fd_context(load_samples(sorted(samples.glob("*.png"))), real.images(range(len(real))))
    assert rec["metric"] == metric_name() and rec["value"] == pytest.approx(direct, rel=1e-9)
    assert {k: rec[k] for k in ("preset", "seed", "checkpoint", "sampler", "n_samples")} == \
        {k: anchor[k] for k in ("preset", "seed", "checkpoint", "sampler", "n_samples")}
    with pytest.raises(SystemExit, match="already recorded"):
        record_beside(samples, records)
