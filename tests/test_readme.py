"""Every command block of the README, checked as a newcomer would meet it.

The fast test parses every `python -m pipeline` and `mlflow run` command of the README's bash
blocks against the CLI and MLproject (step names, option names, values), without running them.
The slow one runs them, in order, in a new shell: the quick start's `export` first, then each
command as written, with placeholders filled from the runs before it and the settings shrunk
(few images, 32 px, one epoch, two trials, weights=none) so the whole README takes minutes.
`python -m pipeline serve` runs in the background on a free port (its clients' URLs changed to it)
until the test ends; the serving block's `cell.jpeg` is a blood cell of the dataset's test folder,
and the curl's answer must name one of the dataset's classes.
Not run: installs, pytest, the other servers (`mlflow ui`, `mlflow models serve`, `mlflow server`), the
databases and services of a team's machines (`createdb`, `docker compose`, `kubectl`) and benchmarks.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import free_port, make_dataset, stop_group
from pipeline import cli as cli_module
from pipeline.config import ServeConfig, parameters
from pipeline.datasets import locate

ROOT = Path(__file__).resolve().parent.parent
NOT_RUN = ("pip ", "pytest", "mlflow ui", "mlflow models serve", "mlflow server", "python benchmarks/", "export ",
           "createdb ", "kubectl ")
README_PORT = "5001"  # of `python -m pipeline serve` and its clients; the slow run serves on a free port
OFFLINE = "Error: weights=imagenet, but the ImageNet weights cannot be downloaded here"
# What the slow run sets for every step that takes the parameter: the README's commands, shrunk.
SHRINK = {"max_per_class": "8", "image_size": "32", "epochs": "1", "weights": "none", "n_trials": "2",
          "timeout": "600", "finetune_epochs": "0"}


def readme_commands() -> list[str]:
    """The shell commands of the README's bash blocks, in order, comments dropped, `a && b` split."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    text = "\n".join(blocks).replace("\\\n", " ")  # a line ending in \ goes on on the next
    lines = [re.sub(r"(^|\s+)#.*$", "", line).strip() for line in text.splitlines()]
    return [command.strip() for line in lines if line for command in line.split(" && ")]


def runs(command: str) -> bool:
    return not (command.startswith(NOT_RUN) or "benchmarks/" in command or "@dbhost" in command
                or "docker compose " in command)  # after a VAR=value prefix


def step_and_params(command: str) -> tuple[str, dict[str, str]] | None:
    """(entry point, {parameter: value}) of a pipeline command, in either form; None for others."""
    words = shlex.split(re.sub(r"<[^>]*>", "x", command))  # placeholders such as <prepare run id>
    if words[:3] == ["python", "-m", "pipeline"]:
        rest = [w for w in words[3:] if w != "--verbose"]
        if not rest or rest[0] in ("models", "--help") or "--help" in rest:
            return None
        pairs = dict(zip(rest[1::2], rest[2::2]))
        return rest[0], {k.lstrip("-").replace("-", "_"): v for k, v in pairs.items()}
    if words[:2] == ["mlflow", "run"]:
        step = words[words.index("-e") + 1] if "-e" in words else "main"
        params = dict(words[i + 1].split("=", 1) for i, w in enumerate(words) if w == "-P")
        return step, params
    return None


def test_readme_commands_name_real_steps_and_parameters():
    """Each command's step exists and its options parse (click) or are entry-point parameters (MLproject)."""
    commands = [c for c in readme_commands() if step_and_params(c)]
    entry_points = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    assert len(commands) >= 15, commands  # the README's bash blocks were found
    configs = {**{step: cls for step, (cls, _, _) in cli_module.STEPS.items()}, "serve": ServeConfig}
    for command in commands:
        step, params = step_and_params(command)
        assert step in configs, command
        assert set(params) <= {f.name for f in parameters(configs[step])}, command
        if command.startswith("mlflow run"):
            assert set(params) <= set(entry_points[step]["parameters"]), command
        else:
            args = [a for k, v in params.items() for a in (f"--{k.replace('_', '-')}", v)]
            cli_module.cli.commands[step].make_context(step, args)  # raises on a bad option or value


def shrink(command: str, project: Path = ROOT) -> str:
    """The command with SHRINK's settings for the parameters its step takes, and the project by path."""
    step, params = step_and_params(command)
    taken = {f.name for f in parameters(cli_module.STEPS[step][0])} & set(SHRINK)
    if params.get("weights") == "imagenet" or "/" in params.get("weights", ""):
        taken.discard("weights")  # the README says where imagenet fails offline; a model URI is a run's backbone
    if command.startswith("mlflow run"):
        command = command.replace("mlflow run . ", f"mlflow run {shlex.quote(str(project))} ", 1)
        command = re.sub(r" -P (\w+)=\S+", lambda m: "" if m.group(1) in taken else m.group(0), command)
        return command + "".join(f" -P {k}={SHRINK[k]}" for k in sorted(taken))
    command = re.sub(r" --([\w-]+) \S+", lambda m: "" if m.group(1).replace("-", "_") in taken else m.group(0), command)
    return command + "".join(f" --{k.replace('_', '-')} {SHRINK[k]}" for k in sorted(taken))


def main_checkout() -> Path:
    common = subprocess.run(["git", "rev-parse", "--path-format=absolute", "--git-common-dir"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    return Path(common).parent if common else ROOT


def fill(command: str, seen: dict[str, str], folder: Path, store: str) -> str:
    """Placeholders replaced by what the commands before printed (the data prepared last from the
    dataset the command names, or whose model it names; the model trained last), a grid point
    without a model, or generated images."""
    if "<grid point or trial run id>" in command:
        client = mlflow.MlflowClient(tracking_uri=store)
        experiments = [e.experiment_id for e in client.search_experiments()]
        points = client.search_runs(experiments, filter_string="tags.grid_point != ''")
        seen["point"] = next(r.info.run_id for r in points if "model_uri" not in r.data.tags)
    images = make_dataset(folder / "my_images", n=8) if "path/to/" in command else None
    named = re.search(r"models:/(\w+)-resnet50", command)
    prepared = seen.get(f"prepare:{named.group(1)}" if named else "prepare", "?")
    return (command.replace("<prepare run id>", prepared).replace("m-<id>", "m-" + seen.get("model", "?"))
            .replace("<grid point or trial run id>", seen.get("point", "?"))
            .replace("path/to/my_images", str(images)).replace("path/to/images", str(images)))


@pytest.mark.slow
@pytest.mark.readme  # about 12 minutes: not in the default run; `pytest -m readme` runs it
def test_readme_runs_top_to_bottom_in_a_new_shell(tmp_path):
    """Every command runs and exits 0 in a new shell (the quick start's export first), except
    the ones the README says fail: none among its bash blocks."""
    from test_serve import wait_for_ping  # here: test_serve imports TensorFlow, which the fast test does not need
    export = next(c for c in readme_commands() if c.startswith("export "))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "MLFLOW_RUN", "MLFLOW_EXP"))}
    for checkout in (ROOT, main_checkout()):  # a git worktree lies elsewhere than its main checkout
        env["PIPELINE_DATA_DIR"] = subprocess.run(["bash", "-c", f"{export} && echo $PIPELINE_DATA_DIR"], cwd=checkout,
                                                  capture_output=True, text=True, check=True, env=env).stdout.strip()
        if Path(env["PIPELINE_DATA_DIR"], "blood_cells").is_dir():
            break
    else:
        pytest.fail(f"the README's export points at {env['PIPELINE_DATA_DIR']}, which has no blood_cells")
    env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "PIPELINE_CACHE_DIR": str(tmp_path / "cache"),
            "PYTHONPATH": str(ROOT)}  # this checkout's pipeline, whichever the editable install points at
    # `mlflow run` runs its command in the project's folder, which gets optuna.db and mlruns/: a copy's
    project = shutil.copytree(ROOT, tmp_path / "project", ignore=shutil.ignore_patterns(".*", "__pycache__", "mlruns",
                                                                                        "mlartifacts", "*.db", "tests"))
    seen, server, port = {}, None, README_PORT
    try:
        for command in filter(runs, readme_commands()):
            if command.startswith("python -m pipeline serve"):  # in the background; a real JPEG for its clients
                port = str(free_port())
                source = locate(re.search(r"models:/(\w+)-resnet50", command).group(1), env["PIPELINE_DATA_DIR"])
                classes = {folder.name for folder in source.train.iterdir()}
                shutil.copy(min(source.test.glob("*/*.jpeg")), tmp_path / "cell.jpeg")
                serve = "exec " + command.replace(f"--port {README_PORT}", f"--port {port}")
                with open(tmp_path / "serve.log", "w") as log:  # its own session: stop_group ends uvicorn's workers
                    server = subprocess.Popen(["bash", "-c", serve], cwd=tmp_path, env=env, stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True)
                wait_for_ping(f"http://127.0.0.1:{port}", server, tmp_path / "serve.log")
                continue
            shrunk = shrink(command, project) if step_and_params(command) else command
            run = fill(shrunk, seen, tmp_path, env["MLFLOW_TRACKING_URI"]).replace(f"127.0.0.1:{README_PORT}/",
                                                                                   f"127.0.0.1:{port}/")
            done = subprocess.run(["bash", "-c", run], cwd=tmp_path, env=env, capture_output=True, text=True)
            if (step_and_params(command) or ("", {}))[1].get("weights") == "imagenet":  # offline here
                assert done.returncode != 0 and OFFLINE in done.stderr.splitlines()[-1], run
                continue
            assert done.returncode == 0, f"{command}\n-> {run}\n{done.stderr[-2000:]}"
            assert not re.search(r"E0000|FAILED_PRECONDITION|retracing", done.stdout + done.stderr), run
            if "/invocations" in command:  # the served model's answer: the class of cell.jpeg
                try:
                    row = json.loads(done.stdout)["predictions"][0]
                except (ValueError, TypeError, LookupError):
                    pytest.fail(f"{run}\n-> not an answer with predictions:\n{done.stdout[:2000]}")
                assert row["predicted"] in classes and row["error"] is None, f"{run}\n-> {done.stdout[:2000]}"
            dataset = (step_and_params(command) or ("", {}))[1].get("dataset")
            if dataset and (m := re.search(r"runs:/(\w+)/data", done.stdout)):  # a step that prepared data
                seen["prepare"] = seen[f"prepare:{dataset}"] = m.group(1)
            if m := re.search(r"model_uri=models:/m-(\w+)", done.stdout):
                seen["model"] = m.group(1)
    finally:
        if server:
            stop_group(server)
