"""Mutation check: deliberate one-line bugs, one at a time, each in a copy of the package, and the tests that guard
against it. A mutant is killed when its tests fail; one that survives names a promise no test holds.

    python tests/mutations.py                 # every mutant (about ten minutes on two cores)
    python tests/mutations.py --only "fold leak" --only "ignore pixels counted"
    python tests/mutations.py --list

The repository is copied once into a temporary folder (pipeline/, tests/, tasks/, configs/, pyproject.toml); each
mutant edits its line there, runs its tests there (PYTHONPATH puts the copy's package first), and the line is put back
before the next. The working tree is never written to, and the copy is removed on any exit (Ctrl-C and SIGTERM too).
First each mutant's tests run once unmutated: a failure there would make every mutant look killed, so it stops the
check. Prints a table (mutant, tests run, killed or survived) and exits 0 only when every mutant is killed.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COPIED = ("pipeline", "tests", "tasks", "configs", "pyproject.toml")


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository
    line: str  # the exact text of the line (stripped), found once in the file
    bug: str  # what replaces it (same indentation)
    tests: tuple[str, ...]  # pytest arguments that select the guarding tests


FACE = "tests/tasks/test_face_verification.py"
DETECTION_E2E = "tests/tasks/test_detection_coco_e2e.py"
SEGMENTATION = "tests/tasks/test_segmentation_metrics.py"
FINETUNE = "tests/test_finetune.py"

MUTANTS = (
    Mutant("fold leak: threshold chosen with the test fold", "pipeline/tasks/face/verification.py",
           "train = np.setdiff1d(np.arange(len(scores)), test)", "train = np.arange(len(scores))", (FACE,)),
    Mutant("x/y scale swap mapping boxes back (evaluation)", "pipeline/tasks/detection/evaluate.py",
           'sx, sy = target["scale"].tolist()', 'sy, sx = target["scale"].tolist()', (DETECTION_E2E,)),
    Mutant("x/y scale swap mapping boxes back (predict, serving)", "pipeline/tasks/detection/predictions.py",
           "sx, sy = place.scale", "sy, sx = place.scale", (DETECTION_E2E,)),
    Mutant("absent classes counted in mIoU (as 0)", "pipeline/tasks/segmentation/metrics.py",
           'return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))',
           "return tp / union.clamp(min=1)", (SEGMENTATION,)),
    Mutant("ignore pixels counted (as background)", "pipeline/tasks/segmentation/metrics.py",
           "pred = logits.argmax(1)",
           "pred, masks = logits.argmax(1), masks.masked_fill(masks == self.ignore_index, 0)", (SEGMENTATION,)),
    Mutant("served images mirrored", "pipeline/use/serve.py",
           "return decode_rgb(data)", "return np.ascontiguousarray(decode_rgb(data)[:, ::-1])",
           ("tests/test_serve.py", "-k", "in_process_answers and classification")),
    Mutant("optimizer state dropped on resume", "pipeline/train/builders.py",
           'fit.optimizer.load_state_dict(last["optimizer"])',
           "fit.optimizer.load_state_dict(fit.optimizer.state_dict())",
           ("tests/test_resume.py", "-k", "resumes_exactly")),
    Mutant("per-stage lr multipliers ignored", "pipeline/train/finetune.py",
           "lr = base_lr * plan.lr_mult[name]", "lr = base_lr", (FINETUNE,)),
    Mutant("a frozen stage left trainable", "pipeline/train/finetune.py",
           "p.requires_grad_(name not in frozen)", "p.requires_grad_(True)", (FINETUNE,)),
    Mutant("category ids shifted by one (predictions)", "pipeline/tasks/detection/evaluate.py",
           'self.results.append({"image_id": image_id, "category_id": self.category_ids[label - 1],',
           'self.results.append({"image_id": image_id, "category_id": self.category_ids[label - 2],',
           (DETECTION_E2E,)),
    Mutant("category ids shifted by one (labels read from the file)", "pipeline/tasks/detection/data.py",
           "label_of = {cid: i + 1 for i, cid in enumerate(category_ids)}",
           "label_of = {cid: i for i, cid in enumerate(category_ids)}", (DETECTION_E2E,)),
    Mutant("crowd regions scored as objects", "pipeline/tasks/detection/evaluate.py",
           '"area": area, "iscrowd": int(crowd)})', '"area": area, "iscrowd": 0})', (DETECTION_E2E,)),
)


def copy_repo(into: Path) -> Path:
    work = into / "repo"
    work.mkdir()
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            # relative symlinks (pipeline/config/task_files -> tasks/) keep pointing inside the copy
            shutil.copytree(source, work / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, work / name)
    return work


def mutate(text: str, mutant: Mutant) -> str:
    """The file's text with the mutant's line replaced (its indentation kept); the line must occur exactly once."""
    lines = text.splitlines(keepends=True)
    found = [i for i, line in enumerate(lines) if line.strip() == mutant.line]
    if len(found) != 1:
        raise SystemExit(f"mutant '{mutant.name}': expected the line once in {mutant.file}, found it {len(found)} "
                         f"times: {mutant.line}")
    i = found[0]
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    lines[i] = indent + mutant.bug + "\n"
    return "".join(lines)


def run_tests(work: Path, args: tuple[str, ...], stop_at_first: bool) -> tuple[int, str, str]:
    """pytest on the copy: its exit code, its summary line and the first test that failed."""
    env = {**os.environ, "PYTHONPATH": str(work) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "-m", "not slow",
               *(("-x",) if stop_at_first else ()), *args]
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    lines = done.stdout.splitlines()
    summary = [line for line in lines if re.search(r"\d+ (passed|failed|errors?)\b", line)]
    failures = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
    first = failures[0].split(" - ")[0].split("::")[-1] if failures else ""
    return done.returncode, (re.sub(r" in [\d.]+s.*", "", summary[-1].strip("= ")) if summary
                             else (done.stdout[-300:] + done.stderr[-300:]).strip()), first


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], help="a mutant's name (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests")
    options = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not options.only or m.name in options.only]
    if options.only and len(chosen) != len(set(options.only)):
        unknown = sorted(set(options.only) - {m.name for m in MUTANTS})
        raise SystemExit(f"unknown mutant(s): {', '.join(unknown)}; --list names them")
    if options.list:
        for m in chosen:
            print(f"{m.name}\n    {m.file}: {m.line}\n    -> {m.bug}\n    tests: {' '.join(m.tests)}")
        return 0
    scratch = Path(tempfile.mkdtemp(prefix="pipeline-mutations-"))
    # SIGTERM (a CI job cancelled, a timeout) unwinds like Ctrl-C, through the `finally` that removes the copy
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        work = copy_repo(scratch)
        for tests in dict.fromkeys(m.tests for m in chosen):  # each selection once, as its mutants run it
            started = time.monotonic()
            code, summary, first = run_tests(work, tests, stop_at_first=False)
            print(f"unmutated {' '.join(tests)}: {summary} ({time.monotonic() - started:.0f}s)", flush=True)
            if code != 0:
                print(f"the guarding tests fail without any mutant ({first}): fix that first", file=sys.stderr)
                return 2
        rows = []
        for m in chosen:
            target = work / m.file
            original = target.read_text()
            target.write_text(mutate(original, m))
            started = time.monotonic()
            try:
                code, summary, first = run_tests(work, m.tests, stop_at_first=True)
            finally:
                target.write_text(original)
            outcome = {0: "SURVIVED", 1: "killed"}.get(code, f"error (pytest exit {code})")
            took = f"{time.monotonic() - started:.0f}s"
            rows.append((m.name, " ".join(m.tests), f"{summary}: {first}" if first else summary, took, outcome))
            print(f"{outcome:8} {m.name}: {summary} {first} ({took})", flush=True)
        print(table(rows))
        return 0 if all(row[-1] == "killed" for row in rows) else 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def table(rows: list[tuple[str, ...]]) -> str:
    header = ("mutant", "tests run", "what failed first", "time", "result")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "-|-".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
