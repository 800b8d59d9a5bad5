"""The `pipeline` command: parse, call one function, print. No logic lives here."""
from __future__ import annotations

import sys
import traceback
from pathlib import Path

import click

from pipeline.errors import UserError


class _Group(click.Group):
    """Errors users can cause print as one line and exit 1; `--debug` shows the traceback instead."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as err:
            self._fail(ctx, f"error: {err}", err)
        except KeyboardInterrupt:
            click.echo("interrupted; checkpoints stay on disk, resume with --resume", err=True)
            sys.exit(130)
        except MemoryError as err:
            self._fail(ctx, "error: out of memory; lower data.batch_size or data.image_size (checkpoints kept)", err)
        except RuntimeError as err:
            if "out of memory" in str(err).lower():
                self._fail(ctx, "error: out of memory; lower data.batch_size or data.image_size (checkpoints kept)",
                           err)
            raise

    @staticmethod
    def _fail(ctx: click.Context, message: str, err: BaseException):
        if ctx.obj and ctx.obj.get("debug"):
            traceback.print_exception(err)
        click.echo(message, err=True)
        sys.exit(1)


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show tracebacks of errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Fine-tune pretrained ResNet-family backbones and compare them in MLflow."""
    ctx.ensure_object(dict)["debug"] = debug


@main.command()
@click.argument("task_file", type=click.Path(path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option("--resume", is_flag=True, help="Continue the run in train.output_dir from its last checkpoint.")
def run(task_file: Path, overrides: tuple[str, ...], resume: bool) -> None:
    """Train TASK_FILE, with optional key.path=value OVERRIDES (e.g. train.lr=0.01)."""
    from pipeline import stages

    stages.run(task_file, overrides, resume=resume, say=click.echo)


@main.command("config")
@click.argument("task_file", type=click.Path(path_type=Path))
@click.argument("overrides", nargs=-1)
def show_config(task_file: Path, overrides: tuple[str, ...]) -> None:
    """Print the resolved, validated config of TASK_FILE with OVERRIDES."""
    from pipeline import config

    click.echo(config.to_yaml(config.load(task_file, overrides)), nl=False)


@main.group()
def data() -> None:
    """Datasets."""


@data.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("data/shapes"), show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def synth(out: Path, seed: int) -> None:
    """Write the synthetic shapes dataset (ImageFolder for classification)."""
    from pipeline.data import synth as synth_data

    click.echo(f"wrote {synth_data.generate(out, seed=seed)}")


@main.group()
def weights() -> None:
    """Pretrained weights."""


@weights.command()
@click.argument("names", nargs=-1, required=True)
def pull(names: tuple[str, ...]) -> None:
    """Download NAMES (resnet50, resnet50.tv_in1k, ...) into the hub cache, for machines without a network."""
    from pipeline import weights as W

    for path in W.pull(list(names)):
        click.echo(f"cached {path}")
