"""Seconds per trial and megabytes per study: tune on cached features at 224 px on blood_cells.

    PIPELINE_DATA_DIR=../shared/data python benchmarks/tune_speed.py [--trials 20] [--max-per-class 200]

A fresh tracking store, study and feature cache. The features are extracted once (timed apart);
then the study runs its trials (the grid's seven points first, in trial processes of up to 10
trials each), logs the best trial's model, evaluates and registers it. For the trials: the wall time
per trial, as the study's pace (from the first trial's end to the last's, over the trials in
between), split into the head's fit (learning_time_s), the rest of Optuna's trial (building the
head, MLflow logging) and what happens between trials (starting a trial's process and importing
TensorFlow, the worker's checks of the study). Last lines: seconds_per_trial=... and
tune_artifacts_mb=<artifacts written by the whole study>.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import mlflow
import optuna
from extraction import cpu_line
from full_grid import folder_mb

from pipeline.config import TuneConfig
from pipeline.tune import tune


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--max-per-class", type=int, default=200, help="0: every image")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder}/mlflow.db"  # the trials' processes
        os.chdir(folder)
        cfg = TuneConfig(dataset="blood_cells", weights="none", epochs=args.epochs, image_size=args.image_size,
                         max_per_class=args.max_per_class, n_trials=args.trials, storage=f"{folder}/optuna.db",
                         cache_dir=f"{folder}/cache", experiment="tune-speed")
        start = time.perf_counter()
        result = tune(cfg)
        total = time.perf_counter() - start
        study = optuna.load_study(study_name=result.study_name, storage=f"sqlite:///{folder}/optuna.db")
        trials = [t for t in study.trials if t.datetime_complete]
        runs = mlflow.search_runs(experiment_names=["tune-speed"], filter_string="tags.optuna_trial != ''")
        extraction = runs["metrics.feature_extraction_s"].max()
        walls = [(t.datetime_complete - t.datetime_start).total_seconds() for t in sorted(trials, key=lambda t: t.number)]
        fits = runs["metrics.learning_time_s"].dropna()
        artifacts_mb = sum(folder_mb(Path(folder, name)) for name in ("mlartifacts", "mlruns"))
        largest = sorted(((f.stat().st_size, f) for name in ("mlartifacts", "mlruns")
                          for f in Path(folder, name).rglob("*") if f.is_file()), reverse=True)[:5]
        for size, path in largest:
            print(f"artifact {size / 2**20:.1f} MB {path.relative_to(folder)}")
    per_trial = sum(walls[1:]) / max(len(walls) - 1, 1)  # the first trial extracts the features
    ends = sorted(t.datetime_complete for t in trials)
    pace = (ends[-1] - ends[0]).total_seconds() / max(len(ends) - 1, 1)  # the study's own pace, after the first
    print(cpu_line())
    print(f"trials={len(trials)} (complete {result.n_complete}, pruned {result.n_pruned}) "
          f"max_per_class={args.max_per_class} image_size={args.image_size} study_minutes={total / 60:.2f}")
    print(f"feature_extraction_s={extraction:.1f}  # once, in the first trial")
    print(f"fit_s_per_trial={fits.mean():.2f}  # the head's training, of the trials that finished")
    print(f"rest_s_per_trial={per_trial - fits.mean():.2f}  # in the trial: building the head, MLflow logging")
    print(f"between_trials_s={pace - per_trial:.2f}  # outside any trial: starting a trial process, imports, "
          "the worker's study checks")
    print(f"optuna_seconds_per_trial={per_trial:.2f}  # Optuna's start to end")
    print(f"seconds_per_trial={pace:.2f}  # the study's pace: first to last trial end, over the trials between")
    print(f"tune_artifacts_mb={artifacts_mb:.1f}")


if __name__ == "__main__":
    main()
