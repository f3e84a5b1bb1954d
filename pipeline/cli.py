"""`python -m pipeline STEP --option value`: parse, build the step's config, call the step.

Options are generated from the config dataclasses, so names, types, defaults and help live in
pipeline.config only. TensorFlow is imported only once a step actually runs: --help and
argument errors answer at once.
"""

import importlib
import os
import re
import signal
import sys
from contextlib import contextmanager
from dataclasses import MISSING

import click

from pipeline.config import (EvaluateConfig, GridConfig, LogModelConfig, MainConfig, PipelineError, PredictConfig, PrepareConfig,
                             ReportConfig, ServeConfig, TrainConfig, TuneConfig, parameters, with_recipe)
from pipeline.quiet import quiet
from pipeline.storage import check_store, quiet_store_errors, write_error

# command -> (config class, module:function, one-line help)
STEPS = {
    "prepare": (PrepareConfig, "pipeline.prepare:prepare",
                "Find, check and split a dataset; log its manifest."),
    "train": (TrainConfig, "pipeline.train:train",
              "Fine-tune ResNet50 on prepared data; log the model."),
    "evaluate": (EvaluateConfig, "pipeline.evaluate:evaluate",
                 "Score a logged model on the test split."),
    "main": (MainConfig, "pipeline.workflow:main",
             "prepare, train and evaluate, nested under one run; register the model."),
    "grid": (GridConfig, "pipeline.grid:grid",
             "The studies' seven-point grid: one child run per point."),
    "tune": (TuneConfig, "pipeline.tune:tune",
             "Optuna search from the grid's points onwards: one child run per trial, resumable, parallel."),
    "predict": (PredictConfig, "pipeline.predict:predict",
                "Classify image files with a model; write a CSV."),
    "log-model": (LogModelConfig, "pipeline.train:log_trained_model_of",
                  "Build and log the whole model of a grid point or trial run that has none."),
    "report": (ReportConfig, "pipeline.report:report",
               "Write a Markdown report of a dataset's runs and champion."),
}


def config_options(cls):
    """Click options for every field of a config dataclass: --field-name, its type, default and help."""
    def decorate(command):
        required_first = sorted(parameters(cls), key=lambda f: f.default is not MISSING)
        for f in reversed(required_first):
            required = f.default is MISSING
            command = click.option(f"--{f.name.replace('_', '-')}", f.name, type=f.type, required=required,
                                   default=None if required else f.default, show_default=not required,
                                   help=f.metadata.get("help"))(command)
        return command
    return decorate


def run_step(cls, target: str, options: dict):
    """Build the config (a bad value fails here, before any import of TensorFlow) and run the step."""
    with on_the_store():
        cfg = with_recipe(cls, options)  # before function(target), whose module may import TensorFlow
        if getattr(cfg, "weights", None) == "imagenet":
            check_imagenet_weights()
        check_store()
        quiet_store_errors()
        from pipeline.liveness import stop_on_signals
        stop_on_signals()  # SIGTERM and SIGINT end the open runs KILLED, resumable
        return function(target)(cfg)


IMAGENET_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
                "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5")


def check_imagenet_weights(timeout: float = 5) -> None:
    """Stop in one line, before any work, when the ImageNet weights are neither in Keras' cache
    nor downloadable (an offline machine), rather than after preparing the whole dataset."""
    import urllib.request

    keras_home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    if os.path.isfile(os.path.join(keras_home, "models", IMAGENET_URL.rsplit("/", 1)[1])):
        return
    try:
        urllib.request.urlopen(urllib.request.Request(IMAGENET_URL, method="HEAD"), timeout=timeout).close()
    except Exception as e:
        raise PipelineError(f"weights=imagenet, but the ImageNet weights cannot be downloaded here ({type(e).__name__}): "
                            "use weights=none, a ResNet50 weights .h5 file, or a model URI from an earlier run") from None


def under_mlflow_run() -> bool:
    """`mlflow run` starts the command with the run's id in MLFLOW_RUN_ID; the user typed -P name=value."""
    return bool(os.environ.get("MLFLOW_RUN_ID"))


def as_typed(message: str) -> str:
    """A message naming options as the user typed them: --learning-rate, or -P learning_rate under `mlflow run`."""
    if not under_mlflow_run():
        return message
    return re.sub(r"(?<![\w-])--([a-z][a-z0-9_-]*)", lambda m: "-P " + m.group(1).replace("-", "_"), message)


class Pipeline(click.Group):
    """Under `mlflow run`, errors and hints speak of -P name=value, and there is no usage text of
    `python -m pipeline` (which the user never typed)."""

    def main(self, args=None, prog_name=None, **extra):
        if not under_mlflow_run():
            return super().main(args, prog_name, **extra)
        try:
            return super().main(args, prog_name, standalone_mode=False, **extra)
        except click.ClickException as e:
            click.echo("Error: " + as_typed(e.format_message()), err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)


def function(target: str):
    """The function named module:function, imported only now."""
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


@contextmanager
def one_line_errors():
    """A PipelineError, a write that failed for lack of space or permission (pipeline.storage), or
    a stop by SIGTERM or SIGINT becomes click's `Error: ...` line and a non-zero exit (130 for
    SIGINT, 143 for SIGTERM), no traceback."""
    try:
        yield
    except PipelineError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt as e:
        signame = getattr(e, "signame", "SIGINT")
        stop = click.ClickException(f"stopped by {signame}: its runs are marked KILLED; "
                                    "run the same command again to continue")
        stop.exit_code = 128 + getattr(signal.Signals, signame).value
        raise stop from None
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "tensorflow":
            raise
        raise click.ClickException('TensorFlow is not installed: pip install -e ".[cpu]", or ".[gpu]" on Linux '
                                   "with an NVIDIA GPU") from None
    except Exception as e:
        message = write_error(e)
        if message is None:
            raise
        raise click.ClickException(message) from None


@contextmanager
def on_the_store():
    """What a command that reads or writes the tracking store runs in: the line `tracking store:
    <uri>` first, before its input is checked, so that even a command refused at once says which
    store it meant (another working folder is another store); then one_line_errors."""
    with one_line_errors():
        import mlflow  # about 2 s: after click's own usage errors, which stay instant

        click.echo(f"tracking store: {mlflow.get_tracking_uri()}")
        yield


@click.group(cls=Pipeline, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--verbose", is_flag=True, envvar="PIPELINE_VERBOSE",
              help="Show TensorFlow's, absl's, matplotlib's and MLflow's log lines and progress bars.")
def cli(verbose):
    """Fine-tune a Keras ResNet50 image classifier, tracked with MLflow."""
    if not verbose:
        quiet()


def _add_step(name, cls, target, help):
    @config_options(cls)
    def command(**options):
        result = run_step(cls, target, options)
        click.echo(f"{name} finished: " + ", ".join(
            f"{k}={v}" for k, v in vars(result).items() if isinstance(v, (str, int, float))))
    cli.command(name, help=help)(command)


for _name, (_cls, _target, _help) in STEPS.items():
    _add_step(_name, _cls, _target, _help)


@cli.command("serve")
@config_options(ServeConfig)
def serve_model(**options):
    """Serve a model over HTTP as `mlflow models serve` does, never quoting a request in an error."""
    with on_the_store():
        cfg = ServeConfig(**options)
        check_store()
        function("pipeline.server:serve")(cfg)


@cli.group()
def models():
    """Registered models: versions, aliases, source runs and key metrics."""


@models.command("list")
def list_models():
    """Every version of every registered model."""
    with on_the_store():
        table = function("pipeline.registry:versions")()
    click.echo(table.to_string(index=False) if len(table) else "no registered models yet: run main first")


@models.command("show")
@click.argument("name")
def show_model(name):
    """Registered model NAME: its versions, then each version's metrics, champion decision and model card."""
    with on_the_store():
        table, details = function("pipeline.registry:describe")(name)
    click.echo(table.to_string(index=False))
    for version in details:
        aliases = f" ({version['aliases']})" if version["aliases"] else ""
        click.echo(f"\nversion {version['version']}{aliases}")
        shown = {k: v for k, v in version.items() if k not in ("version", "aliases", "card")} | version["card"]
        for key, value in shown.items():
            click.echo(f"  {key}: {value}")
