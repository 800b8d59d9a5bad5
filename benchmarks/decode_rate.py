"""How many training images one CPU core can decode and augment at 224 px, and what GPU throughput that feeds.

    python benchmarks/decode_rate.py [--images 256] [--cores 16] [--gpu-rate 3000]

A JPEG ImageFolder of ImageNet-like files (about 500 x 375, quality 90, cut and scaled from the photo matplotlib
ships) goes through the pipeline's own classification dataset with the ImageNet recipe (configs/data/imagenet_224.yaml:
RandomResizedCrop 224, flip, colour jitter, normalise, to tensor), in this process with one thread, cache off (every
epoch decodes again, as on ImageNet-sized data). Printed: img/s per core for decode alone and for decode + augment,
then how many cores a GPU training at `--gpu-rate` img/s needs, and what `--cores` cores can feed.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib import cbook  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline import config  # noqa: E402
from pipeline.data.images import read_rgb  # noqa: E402
from pipeline.tasks import registry  # noqa: E402

TASK = """task: classification
defaults: [data/imagenet_224]
data: {{root: {root}, format: imagefolder, cache_mb: 0, num_workers: 0}}
model: {{backbone: {{name: resnet50, weights: none}}}}
"""


def make_folder(root: Path, images: int, seed: int = 0) -> None:
    """`images` JPEGs in two classes, each a random crop of the sample photo scaled to about 500 x 375."""
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = Image.open(f).convert("RGB")
    rng = np.random.default_rng(seed)
    for i in range(images):
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        size = (int(rng.integers(400, 600)), int(rng.integers(300, 450)))
        out = root / "train" / f"c{i % 2}" / f"{i:05d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        photo.crop((x, y, x + cw, y + ch)).resize(size, Image.BILINEAR).save(out, quality=90)
    for c in (0, 1):  # a validation split, as an ImageFolder wants
        (root / "val" / f"c{c}").mkdir(parents=True, exist_ok=True)
        (root / "val" / f"c{c}" / "v.jpg").write_bytes((root / "train" / f"c{c}" / f"{c:05d}.jpg").read_bytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--cores", type=int, default=16, help="cores of the GPU machine to feed")
    parser.add_argument("--gpu-rate", type=float, default=3000.0,
                        help="img/s the GPU trains at (resnet50, bf16, 224 px; about 3000 on an H100)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_folder(root, args.images)
        task_file = root / "decode.yaml"
        task_file.write_text(TASK.format(root=root))
        cfg = config.load(task_file, ())
        task = registry.get(cfg.task)
        data = task.build_data(cfg.data, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), seed=0)
        files = sorted((root / "train").rglob("*.jpg"))
        read_rgb(files[0])
        start = time.perf_counter()
        for path in files:
            read_rgb(path)
        decode = len(files) / (time.perf_counter() - start)
        data.train[0]
        start = time.perf_counter()
        for i in range(len(data.train)):
            data.train[i]
        full = len(data.train) / (time.perf_counter() - start)
    print(f"one core: decode {decode:.0f} img/s; decode + RandomResizedCrop 224 + flip + colour jitter + normalise "
          f"{full:.0f} img/s ({len(files)} JPEGs of about 500 x 375)")
    print(f"a GPU training at {args.gpu_rate:.0f} img/s needs {args.gpu_rate / full:.1f} such cores; "
          f"{args.cores} cores feed {full * args.cores:.0f} img/s "
          f"({min(1.0, full * args.cores / args.gpu_rate):.2f} of that GPU rate)")


if __name__ == "__main__":
    main()
