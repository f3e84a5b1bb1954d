"""tune: the grid's points first, pruned and complete trials as child runs, resuming after kill -9,
two workers on one journal study, dead trials recognised, one-line errors."""

import importlib.util
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import click
import mlflow
import optuna
import pandas as pd
import pytest
from conftest import eagerly, left_in, make_dataset, tiny, tiny_args
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from pipeline.cli import one_line_errors
from pipeline.config import GridConfig, PipelineError, TrainConfig, TuneConfig
from pipeline.grid import _key, grid, point_configs
from pipeline.liveness import REASON, is_dead, owner_key
from pipeline.study import (fail_dead_trials, grid_params, link_to_mlflow, open_storage, open_study, queue_grid,
                            seed_sampler, suggest)
from pipeline.tune import grid_trials, start_study, tune

ROOT = Path(__file__).resolve().parent.parent


def tiny_config(root: Path, storage: Path, **overrides) -> TuneConfig:
    return tiny(TuneConfig, dataset=str(root), storage=str(storage), **overrides)


def trials_of(cfg: TuneConfig, name: str) -> list[optuna.trial.FrozenTrial]:
    """The study's trials but the grid points still waiting for a run with a larger n_trials."""
    trials = optuna.load_study(study_name=name, storage=open_storage(cfg.storage)).get_trials()
    return [t for t in trials if t.state != TrialState.WAITING]


def children(parent_run_id: str, experiment: str) -> pd.DataFrame:
    return mlflow.search_runs(experiment_names=[experiment],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.step = 'train'")


def fake_grid(cfg: TuneConfig, digest: str, experiment: str, points=range(1, 8), **changed) -> str:
    """A grid parent run with finished, evaluated point runs as grid() leaves them (tag grid_key of
    the grid's own point configs, per-epoch val_accuracy, best_val_accuracy, test_accuracy),
    without training; changed: grid settings that differ from cfg's. Its run id."""
    configs = point_configs(cfg.to(GridConfig, **changed), "runs:/grid/data")
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name="grid") as parent:
        for number in points:
            with mlflow.start_run(run_name=f"point-{number}", nested=True):
                mlflow.set_tags({"grid_point": str(number), "grid_key": _key(configs[number - 1], digest)})
                for epoch, value in ((1, 0.3), (2, number / 10)):
                    mlflow.log_metric("val_accuracy", value, step=epoch)
                mlflow.log_metrics({"best_val_accuracy": number / 10, "test_accuracy": 0.5})
    return parent.info.run_id


class PruneOdd(optuna.pruners.BasePruner):
    """Prunes every odd-numbered trial after its first epoch: pruning without luck."""

    def prune(self, study, trial):
        return trial.number % 2 == 1


def test_grid_points_are_queued_once_and_again_after_a_failure(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "optuna.db", dropout=0.3)
    study = open_study(cfg, "queue")
    assert queue_grid(study, cfg) == ([], [1, 2, 3, 4, 5, 6, 7]) and queue_grid(study, cfg) == ([], [])
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.system_attrs["fixed_params"] for t in waiting] == grid_params(cfg)
    assert grid_params(cfg)[4] == {"units": 8, "hidden_layers": 3, "learning_rate": 1e-5, "dropout": 0.3,
                                   "batch_size": 8, "pooling": "flatten"}  # weights=none: fine_tune not searched
    first = study.ask()
    study.tell(first, state=TrialState.FAIL)
    assert queue_grid(study, cfg) == ([], [1])
    assert study.get_trials(states=(TrialState.WAITING,))[-1].user_attrs["grid_point"] == 1


def test_only_points_of_a_grid_on_the_same_data_and_settings_are_taken_over_once(tmp_path, capsys):
    cfg = tiny_config(tmp_path, tmp_path / "optuna.db", dropout=0.8)  # above 0.7: in the space all the same
    same = fake_grid(cfg, "digest-a", "takeover", points=(2, 5, 6))
    others = [fake_grid(cfg, "digest-b", "takeover", points=(1, 3)),  # other data
              fake_grid(cfg, "digest-a", "takeover", points=(1, 3), epochs=3),  # other settings
              fake_grid(cfg, "digest-a", "takeover", points=(1, 3), engine="tensorflow"),
              fake_grid(cfg, "digest-a", "elsewhere", points=(1, 3))]  # another experiment
    assert len(set(others)) == 4
    data = SimpleNamespace(data_uri="runs:/tune/data", digest="digest-a")
    experiment = mlflow.get_experiment_by_name("takeover").experiment_id
    assert grid_trials(replace(cfg, seed=1), data, experiment) == {}

    study = open_study(cfg, "takeover")
    with mlflow.start_run(experiment_id=experiment) as parent:
        start_study(study, cfg, data, parent)
        start_study(study, cfg, data, parent)  # a second command: nothing twice
    trials = study.get_trials()
    assert sorted(t.user_attrs["grid_point"] for t in trials) == list(range(1, 8))
    taken = [t for t in trials if t.state == TrialState.COMPLETE]
    assert [t.user_attrs["grid_point"] for t in taken] == [2, 5, 6]
    assert [t.params for t in taken] == [grid_params(cfg)[n - 1] for n in (2, 5, 6)]
    assert [t.value for t in taken] == [0.2, 0.5, 0.6]
    assert [t.intermediate_values for t in taken] == [{1: 0.3, 2: v} for v in (0.2, 0.5, 0.6)]
    points = mlflow.search_runs([experiment], f"tags.mlflow.parentRunId = '{same}'").set_index("tags.grid_point")
    assert [t.user_attrs["mlflow_run_id"] for t in taken] == [points.loc[n, "run_id"] for n in ("2", "5", "6")]
    assert all(t.user_attrs["grid_run_id"] == same for t in taken)
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert [t.user_attrs["grid_point"] for t in waiting] == [1, 3, 4, 7]
    out = capsys.readouterr().out
    assert out.count("took over") == 1 and f"took over grid points 2, 5, 6 from grid run {same} as finished" in out


def test_two_commands_at_once_take_over_or_queue_each_grid_point_once(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "shared.journal")
    grid_run = fake_grid(cfg, "digest-c", "takeover-twice", points=(1, 2, 3, 4))
    experiment = mlflow.get_experiment_by_name("takeover-twice").experiment_id
    script = f"""
from types import SimpleNamespace
import mlflow
from pipeline.config import TuneConfig
from pipeline.study import open_study
from pipeline.tune import start_study
cfg = TuneConfig(**{asdict(cfg)!r})
study = open_study(cfg, "twice")
with mlflow.start_run(experiment_id={experiment!r}) as parent:
    start_study(study, cfg, SimpleNamespace(data_uri="runs:/x/data", digest="digest-c"), parent)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    commands = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, env=env) for _ in range(2)]
    outs = [command.communicate(timeout=120)[0] for command in commands]
    assert [command.returncode for command in commands] == [0, 0], outs
    assert sum(f"took over grid points 1, 2, 3, 4 from grid run {grid_run}" in out for out in outs) == 1, outs
    trials = optuna.load_study(study_name="twice", storage=open_storage(cfg.storage)).get_trials()
    assert sorted(t.user_attrs["grid_point"] for t in trials) == list(range(1, 8))
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4 + [TrialState.WAITING] * 3


def test_the_study_names_its_metric_and_links_to_its_mlflow_experiment_and_parent_runs(tmp_path, monkeypatch):
    study = open_study(tiny_config(tmp_path, tmp_path / "optuna.db"), "linked")
    assert study.metric_names == ["val_accuracy"]
    experiment, parents = mlflow.set_experiment("linked"), []
    for _ in range(2):  # two commands on one study
        with mlflow.start_run() as parent:
            link_to_mlflow(study, parent)
            link_to_mlflow(study, parent)  # the same run once
        parents.append(parent.info.run_id)
    attrs = study.user_attrs
    assert attrs["mlflow_parent_run_ids"] == parents and len(parents) == 2
    assert (attrs["mlflow_experiment_id"], attrs["mlflow_experiment_name"]) == (experiment.experiment_id, "linked")
    assert attrs["mlflow_tracking_uri"] == mlflow.get_tracking_uri()
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "postgresql+psycopg://team:secret@dbhost/mlflow")
    link_to_mlflow(study, parent)
    assert study.user_attrs["mlflow_tracking_uri"] == "postgresql+psycopg://team:***@dbhost/mlflow"


def test_after_the_grid_points_tpe_searches_beyond_them(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "optuna.db")
    study = open_study(cfg, "beyond")
    queue_grid(study, cfg)
    base = cfg.to(TrainConfig, data="runs:/x/data")
    for value in (0.3, 0.4, 0.5, 0.4, 0.3, 0.6, 0.7, 0.5, 0.6):
        trial = study.ask()
        suggest(trial, base, cfg.weights)
        study.tell(trial, value)
    trials = study.get_trials()
    assert [t.params for t in trials[:7]] == grid_params(cfg)
    assert [t.user_attrs.get("grid_point") for t in trials] == [1, 2, 3, 4, 5, 6, 7, None, None]
    assert not any(t.params in grid_params(cfg) for t in trials[7:])


def test_a_process_running_several_trials_draws_what_a_process_per_trial_would(tmp_path):
    """pipeline.trial reseeds the sampler before each trial: the draws depend on the study's
    trials so far, not on how many trials the asking process ran before."""
    cfg = tiny_config(tmp_path, tmp_path / "optuna.db")
    base = cfg.to(TrainConfig, data="runs:/x/data")
    draws = {}
    for layout in ("one process", "a process each"):
        study = open_study(cfg, layout)
        for value in (0.3, 0.4, 0.5, 0.4, 0.3, 0.6, 0.7, 0.5, 0.6, 0.4):
            if layout == "one process":
                seed_sampler(study, cfg, 0)
            else:
                study = open_study(cfg, layout)  # as a fresh trial process opens it
            trial = study.ask()
            suggest(trial, base, cfg.weights)
            study.tell(trial, value)
        draws[layout] = [t.params for t in study.get_trials()]
    assert draws["one process"] == draws["a process each"]
    assert len({str(p) for p in draws["one process"]}) == 10  # ten different draws


def test_search_space_and_fine_tune_only_with_pretrained_weights():
    study = optuna.create_study(direction="maximize")
    base = TrainConfig(data="runs:/x/data", weights="none", batch_size=24)
    random_backbone, pretrained = study.ask(), study.ask()
    assert suggest(random_backbone, base, "none").fine_tune == "none" and "fine_tune" not in random_backbone.params
    point = suggest(pretrained, base, "imagenet")
    pooling = pretrained.params["pooling"]
    assert pretrained.distributions == {
        "units": IntDistribution(4, {"flatten": 128, "avg": 512}[pooling], log=True), "hidden_layers": IntDistribution(1, 3),
        "learning_rate": FloatDistribution(1e-6, 1e-2, log=True), "dropout": FloatDistribution(0.0, 0.7),
        "batch_size": CategoricalDistribution((8, 16, 24, 32, 64)),
        "pooling": CategoricalDistribution(("flatten", "avg")),
        "fine_tune": CategoricalDistribution(("none", "10", "32", "all"))}
    assert point == replace(base, **pretrained.params)


def test_only_trials_of_dead_processes_of_this_host_are_failed(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone_key = owner_key(gone.pid)
    gone.kill()
    gone.wait()
    study = open_study(tiny_config(tmp_path, tmp_path / "optuna.db"), "dead")
    for key in (gone_key, owner_key(), "another-host|ns|boot|1|1"):
        study.ask().set_user_attr("owner_key", key)
    assert fail_dead_trials(study) == [0]
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING,
                                                     TrialState.WAITING]  # trial 0, retried
    assert study.get_trials()[3].system_attrs["failed_trial"] == 0


def test_storage_forms(tmp_path):
    assert isinstance(open_storage(str(tmp_path / "s.journal")), optuna.storages.JournalStorage)
    assert isinstance(open_storage(str(tmp_path / "s.db")), optuna.storages.RDBStorage)
    assert isinstance(open_storage(f"sqlite:///{tmp_path}/u.db"), optuna.storages.RDBStorage)
    with pytest.raises(PipelineError, match="cannot open the Optuna storage 'nosuch://x'") as e:
        open_storage("nosuch://x")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("args, message", [
    (["--n-trials", "0"], "invalid n_trials=0"),
    (["--workers", "0"], "invalid workers=0"),
    (["--pruner", "sometimes"], "invalid pruner='sometimes': must be one of median, hyperband, none"),
    # at 32 px, the memory check that comes first passes whatever memory other processes take
    (["--weights", "none", "--fine-tune", "all", "--image-size", "32"], "invalid fine_tune='all' with weights=none"),
])
def test_bad_parameter_is_one_line(args, message):
    out = subprocess.run([sys.executable, "-m", "pipeline", "tune", *args], capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in out.stderr.strip().splitlines() if " INFO mlflow." not in line]
    assert out.returncode != 0 and len(lines) == 1, out.stderr
    assert lines[0].startswith("Error: ") and message in lines[0]


def test_tune_without_tensorflow_stops_in_the_clis_one_line_before_any_run(tmp_path, monkeypatch):
    """A worker imports no TensorFlow (its trials do, in processes of their own): tune checks that
    it is installed before starting anything, so its absence is not a trial process's traceback."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorflow" else find_spec(name, *a))
    cfg = tiny_config(make_dataset(tmp_path / "notfshapes", n=4), tmp_path / "optuna.db")
    with pytest.raises(click.ClickException, match=r"^TensorFlow is not installed: pip install"), one_line_errors():
        tune(cfg)
    assert mlflow.get_experiment_by_name("notfshapes") is None


def report_what_it_took_over(inherited) -> None:
    """A trial process's first step (pipeline.trial.run_trial), then what it has."""
    inherited.adopt()
    print(f"env={os.environ.get('PIPELINE_PROBE')} cwd={os.getcwd()} path={sys.path[0]}", flush=True)


@pytest.mark.slow
def test_a_forked_trial_process_has_its_workers_environment_folder_and_output_of_the_moment(tmp_path, monkeypatch,
                                                                                           capfd):
    from pipeline.trial import FromWorker, _forkserver

    saved = os.dup(1)
    with open(tmp_path / "server.out", "w") as elsewhere:  # the server's stdout, unless an earlier test started it
        os.dup2(elsewhere.fileno(), 1)
        try:
            context = _forkserver()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
    monkeypatch.setenv("PIPELINE_PROBE", "set after the server started")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "modules"))
    process = context.Process(target=report_what_it_took_over, args=(FromWorker(),))
    process.start()
    process.join()
    assert process.exitcode == 0
    assert f"env=set after the server started cwd={tmp_path} path={tmp_path / 'modules'}" in capfd.readouterr().out


@pytest.mark.slow
def test_tune_runs_grid_points_first_and_records_pruned_and_complete_trials(tmp_path, capfd):
    cfg = tiny_config(make_dataset(tmp_path / "tuneshapes", n=8), tmp_path / "optuna.db", n_trials=4)
    result = tune(cfg, pruner=PruneOdd())

    trials = trials_of(cfg, result.study_name)
    assert [t.params for t in trials] == grid_params(cfg)[:4]
    waiting = optuna.load_study(study_name=result.study_name, storage=open_storage(cfg.storage)).get_trials(
        states=(TrialState.WAITING,))
    assert [t.user_attrs["grid_point"] for t in waiting] == [5, 6, 7]  # queued for a later, larger run
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED] * 2
    assert (result.n_complete, result.n_pruned) == (2, 2)
    runs = children(result.run_id, "tuneshapes").set_index("tags.optuna_trial").sort_index()
    assert list(runs.index) == [str(n) for n in range(4)]
    assert list(runs["tags.optuna_state"]) == ["COMPLETE", "PRUNED"] * 2
    assert list(runs["status"]) == ["FINISHED", "KILLED"] * 2
    assert list(runs["tags.mlflow.runName"]) == [f"trial-{n}" for n in range(4)]
    assert [t.user_attrs["mlflow_run_id"] for t in trials] == list(runs["run_id"])  # pruned ones too
    assert runs["metrics.rss_mb"].gt(100).all() and runs["metrics.peak_rss_mb"].ge(runs["metrics.rss_mb"]).all()
    # one trial process of the worker's ran the four trials (up to Job.trials_per_process), not one process each
    assert runs["tags.optuna_process"].nunique() == 1 and (runs["tags.optuna_process"] != runs["tags.optuna_worker"]).all()
    client = mlflow.MlflowClient()
    epochs = [len(client.get_metric_history(run_id, "val_accuracy")) for run_id in runs["run_id"]]
    assert epochs == [2, 1] * 2  # a pruned trial stops after its first epoch and logs no model
    assert runs.loc[runs["tags.optuna_state"] == "PRUNED", "metrics.best_val_accuracy"].isna().all()

    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value)
    assert (result.best_trial, result.best_value, result.best_params) == (best.number, best.value, best.params)
    evaluated = runs[runs["metrics.test_accuracy"].notna()]
    assert list(evaluated.index) == [str(best.number)]  # the test split is read once, for the best trial
    parent = mlflow.get_run(result.run_id).data
    assert parent.metrics["best_val_accuracy"] == best.value and parent.tags["best.units"] == str(best.params["units"])
    assert parent.metrics["test_accuracy"] == result.test_accuracy == evaluated["metrics.test_accuracy"].item()
    artifacts = {a.path for a in client.list_artifacts(result.run_id)} | {
        a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert {"tune_trials.csv", "best_params.json", "plots/optimization_history.png",
            "plots/parallel_coordinate.png", "plots/param_importances.png"} <= artifacts
    [version] = client.search_model_versions("name = 'tuneshapes-resnet50'")
    assert version.run_id == runs.loc[str(best.number), "run_id"]
    out = capfd.readouterr().out  # trials print from processes of their own
    assert "trial   0 COMPLETE value=" in out and " (pruned after epoch 1) params: pooling=flatten, units=16, " in out


@pytest.mark.slow
def test_tune_resumes_after_kill_9(tmp_path, capsys):
    cfg = tiny_config(make_dataset(tmp_path / "killshapes", n=8), tmp_path / "optuna.db", n_trials=2, pruner="none")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's pipeline, whatever is installed
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "pipeline", *tiny_args(
            "tune", dataset=cfg.dataset, storage=cfg.storage, n_trials=cfg.n_trials, pruner=cfg.pruner)],
            stdout=log, stderr=log, env=env, start_new_session=True)
    second_trial = "tags.optuna_trial = '1' and attributes.status = 'RUNNING'"
    deadline = time.time() + 180
    while first.poll() is None and time.time() < deadline:
        running = mlflow.search_runs(experiment_names=["killshapes"], filter_string=second_trial)
        if len(running):
            break
        time.sleep(0.5)
    assert first.poll() is None and len(running), (tmp_path / "first.log").read_text()[-3000:]
    # The worker only starts trial processes and waits for them: TensorFlow is loaded there, not in it.
    assert "tensorflow" not in Path(f"/proc/{first.pid}/maps").read_text()
    first.kill()  # SIGKILL: no clean-up at all
    first.wait()
    # Nothing of it stays: its trial process dies with it, then its forkserver and resource tracker end.
    stray = left_in(first.pid)
    assert not stray, stray
    [killed_run] = running["run_id"]
    [interrupted] = mlflow.search_runs(experiment_names=["killshapes"], filter_string="tags.step = 'tune'")["run_id"]

    result = tune(cfg)
    trials = trials_of(cfg, result.study_name)
    assert [t.number for t in trials] == [0, 1, 2]
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].user_attrs["worker"] == f"{socket.gethostname()}:{first.pid}"
    assert is_dead(trials[1].user_attrs["owner_key"])  # its trial process died with the worker
    assert trials[2].params == grid_params(cfg)[2]
    waiting = optuna.load_study(study_name=result.study_name, storage=open_storage(cfg.storage)).get_trials(
        states=(TrialState.WAITING,))
    assert [t.user_attrs["grid_point"] for t in waiting] == [4, 5, 6, 7, 2]  # the dead grid point is queued again
    assert result.run_id == interrupted
    assert trials[1].user_attrs["mlflow_run_id"] == killed_run  # a failed trial links to its run too
    killed = mlflow.get_run(killed_run)
    assert killed.info.status == "FAILED" and killed.data.tags["optuna_state"] == "FAIL"
    assert killed.data.tags[REASON].startswith(f"its process {killed.data.tags['optuna_process']} is gone")
    assert mlflow.search_runs(experiment_names=["killshapes"], filter_string="attributes.status = 'RUNNING'").empty
    out = capsys.readouterr().out
    assert "trial 1: its process is gone, marked FAIL" in out and "continuing the interrupted tune run" in out


class WaitForASecondWorker(optuna.pruners.BasePruner):
    """Never prunes; holds a trial at its first epoch until trials of two workers exist (at most
    five minutes). A spawned worker's first trial starts an interpreter's start and its
    forkserver's imports after the first worker's, whose trial processes fork at once from a
    forkserver an earlier test started: it would otherwise run every trial of a small study."""

    def prune(self, study, trial):
        deadline = time.time() + 300
        while len({t.user_attrs.get("worker") for t in study.get_trials(deepcopy=False)} - {None}) < 2:
            if time.time() > deadline:
                break
            time.sleep(0.5)
        return False


@pytest.mark.slow
def test_two_workers_share_one_journal_study(tmp_path):
    cfg = tiny_config(make_dataset(tmp_path / "workshapes", n=8), tmp_path / "study.journal", n_trials=3,
                      pruner="none", workers=2)
    result = tune(cfg, pruner=WaitForASecondWorker())
    trials = trials_of(cfg, result.study_name)
    assert [t.number for t in trials] == [0, 1, 2] and all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2
    runs = children(result.run_id, "workshapes")
    assert sorted(runs["tags.optuna_trial"].astype(int)) == [0, 1, 2] and (runs["status"] == "FINISHED").all()
    assert runs["tags.optuna_worker"].nunique() == 2


def test_a_flatten_head_is_searched_up_to_128_units_an_avg_head_to_512():
    study = optuna.create_study(direction="maximize")
    base = TrainConfig(data="runs:/x/data", weights="none")
    for pooling, high in (("flatten", 128), ("avg", 512)):
        study.enqueue_trial({"pooling": pooling})
        trial = study.ask()
        assert suggest(trial, base, "none").pooling == pooling
        assert trial.distributions["units"] == IntDistribution(4, high, log=True)


@pytest.mark.slow
def test_tune_after_a_grid_on_the_same_settings_trains_only_the_new_trials(tmp_path, capsys):
    cfg = tiny_config(make_dataset(tmp_path / "adoptshapes", n=8), tmp_path / "optuna.db", n_trials=9)
    with eagerly():  # the grid is what tune finds, not the subject here
        grid_run = grid(cfg.to(GridConfig)).run_id
    points = {int(run.data.tags["grid_point"]): run for run in mlflow.search_runs(
        experiment_names=["adoptshapes"], filter_string=f"tags.mlflow.parentRunId = '{grid_run}'",
        output_format="list")}
    result = tune(cfg)

    assert len(children(result.run_id, "adoptshapes")) == 2  # exactly 2 new models trained
    trials = trials_of(cfg, result.study_name)
    assert len(trials) == 9 and {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    taken = sorted((t for t in trials if "grid_point" in t.user_attrs), key=lambda t: t.user_attrs["grid_point"])
    assert [t.user_attrs["grid_point"] for t in taken] == list(range(1, 8))  # each point once
    assert [t.params for t in taken] == grid_params(cfg)
    assert [t.user_attrs["mlflow_run_id"] for t in taken] == [points[n].info.run_id for n in range(1, 8)]
    assert [t.value for t in taken] == [points[n].data.metrics["best_val_accuracy"] for n in range(1, 8)]
    assert all(len(t.intermediate_values) == 2 for t in taken)
    best = {t.number: t for t in trials}[result.best_trial]
    assert best.value == result.best_value == max(t.value for t in trials if t.state == TrialState.COMPLETE)
    assert result.test_accuracy == mlflow.get_run(best.user_attrs["mlflow_run_id"]).data.metrics["test_accuracy"]
    assert f"took over grid points 1, 2, 3, 4, 5, 6, 7 from grid run {grid_run}" in capsys.readouterr().out
