"""Imbalanced, small data: data.balance, the range test's lr, EMA and mixup, measured on data nobody here generated.

    pip install -e '.[bench]'    # scikit-learn, whose digits are the data
    OMP_NUM_THREADS=1 python benchmarks/small_data.py [--epochs 15] [--seeds 3] [--tables 1,2,3] [--out DIR]

scikit-learn's handwritten digits (8x8 scans, 1,797 images) are written as an ImageFolder of 32 px PNGs: 120 training
images of digit 0 down to 4 of digit 9 (120, 82, 56, 39, 26, 18, 12, 9, 6, 4: 30x between the largest class and the
smallest) and a balanced validation set of 50 per digit. Every run is tasks/quickstart.yaml on that folder, its own
lr, schedule and augmentation but the flip (a mirrored 2 is no digit), resnet18 from random init (no weights can be
downloaded here), one thread, `--epochs` epochs; the scores are the best checkpoint's. The tables:

1. data.balance none / sampler / loss, over `--seeds` seeds: balanced accuracy (val/mean_class_acc), top-1 (the same
   number on a balanced validation set), and the recall of the three rarest digits;
2. the range test's suggestion (train.lr=auto) against the task file's own lr (2e-3), on the digits (data.balance:
   sampler) and on the quickstart's own shapes (32 px, `--quick-epochs` epochs);
3. train.ema=0.99 and train.mixup=0.2 on and off (and cutmix 1.0), on the digits with data.balance: sampler.

Runs go to a throwaway MLflow store under `--out` (default: a temporary folder). A row is the mean over seeds, with
the spread (max - min) beside it. About half an hour on one core of a 2-core CPU with the defaults.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.data import shapes  # noqa: E402
from pipeline.train import runner  # noqa: E402

COUNTS = (120, 82, 56, 39, 26, 18, 12, 9, 6, 4)  # training images of digit 0 .. 9
VAL = 50
RARE = ("7", "8", "9")  # the three smallest classes
# the quickstart's augmentation without its flip
NO_FLIP = ("data.train_transforms=[{name: Resize, height: '${data.image_size}', width: '${data.image_size}'}, "
           "{name: Affine, translate_percent: {x: [-0.094, 0.094], y: [-0.094, 0.094]}, interpolation: 0, "
           "border_mode: 4, p: 1.0}]")


def write_digits(root: Path, size: int = 32) -> Path:
    """The imbalanced digits ImageFolder (train/<digit>/, val/<digit>/), written once."""
    from sklearn.datasets import load_digits

    if (root / "val" / "9").is_dir():
        return root
    digits = load_digits()
    rng = np.random.default_rng(0)
    for digit, n in enumerate(COUNTS):
        order = rng.permutation(np.flatnonzero(digits.target == digit))
        for split, chosen in (("train", order[:n]), ("val", order[n:n + VAL])):
            folder = root / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
                Image.fromarray(pixels).resize((size, size), Image.BILINEAR).convert("RGB").save(folder / f"{i}.png")
    return root


class Bench:
    def __init__(self, out: Path, epochs: int) -> None:
        self.out, self.epochs, self.done = out, epochs, 0
        self.common = ("model.backbone.weights=none", "data.image_size=32", "train.threads=1", "data.num_workers=0",
                       "tracking.log_model=false", "tracking.log_checkpoint=false", "tracking.system_metrics_every=0",
                       "train.keep_checkpoints=best", f"tracking.uri=sqlite:///{out / 'mlflow.db'}")

    def run(self, label: str, *overrides: str) -> dict:
        folder = self.out / "runs" / f"{self.done:02d}"
        started = time.perf_counter()
        result = runner.run("quickstart", (*self.common, f"train.output_dir={folder}", *overrides))
        self.done += 1
        lr = float(runner.checkpoint.load(folder / runner.checkpoint.BEST)["config"]["train"]["lr"])
        row = {"label": label, "top1": result.metrics["val/top1"], "balanced": result.metrics["val/mean_class_acc"],
               "rare": statistics.mean(result.metrics[f"val/acc/{c}"] for c in RARE) if "val/acc/9" in result.metrics
               else float("nan"), "lr": lr, "seconds": time.perf_counter() - started}
        print(f"[{self.done}] {label}: top-1 {row['top1']:.3f}, balanced {row['balanced']:.3f}, lr {lr:.2e} "
              f"({row['seconds']:.0f}s)", file=sys.stderr, flush=True)
        return row


def spread(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows]
    return f"{statistics.mean(values):.3f} ({max(values) - min(values):.3f})" if len(values) > 1 else f"{values[0]:.3f}"


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    lines = [f"| {' | '.join(header)} |", f"| {' | '.join('---' for _ in header)} |"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    return f"\n{title}\n\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick-epochs", type=int, default=10, help="epochs of the quickstart rows of table 2")
    parser.add_argument("--tables", default="1,2,3", help="which tables to measure and print, e.g. 2")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    tables = set(args.tables.split(","))
    out = args.out or Path(tempfile.mkdtemp(prefix="small-data-"))
    out.mkdir(parents=True, exist_ok=True)
    digits = f"data.root={write_digits(out / 'digits')}"
    bench = Bench(out, args.epochs)
    on_digits = (digits, NO_FLIP, f"train.epochs={args.epochs}")
    seeds = range(args.seeds)

    balance = {b: [bench.run(f"balance={b} seed={s}", *on_digits, f"data.balance={b}", f"seed={s}") for s in seeds]
               for b in (("none", "sampler", "loss") if "1" in tables else ("sampler",))}
    sampler = (*on_digits, "data.balance=sampler")
    lr_rows, small = {}, {}
    if "2" in tables:
        lr_rows = {"digits, train.lr 2e-3 (the task file's)": balance["sampler"],
                   "digits, train.lr=auto": [bench.run(f"digits auto seed={s}", *sampler, "train.lr=auto",
                                                       f"seed={s}") for s in seeds]}
        shapes.ensure(out / "shapes", "classification", seed=0)
        quick = (f"data.root={out / 'shapes' / 'classification'}", f"train.epochs={args.quick_epochs}")
        lr_rows["quickstart shapes, train.lr 2e-3 (the task file's)"] = [bench.run("shapes own lr", *quick)]
        lr_rows["quickstart shapes, train.lr=auto"] = [bench.run("shapes auto", *quick, "train.lr=auto")]
    if "3" in tables:
        small = {"neither (data.balance=sampler)": balance["sampler"]}
        for label, extra in (("train.ema=0.99", ("train.ema=0.99",)), ("train.mixup=0.2", ("train.mixup=0.2",)),
                             ("train.ema=0.99 + train.mixup=0.2", ("train.ema=0.99", "train.mixup=0.2")),
                             ("train.cutmix=1.0", ("train.cutmix=1.0",))):
            small[label] = [bench.run(f"{label} seed={s}", *sampler, *extra, f"seed={s}") for s in seeds]

    n = f"mean ({'spread' if args.seeds > 1 else 'one run'}) over {args.seeds} seed{'s' * (args.seeds > 1)}"
    print(f"digits: {sum(COUNTS)} training images ({', '.join(map(str, COUNTS))} of digits 0..9), {10 * VAL} balanced "
          f"validation images; resnet18 from random init, 32 px, {args.epochs} epochs; {n}")
    if "1" in tables:
        print(table("1. data.balance on the imbalanced digits", ["data.balance", "balanced accuracy", "top-1",
                                                                 "recall of digits 7, 8, 9"],
                    [[b, spread(r, "balanced"), spread(r, "top1"), spread(r, "rare")] for b, r in balance.items()]))
    if lr_rows:
        print(table("2. the range test's lr against the task file's own", ["data, lr", "lr used", "top-1",
                                                                         "balanced accuracy"],
                    [[k, ", ".join(sorted({f"{r['lr']:.2e}" for r in rows})), spread(rows, "top1"),
                      spread(rows, "balanced")] for k, rows in lr_rows.items()]))
    if small:
        print(table("3. EMA and mixup on the digits (data.balance=sampler)", ["regulariser", "balanced accuracy",
                                                                              "recall of digits 7, 8, 9"],
                    [[k, spread(r, "balanced"), spread(r, "rare")] for k, r in small.items()]))
    (out / "results.json").write_text(json.dumps({"balance": balance, "lr": lr_rows, "small": small}, indent=1))
    print(f"\nruns and results.json in {out}")


if __name__ == "__main__":
    main()
