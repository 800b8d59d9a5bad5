"""Training steps with glibc's default malloc against the pipeline's `allocator.keep_freed_memory()`.

    python benchmarks/allocator.py [tasks/quickstart.yaml] [--steps 20] [--rounds 3]

An allocator setting holds for a whole process, so each measurement is a child process, run in turns (default, kept,
kept, default, ...): the same model, size and batch, fp32 and the task's auto precision, on fixed batches. Besides
img/s it counts the page faults per step (memory handed back to the kernel and faulted in again) and the time the
kernel spent per step (summed over threads).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

MODES = ("glibc default", "kept")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task_file", nargs="?", default="tasks/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.task_file, args.steps)))
        return
    taken = {mode: [] for mode in MODES}
    for r in range(args.rounds):
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            # Any MALLOC_* variable leaves glibc as it is; MALLOC_PERTURB_=0 is glibc's default and changes nothing.
            env = {**os.environ, "MALLOC_PERTURB_": "0"} if mode == "glibc default" else os.environ
            command = [sys.executable, __file__, args.task_file, "--child", mode, "--steps", str(args.steps)]
            out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
            taken[mode].append(json.loads(out.strip().splitlines()[-1]))
    if not all(run["kept"] for run in taken["kept"]):
        print("note: the 'kept' runs could not keep freed memory (not glibc, or MALLOC_* / LD_PRELOAD set here)")
    precisions = list(taken[MODES[0]][0]["rates"])
    med = {(m, p, k): statistics.median(run[k][p] for run in taken[m]) for m in MODES for p in precisions
           for k in ("rates", "faults", "kernel")}
    print(f"{args.task_file}: {taken[MODES[0]][0]['model']}, {args.steps} steps x {args.rounds} rounds per mode, "
          f"median of rounds")
    print(f"{'':<11}{'glibc default':>38}{'kept':>38}")
    print(f"{'precision':<11}" + f"{'img/s':>10}{'faults/step':>13}{'kernel ms/step':>15}" * 2 + f"{'x':>7}")
    for p in precisions:
        cells = "".join(f"{med[(m, p, 'rates')]:>10.1f}{med[(m, p, 'faults')]:>13.0f}{med[(m, p, 'kernel')]:>15.1f}"
                        for m in MODES)
        print(f"{p:<11}{cells}{med[(MODES[1], p, 'rates')] / med[(MODES[0], p, 'rates')]:>7.2f}")
    speedups = ", ".join(f"{p} {med[(MODES[1], p, 'rates')] / med[(MODES[0], p, 'rates')]:.2f}x" for p in precisions)
    print(f"summary: keeping freed memory trains {speedups} as fast as glibc's default")


def child(task_file: str, steps: int) -> dict:
    import resource

    import _common as C  # keeps freed memory on import, unless a MALLOC_* variable is set

    from pipeline.platform import allocator, devices
    from pipeline.train import engine

    cfg, task, train_ds, _, info = C.load_task(task_file)
    device = devices.resolve_device(cfg.train.device)
    tensors = C.first_batches(train_ds, cfg.data.batch_size, 4, task)
    rates, faults, kernel = {}, {}, {}
    for precision in dict.fromkeys(["fp32", devices.resolve_precision("auto", device)]):
        s = engine.StepSettings(device=device, precision=precision, channels_last=cfg.train.channels_last)
        model, optimizer = C.build_model(cfg, task, info, None, device, cfg.train.channels_last)
        C.bare_rate(model, task.loss, optimizer, tensors, 3, s)  # warm-up: first steps allocate for good
        before = resource.getrusage(resource.RUSAGE_SELF)
        rates[precision] = C.bare_rate(model, task.loss, optimizer, tensors, steps, s)
        after = resource.getrusage(resource.RUSAGE_SELF)
        faults[precision] = (after.ru_minflt - before.ru_minflt) / steps
        kernel[precision] = (after.ru_stime - before.ru_stime) / steps * 1000
        del model, optimizer
    model = f"{cfg.model.backbone.name}, {cfg.data.image_size} px, batch {cfg.data.batch_size}"
    return {"rates": rates, "faults": faults, "kernel": kernel, "model": model, "kept": allocator.keep_freed_memory()}


if __name__ == "__main__":
    main()
