"""The `pipeline` command: parse, call one function, print. No logic lives here."""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import click

from pipeline import __version__, console
from pipeline.errors import UserError


class _Group(click.Group):
    """Errors users can cause print as one line and exit 1; `--debug` shows the traceback instead."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as err:
            self._fail(ctx, f"error: {_one_line(err)}", err)
        except KeyboardInterrupt:
            click.echo("interrupted; checkpoints stay on disk, resume with --resume", err=True)
            sys.exit(130)
        except (MemoryError, RuntimeError) as err:  # torch.OutOfMemoryError is a RuntimeError
            if isinstance(err, MemoryError) or _is_oom(err):
                self._fail(ctx, "error: out of memory; lower data.batch_size or data.image_size, or raise "
                                "train.accum_steps to keep the effective batch (checkpoints so far are kept)", err)
            raise

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Each command with its whole first sentence, wrapped: click would cut it to the terminal's width."""
        rows = [(name, command.get_short_help_str(limit=1_000)) for name, command in
                ((name, self.get_command(ctx, name)) for name in self.list_commands(ctx))
                if command is not None and not command.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    @staticmethod
    def _fail(ctx: click.Context, message: str, err: BaseException):
        if ctx.obj and ctx.obj.get("debug"):
            traceback.print_exception(err)
        click.echo(message, err=True)
        sys.exit(1)


def _is_oom(err: BaseException) -> bool:
    # CUDA: torch.OutOfMemoryError ("CUDA out of memory"); CPU: "DefaultCPUAllocator: not enough memory".
    text = str(err).lower()
    return type(err).__name__ == "OutOfMemoryError" or "out of memory" in text or "not enough memory" in text


def _one_line(err: UserError) -> str:
    # A UserError raised in a DataLoader worker comes back wrapped with the worker's traceback: keep its message.
    text = str(err)
    if "Original Traceback" in text:
        text = text.rstrip().splitlines()[-1].split("UserError: ", 1)[-1]
    return text


_Group.group_class = type  # subgroups (data, weights) list their commands the same way


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show tracebacks of errors.")
@click.version_option(__version__, "--version", prog_name="pipeline", message="%(prog)s %(version)s")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Fine-tune pretrained ResNet-family backbones and compare them in MLflow."""
    ctx.ensure_object(dict)["debug"] = debug
    console.show()
    if not sys.stderr.isatty():  # MLflow draws its own artifact bars; in a redirected log each redraw stays
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _task_file(_ctx: click.Context, _param: click.Parameter, value: Path) -> Path:
    # An existing path wins; else a built-in task name (`pipeline run quickstart`) from inside the package.
    from pipeline.config import shipped

    return shipped.find_task(value)


@main.command()
@click.argument("task_file", type=click.Path(path_type=Path), callback=_task_file)
@click.argument("overrides", nargs=-1)
@click.option("--resume", is_flag=True, help="Continue the run in train.output_dir from its last checkpoint.")
# A sweep started with --jobs or --ray runs each child as this command: nested under its parent, with its swept values.
@click.option("--parent-run-id", default=None, hidden=True)
@click.option("--tag", "tags", multiple=True, hidden=True)
def run(task_file: Path, overrides: tuple[str, ...], resume: bool, parent_run_id: str | None,
        tags: tuple[str, ...]) -> None:
    """Train TASK_FILE (a path or a built-in task name), with optional key.path=value OVERRIDES (e.g. train.lr=0.01).

    `pipeline config TASK_FILE` prints every key with its value; `pipeline tasks` lists the built-in task files.
    """
    from pipeline.train import runner

    runner.run(task_file, overrides, resume=resume, parent_run_id=parent_run_id,
               tags=dict(tag.split("=", 1) for tag in tags) or None)


@main.command("lr-find")
@click.argument("task_file", type=click.Path(path_type=Path), callback=_task_file)
@click.argument("overrides", nargs=-1)
def lr_find(task_file: Path, overrides: tuple[str, ...]) -> None:
    """Suggest a learning rate for TASK_FILE with OVERRIDES: the range test from the run's starting point, logged with
    its curve to an MLflow run of its own (settings: lr_find.*; train.lr=auto runs it before training)."""
    from pipeline.train import runner

    runner.lr_find(task_file, overrides)


@main.command("config")
@click.argument("task_file", type=click.Path(path_type=Path), callback=_task_file)
@click.argument("overrides", nargs=-1)
def show_config(task_file: Path, overrides: tuple[str, ...]) -> None:
    """Print the resolved, validated config of TASK_FILE with OVERRIDES."""
    from pipeline import config

    click.echo(config.to_yaml(config.load(task_file, overrides)), nl=False)


@main.command("tasks")
def list_tasks() -> None:
    """List the built-in task files (run one by name: pipeline run quickstart)."""
    from pipeline.config import shipped

    rows = shipped.describe()
    name_width, kind_width = (max(len(row[i]) for row in rows) for i in (0, 1))
    for name, kind, description in rows:
        click.echo(f"{name:<{name_width}}  {kind:<{kind_width}}  {description}")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--uri", default=None, help="Tracking store (default: the one the run used).")
def sync(run_dir: Path, uri: str | None) -> None:
    """Send the tracking records a run kept in RUN_DIR while its MLflow server was unreachable."""
    from pipeline import tracking

    count = tracking.sync(run_dir, uri)
    click.echo(f"sent {count} kept tracking records from {run_dir}")


@main.group()
def data() -> None:
    """Datasets."""


@data.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/shapes"), show_default=True)
@click.option("--kind", "kinds", multiple=True, help="Dataset kind(s) to write (default: all): classification, coco, "
              "faces.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset.")
def synth(out: Path, kinds: tuple[str, ...], seed: int, overwrite: bool) -> None:
    """Write the synthetic shapes datasets (ImageFolder, COCO scenes with masks, identities)."""
    from pipeline.data import shapes

    unknown = sorted(set(kinds) - set(shapes.KINDS))
    if unknown:
        raise UserError(f"--kind: unknown {', '.join(unknown)}; choose from {', '.join(shapes.KINDS)}")
    for kind in kinds or shapes.KINDS:
        click.echo(f"wrote {shapes.KINDS[kind](out, seed=seed, overwrite=overwrite)}")


@main.group()
def weights() -> None:
    """Pretrained weights."""


@weights.command()
@click.argument("names", nargs=-1, required=True)
def pull(names: tuple[str, ...]) -> None:
    """Download NAMES (resnet50, resnet50.tv_in1k, hf-hub:org/repo, ...) into the hub cache, for machines without a
    network."""
    from pipeline.models import weights as W

    for path in W.pull(list(names)):
        click.echo(f"cached {path}")


@main.command()
@click.argument("task_file", type=click.Path(path_type=Path), callback=_task_file)
@click.argument("args", nargs=-1, required=True)
@click.option("--resume", is_flag=True, help="Reopen the same sweep and skip the runs it already FINISHED.")
@click.option("--jobs", type=int, default=None, help="Run this many children at once on this machine, each on GPUs "
              "or CPU cores of its own.")
@click.option("--ray", "ray_address", default=None, help="Run the children as Ray tasks: local (a Ray instance on "
              "this machine), auto (the cluster this machine belongs to) or ray://HOST:PORT.")
def sweep(task_file: Path, args: tuple[str, ...], resume: bool, jobs: int | None, ray_address: str | None) -> None:
    """Run TASK_FILE once per combination of swept values (key=v1,v2,...) under one parent MLflow run.

    Arguments with one value (train.epochs=5) apply to every run.
    """
    if jobs is not None:  # children fork from a server that imports the pipeline meanwhile (pipeline/study/launch.py)
        from pipeline.study import launch

        launch.warm()
    from pipeline.study import sweep as sweep_runs

    sweep_runs.run(task_file, args, resume=resume, jobs=jobs, ray=ray_address)


@main.command()
@click.argument("experiment")
@click.option("--metric", "metrics", multiple=True, help="Metric to compare (default: the task's primary, e.g. "
              "val/top1). Several: comma separated (--metric train/loss_epoch,train/error,val/top1) or --metric again; "
              "a column and a <metric>_vs_depth.png each.")
@click.option("--at", default="best", show_default=True, help="Which value of each metric: best (at the best "
              "checkpoint's epoch) or last (the end of training, e.g. training error). Metrics logged per optimizer "
              "step (grad_norm/<stage>) read as the mean of the last epoch either way.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Folder for the plots and runs.csv.")
@click.option("--parent", default=None, help="The sweep with this parent run id, or any unique prefix of it (the "
              "23b984f9 of its folder sweep-23b984f9). Default: the latest sweep.")
@click.option("--all", "every", is_flag=True, help="Every finished run of EXPERIMENT, whatever sweep; the plots join "
              "runs of one sweep and epoch count only.")
@click.option("--by", default=None, help="A tag or param that labels the runs, e.g. weights.source (pretrained start "
              "vs random init): a column, and one line per value in the plots.")
@click.option("--uri", default=None, help="Tracking store (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).")
def compare(experiment: str, metrics: tuple[str, ...], at: str, out: Path | None, parent: str | None, every: bool,
            by: str | None, uri: str | None) -> None:
    """Table (and with --out, plots) of the latest sweep of EXPERIMENT (a task file's name), sorted by depth; backbone
    families (cifar_plain, cifar_resnet) are separate lines."""
    from pipeline.study import compare as compare_runs

    compare_runs.run(experiment, uri=uri, metric=metrics, out=out, parent=parent, by=by, every=every, at=at)


@main.command()
@click.argument("source")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the predictions.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--top-k", type=int, default=5, show_default=True, help="Classes per image (classification).")
@click.option("--score", type=float, default=0.5, show_default=True,
              help="Detection: draw the boxes scoring at least this (0..1); predictions.json keeps every box.")
@click.option("--gallery", type=click.Path(path_type=Path), default=None,
              help="Face: a folder of identity folders (<identity>/<image>); identities.csv names each input's.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, mps.")
@click.option("--uri", default=None, help="Tracking store of a run id, runs:/ or models:/ SOURCE.")
@click.option("--tta", is_flag=True, help="Average each image's outputs with its horizontal mirror's (classification, "
              "segmentation).")
def predict(source: str, inputs: tuple[str, ...], out: Path, batch_size: int, top_k: int, score: float,
            gallery: Path | None, device: str, uri: str | None, tta: bool) -> None:
    """Run SOURCE (a checkpoint, an MLflow run id, runs:/<id> or a models:/ URI) on INPUTS (images, folders, globs)."""
    from pipeline.use import predict as predictor

    predictor.run(source, list(inputs), out, uri=uri, batch_size=batch_size, top_k=top_k, score=score,
                  gallery=gallery, device=device, tta=tta)


@main.command()
@click.argument("source")
@click.argument("first", type=click.Path(path_type=Path))
@click.argument("second", type=click.Path(path_type=Path))
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, mps.")
@click.option("--uri", default=None, help="Tracking store of a run id, runs:/ or models:/ SOURCE.")
def verify(source: str, first: Path, second: Path, device: str, uri: str | None) -> None:
    """Say whether FIRST and SECOND show the same identity, by the face model SOURCE and its run's threshold."""
    from pipeline.use import identify

    click.echo(str(identify.verify(source, first, second, uri=uri, device=device)))


@main.command()
@click.argument("source")
# A plain string, checked by export.run: click.Choice would answer a wrong value with usage text over three lines.
@click.option("--format", "fmt", default="onnx", show_default=True, help="onnx or torchscript.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="File to write (default: <backbone>.onnx).")
@click.option("--log-to-run", is_flag=True, help="Also log the file to the source's MLflow run (artifacts: export/).")
@click.option("--uri", default=None, help="Tracking store of a run id or models:/ SOURCE.")
def export(source: str, fmt: str, out: Path | None, log_to_run: bool, uri: str | None) -> None:
    """Export SOURCE (a checkpoint, an MLflow run id or a models:/ URI) and check it against PyTorch."""
    from pipeline.use import export as exporter

    exporter.run(source, fmt, out, uri=uri, log_to_run=log_to_run)


@main.command()
@click.argument("run")
@click.option("--name", required=True, help="Registered model name (created on first use).")
@click.option("--alias", default=None, help="Point this alias (models:/NAME@ALIAS) at the new version.")
@click.option("--uri", default=None, help="Tracking store (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).")
def register(run: str, name: str, alias: str | None, uri: str | None) -> None:
    """Register RUN's logged model (RUN: a run id or runs:/<id>) as a new version of NAME in the model registry; it then
    starts other runs as model.backbone.weights=models:/NAME/<version>."""
    from pipeline.use import register as registry

    click.echo(registry.run_model(run, name, uri, alias=alias).line())


@main.command()
@click.option("--uri", default=None, help="Tracking store (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=5000, show_default=True)
def ui(uri: str | None, host: str, port: int) -> None:
    """Start the MLflow UI on the tracking store (Ctrl-C stops it)."""
    from pipeline import tracking

    sys.exit(tracking.ui(uri, host=host, port=port))
