"""fastai's side of benchmarks/peers.py: train a random-init fastai vision_learner on an ImageFolder and print one JSON
line with its training img/s and final top-1.

Runs with the peers venv's python (fastai is not a project dependency), never with the project's:

    .venv-peers/bin/python benchmarks/peers_fastai.py --data data/shapes/classification --size 64 --epochs 5

fastai's own defaults throughout: `vision_learner(dls, resnet18, pretrained=False)` (its head: concat pooling, BN,
dropout, two linear layers; no input normalization without pretrained weights), `fit_one_cycle(epochs)` at its
default lr (1e-3, Adam, one-cycle), and `learn.freeze()` (body frozen, its BatchNorm layers still training) for the
frozen setting. Training img/s counts the training phase of each epoch only (before_train .. after_train: every
training batch, its loading included, as the pipeline's train/throughput does), median over epochs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True, help="ImageFolder root with train/ and val/")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--bs", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--freeze", action="store_true", help="learn.freeze(): train the head (and body BN) only")
    parser.add_argument("--aug", choices=("none", "flip", "aug_transforms"), default="flip",
                        help="flip: a random horizontal flip per image (FlipItem); aug_transforms: fastai's standard "
                             "batch augmentations; none: Resize only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import fastai
    import torch
    from fastai.vision.all import (
        Callback,
        FlipItem,
        ImageDataLoaders,
        Resize,
        accuracy,
        aug_transforms,
        models,
        set_seed,
        vision_learner,
    )

    class TrainTimer(Callback):
        """Seconds and images of each epoch's training phase (all of it, batch loading included)."""

        order = -100  # before the other callbacks' before_train, after them on after_train

        def __init__(self):
            self.rates, self.seconds = [], []

        def before_train(self):
            self.images, self.start = 0, time.perf_counter()

        def after_batch(self):
            if self.training:
                self.images += len(self.yb[0])

        def after_train(self):
            if getattr(self.dls.device, "type", "cpu") == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - self.start
            self.seconds.append(elapsed)
            self.rates.append(self.images / elapsed)

    set_seed(args.seed, reproducible=False)
    item_tfms = [Resize(args.size)]
    batch_tfms = None
    if args.aug == "flip":
        item_tfms.append(FlipItem(0.5))
    elif args.aug == "aug_transforms":
        batch_tfms = aug_transforms()
    dls = ImageDataLoaders.from_folder(args.data, train="train", valid="val", item_tfms=item_tfms,
                                       batch_tfms=batch_tfms, bs=args.bs, num_workers=args.workers)
    timer = TrainTimer()
    learn = vision_learner(dls, getattr(models, args.arch), pretrained=False, metrics=accuracy, cbs=[timer])
    learn.logger = lambda row: print(row, file=sys.stderr)  # stdout: the JSON line only
    if args.freeze:
        learn.freeze()
    trainable = sum(p.numel() for p in learn.model.parameters() if p.requires_grad)
    started = time.perf_counter()
    with learn.no_bar():  # as the pipeline in a redirected log: no progress bar
        learn.fit_one_cycle(args.epochs)
    fit_s = time.perf_counter() - started
    names = list(learn.recorder.metric_names[1:-1])  # without 'epoch' and 'time'
    last = dict(zip(names, learn.recorder.values[-1]))
    print(json.dumps({
        "framework": "fastai", "version": fastai.__version__, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "device": str(dls.device), "workers": args.workers,
        "img_s": statistics.median(timer.rates), "img_s_epochs": timer.rates,
        "train_s": sum(timer.seconds), "fit_s": fit_s, "top1": float(last["accuracy"]),
        "train_images": len(dls.train_ds), "val_images": len(dls.valid_ds), "trainable_params": trainable,
    }), flush=True)


if __name__ == "__main__":
    sys.exit(main())
