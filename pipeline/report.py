"""Step: a Markdown report of one dataset's experiment, to paste into an issue or a wiki.

It holds the studies' table over every finished train run, the best run's learning curves and
confusion matrix (copied beside the report under plots/), and the registered champion.
"""

from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd

from pipeline import registry
from pipeline.config import PipelineError, ReportConfig

# The studies' column names, from what train and evaluate log.
COLUMNS = {"params.hidden_layers": "Hidden Layer", "params.units": "Dense Count",
           "params.learning_rate": "Learning Rate", "metrics.test_accuracy": "Accuracy",
           "metrics.learning_time_s": "Learning Time(ms)"}


@dataclass(frozen=True)
class ReportResult:
    output: str
    runs: int  # finished train runs in the table
    best_run_id: str  # highest best_val_accuracy (validation, not test, picks the best)


def report(cfg: ReportConfig) -> ReportResult:
    """Write cfg.output for the experiment cfg.experiment (default: the dataset's name).

    The table has one row per FINISHED train run (Accuracy is test_accuracy, copied onto the
    train run by evaluate). Fails in one line if the experiment or its train runs are missing.
    """
    dataset = Path(cfg.dataset.rstrip("/")).name  # a folder dataset's experiment is its folder's name
    experiment = cfg.experiment or dataset
    runs = _train_runs(experiment)
    best = runs.sort_values("metrics.best_val_accuracy", ascending=False, na_position="last").iloc[0]
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figures = _download_figures(best, output.parent.resolve())
    name = cfg.registered_model or registry.default_name(dataset)
    sections = [f"# {experiment}: ResNet50 fine-tuning runs", _markdown(_studies_table(runs)),
                _best_section(best, figures), _champion_section(name)]
    output.write_text("\n\n".join(sections) + "\n")
    print(f"wrote {output} ({len(runs)} train run(s), best {best['run_id']})")
    return ReportResult(str(output), len(runs), best["run_id"])


def _train_runs(experiment: str) -> pd.DataFrame:
    if mlflow.get_experiment_by_name(experiment) is None:
        raise PipelineError(f"no experiment {experiment!r}: run main on the dataset first, or name the "
                            "experiment with --experiment")
    runs = mlflow.search_runs(experiment_names=[experiment],
                              filter_string="tags.step = 'train' and attributes.status = 'FINISHED'")
    if runs.empty:
        raise PipelineError(f"experiment {experiment!r} has no finished train run: run main or train first")
    for column in [*COLUMNS, "metrics.best_val_accuracy"]:
        if column not in runs:
            runs[column] = float("nan")  # e.g. no run evaluated yet
    return runs


def _studies_table(runs: pd.DataFrame) -> pd.DataFrame:
    table = runs.sort_values("metrics.test_accuracy", ascending=False, na_position="last")
    # The run's name (point-3 of a grid, trial-12 of a search, train of a main run) and its id.
    name = table.get("tags.mlflow.runName", pd.Series("run", index=table.index)).fillna("run")
    table = table.assign(Model=name + " `" + table["run_id"].str[:8] + "`").rename(columns=COLUMNS)
    table["Accuracy"] = table["Accuracy"].map(lambda v: f"{v:.4f}")
    table["Learning Time(ms)"] = table["Learning Time(ms)"].map(lambda v: f"{v * 1000:.0f}")
    return table[["Model", *COLUMNS.values()]]


def _markdown(table: pd.DataFrame) -> str:
    """A pipe table (pandas' to_markdown would need tabulate for this)."""
    lines = [list(table.columns), ["---"] * len(table.columns), *table.astype(str).to_numpy().tolist()]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _download_figures(best: pd.Series, folder: Path) -> dict[str, str]:
    """Copy the best run's learning curves and its evaluation's confusion matrix to folder/plots/."""
    sources = {"learning curves": (best["run_id"], "plots/learning_curves.png")}
    evaluations = mlflow.search_runs(experiment_ids=[best["experiment_id"]],
                                     filter_string=f"tags.source_run_id = '{best['run_id']}' and tags.step = 'evaluate'")
    if not evaluations.empty:
        sources["confusion matrix"] = (evaluations["run_id"].iloc[0], "plots/confusion_matrix.png")
    figures = {}
    for title, (run_id, path) in sources.items():
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(folder / "plots"))
            figures[title] = Path(local).relative_to(folder.resolve()).as_posix()
        except Exception as e:  # a missing figure should not lose the whole report
            print(f"note: no {title} for run {run_id} ({type(e).__name__})")
    return figures


def _best_section(best: pd.Series, figures: dict[str, str]) -> str:
    lines = [f"## Best run: `{best['run_id']}` (highest validation accuracy)", "",
             f"best_val_accuracy {best['metrics.best_val_accuracy']:.4f}, test_accuracy "
             f"{best['metrics.test_accuracy']:.4f}; hidden_layers {best['params.hidden_layers']}, units "
             f"{best['params.units']}, learning_rate {best['params.learning_rate']}"]
    lines += [f"\n![{title}]({path})" for title, path in figures.items()]
    return "\n".join(lines)


def _champion_section(name: str) -> str:
    version = registry.champion(name)
    if version is None:
        return f"## Champion\n\nNo champion: no version of registered model `{name}` has the alias yet."
    tags = version.tags
    return (f"## Champion\n\n`models:/{name}@{registry.CHAMPION}` is version {version.version} "
            f"(source run `{tags.get('source_run_id', '')}`, data digest `{tags.get('data_digest', '')}`): "
            f"best_val_accuracy {float(tags.get('best_val_accuracy', 'nan')):.4f}, "
            f"test_accuracy {float(tags.get('test_accuracy', 'nan')):.4f}.")
