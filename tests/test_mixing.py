"""train.mixup / train.cutmix: batches and labels blended as computed by hand, reproducibly per (seed, epoch, batch),
label smoothing on the blended targets, and no training error logged for blended images."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient

from pipeline.tasks import registry
from pipeline.tasks.classification.mixing import Mixer
from pipeline.tasks.classification.task import Classifier
from pipeline.train import runner

C = 4


def _batch(n: int = 6, size: int = 8):
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, size, size).clone()  # image i is all i
    return images, torch.tensor([0, 1, 2, 3, 0, 1][:n])


def test_mixup_blends_each_image_with_its_partner_in_the_reversed_batch():
    images, labels = _batch()
    mixed, targets = Mixer(mixup=0.4, cutmix=0.0, num_classes=C, seed=5)((images, labels), (2, 7))
    lam = np.random.default_rng([5, 2, 7]).beta(0.4, 0.4)  # the draw of (seed, epoch, batch)
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.flip(0))
    onehot = F.one_hot(labels, C).float()
    assert torch.allclose(targets, lam * onehot + (1 - lam) * onehot.flip(0))
    assert torch.allclose(targets.sum(1), torch.ones(len(labels)))


def test_cutmix_pastes_a_box_and_mixes_the_labels_by_its_area():
    images, labels = _batch(size=16)
    mixer = Mixer(mixup=0.0, cutmix=1.0, num_classes=C, seed=0)
    for key in [(1, b) for b in range(20)]:
        mixed, targets = mixer((images, labels), key)
        pasted = (mixed[0, 0] == images[-1, 0]).float().mean().item()  # image 0's partner is the last image
        kept = (mixed[0, 0] == images[0, 0]).float().mean().item()
        assert pasted + kept == pytest.approx(1.0)
        assert targets[0, labels[0]].item() == pytest.approx(kept)  # the label share is the image share left
        assert targets[0, labels[-1]].item() == pytest.approx(pasted)
        assert torch.equal(mixed, mixer((images, labels), key)[0])  # the same key, the same box


def test_with_both_alphas_a_batch_takes_one_of_the_two():
    images, labels = _batch(size=16)
    mixer = Mixer(mixup=0.2, cutmix=1.0, num_classes=C, seed=0)
    kinds = set()
    for b in range(30):
        mixed, _ = mixer((images, labels), (1, b))
        values = set(mixed[0, 0].flatten().tolist())
        kinds.add("cutmix" if values <= {0.0, 5.0} else "mixup")
    assert kinds == {"cutmix", "mixup"}


def test_the_loss_smooths_blended_targets_and_reports_no_training_error():
    task = registry.get("classification")
    backbone = torch.nn.Identity()
    backbone.num_features = 3  # only the head runs: the model is fed pooled features
    model = Classifier(backbone, C, label_smoothing=0.1)
    model.input_is_features = True
    features, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 0, 1])
    soft = 0.7 * F.one_hot(labels, C).float() + 0.3 * F.one_hot(labels.flip(0), C).float()
    out = task.loss(model, (features, soft))
    assert set(out) == {"cls"}  # no TRAIN_ERROR: a blended image has no right class
    smoothed = soft * 0.9 + 0.1 / C  # timm's: each one-hot smoothed, then mixed; the same as mixed, then smoothed
    hand = -(smoothed * model(features).log_softmax(1)).sum(1).mean()
    assert out["cls"].item() == pytest.approx(hand.item(), rel=1e-5)
    assert "error" in task.loss(model, (features, labels))


@pytest.mark.e2e
def test_a_mixing_run_logs_no_training_error(task_file, tmp_path, monkeypatch, uri):
    monkeypatch.chdir(tmp_path)
    mixed = runner.run(task_file(train={"epochs": 1, "mixup": 0.2, "cutmix": 1.0}))
    plain = runner.run(task_file(train={"epochs": 1}), (f"train.output_dir={tmp_path / 'plain'}",))
    client = MlflowClient(uri)
    assert "train/error" not in client.get_run(mixed.run_id).data.metrics
    assert "train/error" in client.get_run(plain.run_id).data.metrics
