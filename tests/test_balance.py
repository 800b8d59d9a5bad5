"""data.balance: the class-balanced sampler draws every class equally often without changing an epoch's length, the
loss weights are the inverse frequencies, detection's repeat factors are LVIS's, and a 10x imbalance is warned about."""
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner

from pipeline import config
from pipeline.cli import main
from pipeline.data.sampling import EpochSampler, WeightedSampler, class_balanced, training_sampler
from pipeline.study import sweep
from pipeline.tasks import registry
from pipeline.tasks.classification.balance import class_counts, loss_weights
from pipeline.tasks.detection.balance import images_per_category, repeat_factors
from pipeline.tasks.detection.data import ImageRecord
from pipeline.train import builders, checks, runner

LABELS = [0] * 120 + [1] * 30 + [2] * 4  # 154 images, 30:1 between the largest and the smallest class


def _epoch(sampler, epoch: int) -> list:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_balanced_sampler_draws_each_class_equally_often_and_keeps_the_epoch_length():
    sampler = WeightedSampler(class_balanced(LABELS), seed=0)
    assert len(sampler) == len(LABELS)  # the same steps per epoch as without balancing
    drawn = Counter()
    for epoch in range(1, 41):
        items = _epoch(sampler, epoch)
        assert len(items) == len(LABELS)
        drawn.update(LABELS[index] for index, _ in items)
    total = 40 * len(LABELS)
    for label in (0, 1, 2):  # a third each, within 4 standard deviations of a binomial draw
        assert abs(drawn[label] - total / 3) < 4 * math.sqrt(total * (1 / 3) * (2 / 3)), drawn
    plain = Counter(LABELS[i] for i, _ in _epoch(EpochSampler(len(LABELS), seed=0), 1))
    assert plain == Counter(LABELS)  # the unbalanced order holds each image once


def test_balanced_sampler_is_a_function_of_seed_and_epoch():
    a, b = WeightedSampler(class_balanced(LABELS), seed=3), WeightedSampler(class_balanced(LABELS), seed=3)
    assert _epoch(a, 2) == _epoch(b, 2)  # a resumed run replays the epoch
    assert _epoch(a, 2) != _epoch(a, 3) and _epoch(a, 2) != _epoch(WeightedSampler(class_balanced(LABELS), 4), 2)
    items = _epoch(a, 5)
    seeds: dict[int, set[int]] = {}
    for index, seed in items:
        seeds.setdefault(index, set()).add(seed)
    repeated = [i for i, n in Counter(i for i, _ in items).items() if n > 1]
    assert repeated and all(len(seeds[i]) == Counter(i for i, _ in items)[i] for i in repeated)  # new augmentation


def test_balanced_sampler_shares_the_epoch_out_among_ranks():
    ranks = [WeightedSampler(class_balanced(LABELS), seed=0, rank=r, world=2) for r in (0, 1)]
    whole = _epoch(WeightedSampler(class_balanced(LABELS), seed=0), 1)
    shards = [_epoch(s, 1) for s in ranks]
    assert len(shards[0]) == len(shards[1]) == len(LABELS) // 2
    assert sorted(shards[0] + shards[1]) == sorted(whole)


def test_cached_views_draw_by_their_image_s_weight():
    sampler = training_sampler(3 * len(LABELS), class_balanced(LABELS), seed=0, with_seeds=False,
                               num_samples=len(LABELS))
    assert isinstance(sampler, WeightedSampler) and len(sampler) == len(LABELS)
    drawn = Counter(LABELS[i % len(LABELS)] for epoch in range(1, 21) for i in _epoch(sampler, epoch))
    assert min(drawn.values()) > 0.8 * max(drawn.values())


def test_loss_weights_are_inverse_frequencies_averaging_one_over_the_images():
    counts = class_counts(LABELS, 4)
    assert counts == [120, 30, 4, 0]
    weights = loss_weights(counts)
    assert weights == pytest.approx([154 / (3 * 120), 154 / (3 * 30), 154 / (3 * 4), 0.0])
    assert sum(n * w for n, w in zip(counts, weights)) == pytest.approx(sum(counts))  # the loss keeps its scale


def _imbalanced(shapes: Path, tmp_path: Path, keep: dict[str, int]) -> Path:
    root = tmp_path / "imbalanced"
    shutil.copytree(shapes, root)
    for name, n in keep.items():
        for path in sorted((root / "train" / name).iterdir())[n:]:
            path.unlink()
    return root


def test_loss_balance_weights_the_classification_loss(task_file, shapes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = _imbalanced(shapes, tmp_path, {"circle": 1, "cross": 2})
    setup = runner.prepare(task_file(data={"root": str(root), "balance": "loss"}))
    data = builders.build_data(setup)
    counts = data.info.class_counts
    assert counts == [1, 2, 10, 10, 10, 10] and data.train.sampling_weights is None
    expected = [sum(counts) / (6 * n) for n in counts]
    assert data.info.facts.loss_weights == pytest.approx(expected)
    model = builders.build_model(setup, data.info)
    images = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3])
    model.eval()
    logits = model(images)
    per_image = F.cross_entropy(logits, labels, reduction="none")
    w = torch.tensor(expected)[labels]
    hand = (w * per_image).sum() / w.sum()  # PyTorch's weighted mean: by the weights of the batch's labels
    assert setup.task.loss(model, (images, labels))["cls"].item() == pytest.approx(hand.item(), rel=1e-5)
    assert "class_weights" not in model.state_dict()  # a training setting, not a weight: checkpoints stay as they were


def test_sampler_balance_gives_the_train_set_weights(task_file, shapes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = _imbalanced(shapes, tmp_path, {"circle": 1})
    setup = runner.prepare(task_file(data={"root": str(root), "balance": "sampler"}))
    data = builders.build_data(setup)
    assert data.info.facts.loss_weights is None
    train, _ = builders.loaders(setup.task, data.train, data.val, 4, 0, setup.device, 0)
    assert isinstance(train.sampler, WeightedSampler) and len(train.sampler) == len(data.train)
    drawn = Counter(data.train.targets[i] for epoch in range(1, 31) for i, _ in _epoch(train.sampler, epoch))
    assert drawn[0] > 0.5 * drawn[1]  # the one circle is drawn about as often as the ten crosses together


def test_balanced_cached_features_draw_by_class(task_file, shapes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = _imbalanced(shapes, tmp_path, {"circle": 1})
    setup = runner.prepare(task_file(data={"root": str(root), "balance": "sampler",
                                           "train_transforms": [{"name": "Resize", "height": 32, "width": 32}]},
                                     finetune={"freeze": "all", "cache_features": True}))
    data = builders.build_data(setup)
    model = builders.build_model(setup, data.info)
    plan = builders.plan_finetune(setup, model)
    model = builders.place_model(setup, model, plan)
    train, _ = builders.make_loaders(setup, data, model, plan)
    assert isinstance(train.sampler, WeightedSampler) and len(train.sampler) == len(data.train)


@pytest.mark.e2e
def test_a_tenfold_imbalance_is_warned_about_naming_the_option(task_file, shapes, tmp_path, monkeypatch, said):
    monkeypatch.chdir(tmp_path)
    root = _imbalanced(shapes, tmp_path, {"circle": 1})
    result = CliRunner().invoke(main, ["run", str(task_file(train={"epochs": 1})), f"data.root={root}"])
    assert result.exit_code == 0, result.output
    warned = [line for line in said if "training images" in line]
    assert warned == ["warning: class 'cross' has 10 training images and 'circle' 1 (10x): a model trained on them "
                      "mostly predicts the big classes; set data.balance=sampler or data.balance=loss"]
    said.clear()
    result = CliRunner().invoke(main, ["run", str(task_file(train={"epochs": 1})), f"data.root={root}",
                                       "data.balance=sampler", f"train.output_dir={tmp_path / 'balanced'}"])
    assert result.exit_code == 0 and not [line for line in said if "training images" in line]


def test_imbalance_below_tenfold_is_not_warned_and_detection_names_repeat_factor():
    cls = config.validate({"task": "classification"}).data
    assert checks.imbalance_warning([9, 1], ["a", "b"], cls) is None
    assert checks.imbalance_warning([0, 50, 5], ["a", "b", "c"], cls).startswith("class 'b' has 50")
    det = config.validate({"task": "detection"}).data
    assert checks.imbalance_warning([40, 2], ["cat", "dog"], det).endswith("set data.balance=repeat_factor")


def _record(i: int, labels: list[int], crowd: list[bool] | None = None) -> ImageRecord:
    n = len(labels)
    return ImageRecord(image_id=i, path=Path(f"{i}.png"), width=8, height=8, boxes=np.zeros((n, 4), np.float32),
                       labels=np.array(labels, dtype=np.int64), crowd=np.array(crowd or [False] * n, dtype=bool),
                       area=np.ones(n, np.float32))


def test_repeat_factors_are_lvis_s():
    # 10 images: category 1 in all of them, 2 in two, 3 in one (and once as a crowd box, which does not count)
    records = [_record(0, [1, 2, 3]), _record(1, [1, 2]), _record(2, [1, 3], crowd=[False, True])] + \
              [_record(i, [1]) for i in range(3, 9)] + [_record(9, [])]
    counts = images_per_category(records, 3)
    assert counts == [9, 2, 1]
    t = 0.5
    r = [max(1.0, math.sqrt(t / (n / 10))) for n in counts]  # r_c = max(1, sqrt(t / f_c))
    factors = repeat_factors(records, counts, t)
    assert factors[0] == pytest.approx(max(r))  # the image's rarest category
    assert factors[1] == pytest.approx(r[1]) and factors[2] == pytest.approx(r[0]) and factors[9] == 1.0


def test_data_balance_sweeps_like_any_key(task_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fixed, swept = sweep.parse_args(("data.balance=none,sampler,loss",))
    assert swept == {"data.balance": ["none", "sampler", "loss"]}
    combos = [{"data.balance": v} for v in swept["data.balance"]]
    assert sweep._validate(task_file(), fixed, combos).data.balance == "none"


def test_repeat_factor_balance_draws_detection_images_by_their_factors(tmp_path, uri):
    task = registry.get("detection")
    sections = task.tiny(tmp_path / "data")
    sections["data"].update({"balance": "repeat_factor", "repeat_threshold": 1.0})
    path = tmp_path / "tasks" / "det.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump({"task": "detection", **sections, "train": {"output_dir": str(tmp_path / "out")},
                                    "tracking": {"uri": uri}}))
    setup = runner.prepare(path)
    data = builders.build_data(setup)
    counts = data.info.class_counts
    assert len(counts) == data.info.num_classes and sum(counts) > 0
    expected = repeat_factors(data.train.records, counts, 1.0)
    assert data.train.sampling_weights == expected and max(expected) > 1.0  # threshold 1: every category is "rare"
    train, _ = builders.loaders(setup.task, data.train, data.val, 2, 0, setup.device, 0)
    assert isinstance(train.sampler, WeightedSampler) and len(train.sampler) == len(data.train)
