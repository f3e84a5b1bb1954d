"""A tune trial's training: the suggested config trained in a child run of the tune run, each
epoch reported to Optuna, pruned when it says so, the process's memory recorded.

It runs in the trial process alone (pipeline.trial.run_trial imports it there): a worker, which
only starts trial processes and waits for them, loads no TensorFlow while the study runs (its
imports hold 274 MB instead of 733 MB; README, Tuning beyond the grid). Only tune's last steps,
in the command's own process, log, evaluate and register the best model with it.
"""

from pathlib import Path

import keras
import mlflow
import optuna

from pipeline.config import TrainConfig
from pipeline.liveness import REASON, owner_tags
from pipeline.study import Job, suggest, worker_id
from pipeline.train import train


class Objective:
    """Train the trial's config in a child run of the tune run; return its best_val_accuracy."""

    def __init__(self, job: Job, worker: str):
        self.job, self.worker = job, worker
        self.base = job.cfg.to(TrainConfig, data=job.data_uri, experiment=job.experiment)

    def __call__(self, trial: optuna.Trial) -> float:
        """The trial's best_val_accuracy; raises TrialPruned when pruned. Its run ends FINISHED
        (optuna_state COMPLETE), KILLED (PRUNED, or stopped by a signal: FAIL), or FAILED (FAIL)."""
        point = suggest(trial, self.base, self.job.cfg.weights)
        run_id, report = self._start_run(trial), ReportEpochs(trial)
        try:
            result = train(point, callbacks=[report], log_model=self.job.cfg.log_models == "all", run_id=run_id)
        except optuna.TrialPruned:
            end_run(run_id, "PRUNED", "KILLED", pruned_at_epoch=str(max(report.reported, default=0)))
            raise
        except KeyboardInterrupt as e:  # train's step_run ended it KILLED, unless the stop came before it began
            end_run(run_id, "FAIL", "KILLED", **{REASON: str(e)})
            raise
        except BaseException:
            end_run(run_id, "FAIL", "FAILED")
            raise
        finally:
            record_memory(trial, run_id)
        trial.set_user_attr("model_uri", result.model_uri)
        end_run(run_id, "COMPLETE")
        return result.best_val_accuracy

    def _start_run(self, trial: optuna.Trial) -> str:
        """The trial's run, made before train logs into it, so that it names its trial, process and
        parent from its first moment and the trial links to it (user attr mlflow_run_id, which
        optuna-dashboard shows) however the trial ends: complete, pruned or failed."""
        tags = {"optuna_study": self.job.study_name, "optuna_trial": str(trial.number), "optuna_state": "RUNNING",
                "optuna_process": worker_id(), "optuna_worker": self.worker,
                "mlflow.parentRunId": self.job.parent_run_id, **owner_tags()}
        if "grid_point" in trial.user_attrs:
            tags["grid_point"] = str(trial.user_attrs["grid_point"])
        experiment = mlflow.get_experiment_by_name(self.job.experiment).experiment_id
        run = mlflow.MlflowClient().create_run(experiment, tags=tags, run_name=f"trial-{trial.number}")
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        return run.info.run_id


class ReportEpochs(keras.callbacks.Callback):
    """Reports each epoch's val_accuracy to the trial, at the epoch's number from 1 (as the run's
    metric steps), and raises TrialPruned when the pruner says so."""

    def __init__(self, trial: optuna.Trial):
        super().__init__()
        self.trial, self.reported = trial, []

    def on_epoch_end(self, epoch, logs=None):
        self.trial.report(float(logs["val_accuracy"]), epoch + 1)
        self.reported.append(epoch + 1)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch + 1}")


def end_run(run_id: str, state: str, status: str | None = None, **tags) -> None:
    """Tag a trial's run with its Optuna state and set its status if train did not: a pruned
    trial was stopped on purpose, before the end: KILLED, not FAILED."""
    client = mlflow.MlflowClient()
    for key, value in {"optuna_state": state, **tags}.items():
        client.set_tag(run_id, key, value)
    if status:
        client.set_terminated(run_id, status)


def record_memory(trial: optuna.Trial, run_id: str) -> None:
    """The process's memory after the trial, as trial user attrs and run metrics: rss_mb (resident
    now, the Keras session cleared) and peak_rss_mb (its high-water mark: the peak of this trial
    and of the trials its process ran before)."""
    keras.backend.clear_session(free_memory=True)
    memory = rss_mb()
    for key, value in memory.items():
        trial.set_user_attr(key, value)
        mlflow.MlflowClient().log_metric(run_id, key, value)


def rss_mb() -> dict[str, float]:
    """{"rss_mb": ..., "peak_rss_mb": ...} of this process from /proc/self/status; {} elsewhere."""
    status = Path("/proc/self/status")
    if not status.exists():
        return {}
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024, "peak_rss_mb": int(fields["VmHWM"].split()[0]) / 1024}
