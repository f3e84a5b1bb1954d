"""MLproject, the click CLI and the config dataclasses name and default every parameter alike."""

import os
import subprocess
import urllib.error
import urllib.request
import sys
import time
from dataclasses import MISSING
from pathlib import Path

import mlflow
import pytest
import yaml
from click.testing import CliRunner

from pipeline import cli as cli_module
from pipeline import mlproject
from pipeline.config import (CHECKS, EvaluateConfig, LogModelConfig, MainConfig, PipelineError, PredictConfig,
                             ServeConfig, TrainConfig, TuneConfig, parameters)
from pipeline.quiet import noise

ROOT = Path(__file__).resolve().parent.parent
MLPROJECT = yaml.safe_load((ROOT / "MLproject").read_text())


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("step", sorted(cli_module.STEPS))
def test_every_mlproject_parameter_reaches_command_cli_and_config(step):
    entry = MLPROJECT["entry_points"][step]
    config = {f.name: f for f in parameters(cli_module.STEPS[step][0])}
    options = {p.name: p for p in cli_module.cli.commands[step].params if p.name != "help"}
    assert set(entry["parameters"]) == set(config) == set(options)
    for name, spec in entry["parameters"].items():
        assert f"--{name.replace('_', '-')} {{{name}}}" in entry["command"], name
        default = spec.get("default") if isinstance(spec, dict) else MISSING
        if config[name].default is MISSING:
            assert default is MISSING and options[name].required, name
        else:
            assert config[name].type(default) == config[name].default == options[name].default, name


def test_mlproject_and_readme_table_are_generated_from_the_configs():
    assert (ROOT / "MLproject").read_text() == mlproject.render(), "run python -m pipeline.mlproject"
    readme = (ROOT / "README.md").read_text()
    assert mlproject.with_table(readme) == readme, "run python -m pipeline.mlproject"


def test_every_entry_point_has_a_cli_command():
    assert set(MLPROJECT["entry_points"]) == set(cli_module.STEPS)


def test_help_lists_the_steps_without_importing_tensorflow():
    out = run_cli("--help")
    assert out.returncode == 0
    for step in cli_module.STEPS:
        assert step in out.stdout
    probe = "import sys, pipeline.cli; sys.exit('tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], cwd=ROOT).returncode == 0


@pytest.mark.parametrize("args, message", [
    (["main", "--learning-rate", "-1"], "invalid learning_rate=-1.0"),
    (["main", "--split", "sideways"], "invalid split='sideways'"),
    (["grid", "--epochs", "0"], "invalid epochs=0"),
    (["train", "--data", "runs:/x/data", "--fine-tune", "some"], "invalid fine_tune='some'"),
    (["train", "--data", "runs:/x/data", "--finetune-epochs", "3"], "invalid finetune_epochs=3 with fine_tune='none'"),
    (["main", "--dataset", "/no/such/folder", "--weights", "none"], "neither a preset"),
    (["predict", "--model", "models:/x@champion", "--input", "/no/such/folder"], "/no/such/folder does not exist"),
    (["report", "--dataset", "no_such_dataset"], "no experiment 'no_such_dataset'"),
    (["models", "show", "no-such-model"], "no registered model 'no-such-model'"),
    (["serve", "--model", "models:/no-such-model@champion"], "cannot read model 'models:/no-such-model@champion'"),
    (["serve", "--model", "models:/x@champion", "--port", "70000"], "invalid port=70000"),
])
def test_bad_parameter_exits_nonzero_with_one_line(args, message):
    out = run_cli(*args)
    assert out.returncode != 0
    # MLflow logs INFO lines when a command first opens a fresh sqlite store: not ours to count.
    lines = [line for line in out.stderr.strip().splitlines() if " INFO mlflow." not in line]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], out.stderr


def test_wrong_type_is_a_usage_error():
    out = run_cli("main", "--epochs", "many")
    assert out.returncode == 2 and "'many' is not a valid integer" in out.stderr


BAD_VALUES = {
    "dataset": "", "split": "x", "seed": -1, "val_fraction": 1.0, "test_fraction": 0.0, "max_per_class": -1, "image_size": 16,
    "weights": "/no/such/file.h5", "fine_tune": "-3", "pooling": "max", "units": 0, "hidden_layers": -1,
    "dropout": 1.0, "precision": "float8", "feature_cache": "maybe", "learning_rate": -1.0, "epochs": 0,
    "batch_size": 0, "patience": 0, "min_delta": -0.1, "augment": "rotate", "class_weight": "inverse", "finetune_epochs": -1,
    "finetune_learning_rate": 0.0, "tta": "flips", "data": "", "model": "", "input": "", "output": "",
    "n_trials": 0, "timeout": -1, "workers": 0, "storage": "", "pruner": "sometimes", "heartbeat_interval": 0,
    "grace_period": 0, "engine": "onnx", "log_models": "none", "run": "", "port": 0,
    "label_smoothing": 1.0, "weight_decay": -0.01, "schedule": "linear", "recipe": "fast",
}
TUNE_ONLY = ("n_trials", "timeout", "workers", "storage", "pruner", "heartbeat_interval", "grace_period", "log_models")


def test_every_check_has_a_bad_value():
    assert set(BAD_VALUES) == set(CHECKS)


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_config_rejects_bad_value_in_one_line(name):
    cls, kwargs = {"data": (TrainConfig, {}), "model": (EvaluateConfig, {"data": "runs:/x/data"}),
                   "input": (PredictConfig, {"model": "models:/x@champion", "input": "images"}),
                   "output": (PredictConfig, {"model": "models:/x@champion", "input": "images"}),
                   "run": (LogModelConfig, {}), "port": (ServeConfig, {"model": "models:/x@champion"}),
                   }.get(name, (TuneConfig if name in TUNE_ONLY else MainConfig, {}))
    with pytest.raises(PipelineError, match=f"invalid {name}=") as e:
        cls(**{**kwargs, name: BAD_VALUES[name]})
    assert "\n" not in str(e.value)


def test_defaults_are_valid_and_the_studies_setting():
    cfg = MainConfig()
    assert (cfg.hidden_layers, cfg.units, cfg.learning_rate, cfg.dropout) == (1, 8, 1e-5, 0.5)
    assert (cfg.image_size, cfg.weights, cfg.fine_tune, cfg.pooling) == (224, "imagenet", "none", "flatten")


def test_fine_tune_and_weights_accept_their_forms(tmp_path):
    weights = tmp_path / "w.h5"
    weights.write_bytes(b"")
    forms = {"fine_tune": ("none", "all", "10"),
             "weights": ("imagenet", "none", str(weights), "runs:/abc/model", "models:/blood_cells-resnet50@champion")}
    for name, values in forms.items():
        for value in values:
            assert CHECKS[name][0](value), (name, value)
            MainConfig(**{name: value})  # a refused value raises PipelineError


def test_readme_documents_every_parameter_and_entry_point():
    readme = (ROOT / "README.md").read_text()
    for step, (cls, _, _) in cli_module.STEPS.items():
        assert (f"-e {step} " if step != "main" else "mlflow run . --env-manager local -P dataset=") in readme, step
        for f in parameters(cls):
            assert f"| `{f.name}` |" in readme, f.name


def test_under_mlflow_run_errors_name_parameters_as_typed():
    """mlflow run passes an undeclared -P name=value on as --name value; the hint speaks -P."""
    out = subprocess.run([sys.executable, "-m", "pipeline", "main", "--learning_rat", "3"], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "MLFLOW_RUN_ID": "0" * 32})
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "Error: No such option '-P learning_rat'. (Did you mean one of: '-P finetune_learning_rate', '-P learning_rate'?)"]
    assert "--learning-rate" in run_cli("main", "--learning-rat", "3").stderr  # the CLI's own form otherwise


def test_offline_imagenet_stops_before_any_work(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # no cached weights
    with pytest.raises(PipelineError, match="weights=imagenet, but .* use weights=none, a ResNet50 weights .h5 file"):
        cli_module.check_imagenet_weights()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / cli_module.IMAGENET_URL.rsplit("/", 1)[1]).write_bytes(b"")
    cli_module.check_imagenet_weights()  # in Keras' cache: no download needed


def test_quiet_drops_noise_and_keeps_errors():
    for line in (b"I0000 00:00:1796218159.487533    6430 port.cc:153] oneDNN custom operations are on.",
                 b"W0000 00:00:1796218159.4 12 cuda_dnn.cc:8] something",
                 b"E0000 00:00:1796218116.840528 5131 util.cc:131] oneDNN supports DT_HALF only on platforms with AVX-512.",
                 b"2026-01-01 W tensorflow/core/framework/op_kernel.cc:1] FAILED_PRECONDITION: Python interpreter state",
                 b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"):
        assert noise(line), line
    for line in (b"Error: invalid epochs=0: must be a positive number", b"Traceback (most recent call last):",
                 b"E0000 00:00:1.2 1 cuda.cc:1] CUDA error: out of memory", b"F0000 00:00:1.2 1 x.cc:1] Check failed"):
        assert not noise(line), line


# A filtered process whose child (as multiprocessing's resource tracker and forkserver do) still
# holds the filter's pipe until after the process exits; its last line has no newline.
FILTERED_EXIT = """
import subprocess, sys
from pipeline.quiet import quiet
quiet()
child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL)  # ends when this process does
sys.stderr.write("W0000 00:00:1.2 1 x.cc:1] noise\\nkept line\\nlast, unfinished")
"""


def test_a_filtered_process_forwards_its_stderr_and_exits_without_waiting_for_its_children():
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", FILTERED_EXIT], capture_output=True, cwd=ROOT, timeout=60)
    assert time.monotonic() - started < 4, "waited for the child's end of the pipe"
    assert done.stderr == b"kept line\nlast, unfinished\n" and done.returncode == 0


LIBRARY_WARNINGS = """
import logging, warnings
from pipeline.quiet import quiet
quiet()
warnings.warn_explicit("small study", UserWarning, "evaluator.py", 1, module="optuna.importance._ped_anova")
warnings.warn_explicit("no type hints", UserWarning, "data_validation.py", 1, module="mlflow.pyfunc.utils")
logging.basicConfig()
logging.getLogger("mlflow.pyfunc").warning("Passing a Python object as python_model")
warnings.warn_explicit("ours", UserWarning, "train.py", 1, module="pipeline.train")
"""


def test_quiet_drops_library_warnings_about_what_the_pipeline_does_on_purpose():
    done = subprocess.run([sys.executable, "-c", LIBRARY_WARNINGS], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.stderr.strip().splitlines() == ["train.py:1: UserWarning: ours"], done.stderr


def test_a_step_prints_its_tracking_store_first(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pipeline", "report", "--dataset", "nothing-here"], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"})
    assert out.stdout.splitlines()[0] == f"tracking store: sqlite:///{tmp_path}/m.db" and out.returncode == 1


@pytest.mark.parametrize("args, error", [
    (["main", "--dataset", "blood_cells"], "Error: weights=imagenet, but the ImageNet weights cannot be downloaded "
                                           "here (URLError): use weights=none"),
    (["train", "--data", "runs:/x/data", "--epochs", "0"], "Error: invalid epochs=0"),
    (["models", "list"], None),
    (["models", "show", "no-such-model"], "Error: no registered model 'no-such-model'"),
    (["serve", "--model", "models:/x@champion", "--port", "70000"], "Error: invalid port=70000"),
])
def test_every_command_on_the_store_prints_it_first_even_when_its_input_is_refused(monkeypatch, tmp_path, args, error):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # no cached ImageNet weights
    result = CliRunner().invoke(cli_module.cli, ["--verbose", *args])
    assert result.stdout.splitlines()[0] == f"tracking store: {mlflow.get_tracking_uri()}", result.output
    if error:
        assert result.exit_code == 1 and result.stderr.startswith(error), result.stderr
    else:
        assert result.exit_code == 0, result.output
