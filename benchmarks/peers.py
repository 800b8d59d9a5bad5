"""Peer benchmark (issue 19): the pipeline against fastai on the quickstart's ImageFolder, same settings, one run.

    python benchmarks/peers.py                      # with the project's venv, from the repository root
    python benchmarks/peers.py --repeats 3 --epochs-64 10 --settings full64 frozen64

For each setting, fastai (benchmarks/peers_fastai.py, run by a separate venv's python: fastai is no project
dependency) and the pipeline (`pipeline run tasks/quickstart.yaml` as a subprocess) train resnet18 from random init on
data/shapes/classification (train/ and val/ folders: both train on the same 1200 images and score the same 300), batch
32, the same epochs, the same number of loader workers (the pipeline's data.num_workers=auto). They run in turns,
fastai first in one setting or repeat and the pipeline first in the next, so a load change on the machine hits both.

Settings:
  full64    64 px, the whole network trains. fastai: vision_learner(pretrained=False) + fit_one_cycle, its defaults,
            a random horizontal flip per image (--fastai-aug). pipeline: the quickstart task as it is (its shift and
            flip augmentation, AdamW + cosine, precision auto), warmup scaled to the epochs (3 of 20 as the task file).
  full224   the same at 224 px (the 64 px images resized up, as by both frameworks' Resize).
  frozen64  64 px, frozen backbone. fastai: learn.freeze() (its body's BatchNorm still trains, fastai's default),
            Resize only. pipeline: finetune.freeze=all with cached features, as configs/finetune/linear_probe.yaml
            (bn frozen, cache_features, Resize-only train transforms).

Training img/s: the pipeline's train/throughput (training steps of an epoch, loading included; median over epochs,
read back from the run's MLflow store); fastai's training phase of each epoch timed the same way (median over epochs).
With cached features the pipeline's number is "effective": all training images of all epochs over the caching time
(train and val features) plus the epochs' training time; its head-only rate is printed in the JSON. Top-1: val top-1
of the last epoch for both. Results: a table, one JSON line per measurement (--json FILE keeps them all).

The fastai venv (--venv, default .venv-peers, git-ignored) is created on first use: the same torch and torchvision
builds as this venv, fastai without spaCy (fastai.text's dependency; fastai.vision does not import it), nothing
installed into the project's venv (about 2 minutes, ~6 GB with a CUDA build of torch). Thread counts are not set
here: every child inherits the environment (OMP_NUM_THREADS and the like), and both use all the threads it allows.

Time with the defaults (full64 5 epochs, full224 1 epoch, frozen64 3 epochs, one repeat) on 2 idle cores: about
8-10 minutes, most of it fastai at 224 px. One epoch at 224 px measures speed only: its top-1 is near chance for both.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNNER = REPO / "benchmarks" / "peers_fastai.py"
DATA = Path("data/shapes/classification")  # the quickstart's data.root, relative to the repository root
TASK = "tasks/quickstart.yaml"
FASTAI_VERSION = "2.8.12"
# What `from fastai.vision.all import *` needs (fastai's own requirements without spacy, which only fastai.text uses).
FASTAI_DEPS = ["fastcore>=2.2.22", "fastdownload>=0.0.8,<2", "fastprogress>=0.2.4", "fasttransform>=0.0.3",
               "plum-dispatch<2.10", "matplotlib", "pandas", "requests", "pyyaml", "pillow>=9.0.0", "scikit-learn",
               "scipy", "packaging", "cloudpickle"]
SETTINGS = {
    # name: (image size, frozen backbone, training img/s target as a multiple of fastai's)
    "full64": (64, False, 2.0),
    "full224": (224, False, 2.0),
    "frozen64": (64, True, 2.5),
}
TOP1_SLACK = 0.02  # the pipeline's top-1 may be at most this much below fastai's
QUICKSTART_WARMUP = (3, 20)  # tasks/quickstart.yaml: 3 warmup epochs of 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--epochs-64", type=int, default=5, help="epochs of full64 (default 5)")
    parser.add_argument("--epochs-224", type=int, default=1, help="epochs of full224 (default 1)")
    parser.add_argument("--epochs-frozen", type=int, default=3, help="epochs of frozen64 (default 3)")
    parser.add_argument("--repeats", type=int, default=1, help="measurements of each framework per setting")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--venv", type=Path, default=REPO / ".venv-peers", help="the fastai venv (created if missing)")
    parser.add_argument("--fastai-version", default=FASTAI_VERSION)
    parser.add_argument("--fastai-aug", choices=("none", "flip", "aug_transforms"), default="flip",
                        help="fastai's augmentation in the full settings (frozen: none, as the cached features)")
    parser.add_argument("--pipeline-override", action="append", default=[], metavar="KEY=VALUE",
                        help="one more `pipeline run` override, after the benchmark's own (repeatable)")
    parser.add_argument("--data", type=Path, default=DATA,
                        help=f"an ImageFolder with train/ and val/ (default {DATA}, generated when missing)")
    parser.add_argument("--json", type=Path, help="also write every measurement here, one JSON object a line")
    parser.add_argument("--keep", type=Path, help="keep the pipeline runs' MLflow stores and checkpoints here")
    args = parser.parse_args()
    for name in ("venv", "json", "keep"):  # as given from where it was started; the runs start in the repository
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    if args.data != DATA:
        args.data = args.data.resolve()
    os.chdir(REPO)

    import torch
    import torchvision

    from pipeline.data import loading
    from pipeline.platform import devices

    python = ensure_venv(args.venv, torch.__version__, torchvision.__version__, args.fastai_version)
    ensure_data(args.data)
    device = devices.resolve_device("auto")
    workers = loading.auto_workers(device)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads"
          f"{'' if 'OMP_NUM_THREADS' not in os.environ else ' (OMP_NUM_THREADS=' + os.environ['OMP_NUM_THREADS'] + ')'}"
          f"; device {device}; pipeline precision auto = {devices.resolve_precision('auto', device)}; "
          f"loader workers {workers} (both); batch {args.batch_size}; fastai {args.fastai_version}", flush=True)

    epochs = {"full64": args.epochs_64, "full224": args.epochs_224, "frozen64": args.epochs_frozen}
    scratch = Path(tempfile.mkdtemp(prefix="peers-")) if args.keep is None else args.keep
    results: list[dict] = []
    sink = args.json.open("a") if args.json else None
    for i, name in enumerate(args.settings):
        for r in range(args.repeats):
            order = ["fastai", "pipeline"] if (i + r) % 2 == 0 else ["pipeline", "fastai"]
            for framework in order:
                run = (run_fastai if framework == "fastai" else run_pipeline)(
                    python=python, setting=name, epochs=epochs[name], repeat=r, workers=workers, args=args,
                    scratch=scratch)
                run.update(setting=name, repeat=r, epochs=epochs[name])
                results.append(run)
                line = json.dumps(run)
                print(line, flush=True)
                if sink:
                    sink.write(line + "\n")
                    sink.flush()
    if sink:
        sink.close()
    print_table(results, args.settings, epochs)
    if args.keep is None:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# the fastai venv and the data


def ensure_venv(venv: Path, torch_version: str, torchvision_version: str, fastai_version: str) -> Path:
    """The venv's python, after creating the venv when missing: this venv's torch and torchvision builds, fastai."""
    python = venv / "bin" / "python"
    ready = venv / ".peers-ready"
    want = {"torch": torch_version, "torchvision": torchvision_version, "fastai": fastai_version}
    if ready.is_file() and json.loads(ready.read_text()) == want:
        return python
    say = lambda text: print(f"[peers venv] {text}", flush=True)  # noqa: E731
    started = time.perf_counter()
    if not python.exists():
        say(f"creating {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    # The public versions (2.14.1, not 2.14.1+cu130): pip's own constraints may cap them without a local label.
    pins = [f"torch=={torch_version.split('+')[0]}", f"torchvision=={torchvision_version.split('+')[0]}"]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
        constraints.write("\n".join(pins) + "\n")  # fastai's dependencies must not move torch
    try:
        say(f"installing {' '.join(pins)} (this venv has {torch_version}, {torchvision_version})")
        subprocess.run([*pip, *pins], check=True)
        say(f"installing fastai {fastai_version} without spaCy (only fastai.text needs it)")
        subprocess.run([*pip, "--no-deps", f"fastai=={fastai_version}"], check=True)
        subprocess.run([*pip, "-c", constraints.name, *FASTAI_DEPS], check=True)
    finally:
        os.unlink(constraints.name)
    check = ("import sys, torch, torchvision, fastai; from fastai.vision.all import vision_learner; "
             "print(torch.__version__, torchvision.__version__, fastai.__version__)")
    got = subprocess.run([str(python), "-c", check], check=True, capture_output=True, text=True).stdout.split()
    if got[2] != fastai_version or [v.split("+")[0] for v in got[:2]] != [p.split("==")[1] for p in pins]:
        sys.exit(f"error: {venv} has torch/torchvision/fastai {' '.join(got)}, not {' '.join(want.values())}; "
                 f"delete it and run again")
    if got[:2] != [torch_version, torchvision_version]:
        say(f"warning: torch {got[0]} / torchvision {got[1]} there, another build than this venv's "
            f"{torch_version} / {torchvision_version}")
    ready.write_text(json.dumps(want))
    say(f"ready in {time.perf_counter() - started:.0f}s: {python}")
    return python


def ensure_data(root: Path) -> None:
    """The quickstart's shapes ImageFolder, generated as the quickstart would when missing; any root checked to have
    train/ and val/ with the same classes (both frameworks then train and score the same images)."""
    from pipeline.data import shapes

    if root == DATA:
        shapes.ensure(DATA.parent, DATA.name, seed=0)
    classes = {split: sorted(p.name for p in (root / split).iterdir() if p.is_dir()) if (root / split).is_dir()
               else [] for split in ("train", "val")}
    if not classes["train"] or classes["train"] != classes["val"]:
        sys.exit(f"error: {root} needs train/<class>/ and val/<class>/ folders with the same classes (train: "
                 f"{classes['train']}, val: {classes['val']}); the quickstart's data: delete it and run again")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return "unknown"


# ---------------------------------------------------------------------------------------------------------------------
# one measurement of each framework


def run_fastai(*, python: Path, setting: str, epochs: int, repeat: int, workers: int, args, scratch: Path) -> dict:
    size, frozen, _ = SETTINGS[setting]
    cmd = [str(python), str(RUNNER), "--data", str(args.data), "--size", str(size), "--bs", str(args.batch_size),
           "--epochs", str(epochs), "--workers", str(workers), "--seed", str(repeat),
           "--aug", "none" if frozen else args.fastai_aug, *(["--freeze"] if frozen else [])]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        fail("fastai", cmd, proc)
    out = json.loads(lines[-1])
    return {"framework": "fastai", "img_s": out["img_s"], "top1": out["top1"], "wall_s": wall, "detail": out}


def run_pipeline(*, python: Path, setting: str, epochs: int, repeat: int, workers: int, args, scratch: Path) -> dict:
    del python, workers  # the pipeline runs in this venv and picks its workers itself (data.num_workers auto)
    size, frozen, _ = SETTINGS[setting]
    where = scratch / f"{setting}-{repeat}"
    where.mkdir(parents=True, exist_ok=True)
    store = where / "mlflow.db"
    store.unlink(missing_ok=True)
    warmup = QUICKSTART_WARMUP[0] * epochs / QUICKSTART_WARMUP[1]
    overrides = [
        "model.backbone.weights=none", f"data.root={args.data}", f"data.image_size={size}",
        f"data.batch_size={args.batch_size}",
        f"train.epochs={epochs}", f"train.warmup_epochs={warmup:g}", f"seed={repeat}",
        f"tracking.uri=sqlite:///{store}", f"train.output_dir={where / 'out'}",
        "tracking.log_model=false", "tracking.log_checkpoint=false",
    ]
    if frozen:  # configs/finetune/linear_probe.yaml at this size
        overrides += ["finetune.freeze=all", "finetune.bn=frozen", "finetune.cache_features=true",
                      f"data.train_transforms=[{{name: Resize, height: {size}, width: {size}}}]"]
    cmd = [sys.executable, "-m", "pipeline", "run", TASK, *overrides, *args.pipeline_override]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        fail("pipeline", cmd, proc)
    with sqlite3.connect(store) as db:
        rows = db.execute("SELECT key, step, value FROM metrics WHERE key IN "
                          "('train/throughput', 'epoch_time', 'val/top1')").fetchall()
    series: dict[str, dict[int, float]] = {}
    for key, step, value in rows:
        series.setdefault(key, {})[step] = value
    rates = [series["train/throughput"][e] for e in sorted(series["train/throughput"])]
    times = [series["epoch_time"][e] for e in sorted(series["epoch_time"])]
    top1 = series["val/top1"][max(series["val/top1"])]
    images = sum(r * t for r, t in zip(rates, times))
    cached = re.search(r"cached backbone features of (\d+) train / (\d+) val images in ([\d.]+)s", proc.stdout)
    detail = {"img_s_epochs": rates, "train_s": sum(times), "cmd": shlex.join(cmd[2:])}
    img_s = statistics.median(rates)
    if cached:  # effective: the caching pass counts as training time
        detail.update(cache_s=float(cached.group(3)), head_img_s=img_s)
        img_s = images / (float(cached.group(3)) + sum(times))
    precision = re.search(r"training \S+ on \S+ \((\w+)", proc.stdout)
    detail["precision"] = precision.group(1) if precision else "?"
    return {"framework": "pipeline", "img_s": img_s, "top1": top1, "wall_s": wall, "detail": detail}


def fail(framework: str, cmd: list[str], proc: subprocess.CompletedProcess) -> None:
    tail = "\n".join((proc.stdout + proc.stderr).rstrip().splitlines()[-25:])
    sys.exit(f"error: the {framework} run failed (exit {proc.returncode}): {shlex.join(cmd)}\n{tail}")


# ---------------------------------------------------------------------------------------------------------------------
# the table


def print_table(results: list[dict], settings: list[str], epochs: dict[str, int]) -> None:
    print()
    header = (f"{'setting':<10}{'epochs':>7}{'fastai img/s':>14}{'pipeline img/s':>16}{'ratio':>7}{'target':>8}"
              f"{'fastai top1':>13}{'pipeline top1':>15}{'wall s (f/p)':>15}  targets met")
    print(header)
    print("-" * len(header))
    for name in settings:
        got = {f: [r for r in results if r["setting"] == name and r["framework"] == f] for f in ("fastai", "pipeline")}
        if not got["fastai"] or not got["pipeline"]:
            continue
        med = {f: {k: statistics.median(r[k] for r in runs) for k in ("img_s", "top1", "wall_s")}
               for f, runs in got.items()}
        target = SETTINGS[name][2]
        ratio = med["pipeline"]["img_s"] / med["fastai"]["img_s"]
        speed_ok = ratio >= target
        top1_ok = med["pipeline"]["top1"] >= med["fastai"]["top1"] - TOP1_SLACK
        met = "yes" if speed_ok and top1_ok else \
            "no (" + ", ".join(w for w, ok in (("img/s", speed_ok), ("top-1", top1_ok)) if not ok) + ")"
        print(f"{name:<10}{epochs[name]:>7}{med['fastai']['img_s']:>14.1f}{med['pipeline']['img_s']:>16.1f}"
              f"{ratio:>6.2f}x{target:>7.1f}x{med['fastai']['top1']:>13.3f}{med['pipeline']['top1']:>15.3f}"
              f"{med['fastai']['wall_s']:>8.0f}/{med['pipeline']['wall_s']:<6.0f}  {met}")
    print(f"medians over {max((r['repeat'] for r in results), default=0) + 1} repeat(s); targets: pipeline img/s >= "
          f"target x fastai's, top-1 >= fastai's - {TOP1_SLACK}. frozen64 pipeline img/s includes its feature caching."
          " Top-1 after a few epochs from random init is noisy: compare it at the epochs you care about.")


if __name__ == "__main__":
    main()
