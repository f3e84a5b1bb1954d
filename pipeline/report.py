"""Step: a report of one dataset's experiment, as Markdown (to paste into an issue or a wiki) and
as HTML (to open in a browser), with its figures beside it under plots/.

One section per prepared dataset (runs trained on different data do not compare): its name,
digest and counts, the studies' table over its finished train runs (main's, grid points,
trials), and its best run (highest validation accuracy) with learning curves and confusion
matrix, wherever that run came from, and why it is or is not the registered champion.
"""

import html
import re
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd

from pipeline import registry
from pipeline.config import PipelineError, ReportConfig
from pipeline.tracking import entry_point_run

# The studies' column names, from what train and evaluate log; then validation accuracy, which picks the best.
COLUMNS = {"params.hidden_layers": "Hidden Layer", "params.units": "Dense Count",
           "params.learning_rate": "Learning Rate", "metrics.test_accuracy": "Accuracy",
           "metrics.learning_time_s": "Learning Time(ms)", "metrics.best_val_accuracy": "Val Accuracy"}
FIGURES = {"learning curves": "plots/learning_curves.png", "confusion matrix": "plots/confusion_matrix.png"}


@dataclass(frozen=True)
class ReportResult:
    output: str  # the Markdown file; the HTML one is beside it (.html)
    runs: int  # finished train runs in the tables
    best_run_id: str  # the best run of the most recently trained data (validation, not test, picks it)


def report(cfg: ReportConfig) -> ReportResult:
    """Write cfg.output (Markdown) and the same report as HTML beside it, for the experiment
    cfg.experiment (default: the dataset's name). Fails in one line if the experiment or its
    finished train runs are missing. Under `mlflow run -e report` MLflow's run gets both files
    and their figures (plots/...) as artifacts."""
    dataset = Path(cfg.dataset.rstrip("/")).name  # a folder dataset's experiment is its folder's name
    with entry_point_run("report", cfg, dataset) as run:
        result, figures = _write(cfg, dataset)
        if run:
            _log_to_run(Path(result.output), figures)
    return result


def _write(cfg: ReportConfig, dataset: str) -> tuple[ReportResult, list[str]]:
    """(the report's result, its figures' paths relative to its folder)."""
    experiment = cfg.experiment or dataset
    runs = _train_runs(experiment)
    name = cfg.registered_model or registry.default_name(dataset)
    versions = _versions(name)
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    blocks, bests, figures = [("h1", f"{experiment}: ResNet50 fine-tuning runs")], [], []
    for digest, group in runs.groupby("tags.data_digest", sort=False, dropna=False):  # most recent data first
        # On a tie the first trained wins, as in the grid.
        best = (group.sort_values("start_time").sort_values("metrics.best_val_accuracy", ascending=False,
                                                            na_position="last", kind="stable").iloc[0])
        bests.append(best["run_id"])
        shown = _download_figures(best, output.parent.resolve())
        figures += shown.values()
        blocks += _data_blocks(group, digest)
        blocks += [("table", _studies_table(group, versions))]
        blocks += _best_blocks(best, versions, shown)
    blocks += _champion_blocks(name, versions)
    output.write_text(markdown(blocks))
    output.with_suffix(".html").write_text(page(blocks, f"{experiment}: ResNet50 fine-tuning runs"))
    print(f"wrote {output} and {output.with_suffix('.html')} ({len(runs)} train run(s), best {bests[0]})")
    return ReportResult(str(output), len(runs), bests[0]), figures


def _log_to_run(output: Path, figures: list[str]) -> None:
    """The report's two files, and its figures where the HTML page finds them, on the active run."""
    mlflow.log_artifact(str(output))
    mlflow.log_artifact(str(output.with_suffix(".html")))
    for figure in figures:  # relative to the report's folder: plots/<run id>/<name>.png
        mlflow.log_artifact(str(output.parent / figure), str(Path(figure).parent))


def _train_runs(experiment: str) -> pd.DataFrame:
    if mlflow.get_experiment_by_name(experiment) is None:
        raise PipelineError(f"no experiment {experiment!r}: run main on the dataset first, or name the "
                            "experiment with --experiment")
    runs = mlflow.search_runs(experiment_names=[experiment], order_by=["attributes.start_time DESC"],
                              filter_string="tags.step = 'train' and attributes.status = 'FINISHED'")
    if runs.empty:
        raise PipelineError(f"experiment {experiment!r} has no finished train run: run main or train first")
    for column in [*COLUMNS, "tags.data_digest", "tags.mlflow.runName"]:
        if column not in runs:
            runs[column] = float("nan") if column.startswith("metrics.") else None  # e.g. no run evaluated yet
    runs["tags.data_digest"] = runs["tags.data_digest"].fillna("unknown")
    return runs


def _versions(name: str) -> pd.DataFrame:
    """Every version of the registered model: version, source run, data digest, champion, why."""
    found = mlflow.MlflowClient().search_model_versions(f"name = '{name}'")
    champion = registry.champion(name)
    rows = [{"version": v.version, "run_id": v.run_id or "",
             "data_digest": v.tags.get("data_digest", ""), "decision": v.tags.get("champion_decision", ""),
             "champion": champion is not None and v.version == champion.version} for v in found]
    return pd.DataFrame(rows, columns=["version", "run_id", "data_digest", "decision", "champion"])


def _data_blocks(group: pd.DataFrame, digest: str) -> list:
    """The prepared data's name, digest and counts (class x split), from a run that prepared it."""
    prepared = mlflow.search_runs(experiment_ids=list(group["experiment_id"].unique()),
                                  filter_string=f"tags.data_digest = '{digest}' and metrics.n_train > 0")
    title = f"Data `{digest[:12]}`"
    if prepared.empty:
        return [("h2", title), ("p", "The run that prepared this data is not in this experiment.")]
    run_id = prepared["run_id"].iloc[0]
    info = mlflow.artifacts.load_dict(f"runs:/{run_id}/data/dataset.json")
    counts = pd.read_csv(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/data/counts.csv")).set_index("label")
    counts.loc["total"] = counts.sum()
    return [("h2", f"Data: {info.get('name', '')} `{digest[:12]}`"),
            ("p", f"Digest `{digest}`, prepared by run `{run_id}`; {len(group)} finished train run(s) on it. "
                  "Images per class and split:"),
            ("table", counts.reset_index())]


def _studies_table(runs: pd.DataFrame, versions: pd.DataFrame) -> pd.DataFrame:
    """The studies' table, best test accuracy first; the champion's row is marked."""
    table = runs.sort_values("metrics.test_accuracy", ascending=False, na_position="last")
    # The run's name (point-3 of a grid, trial-12 of a search, train of a main run) and its id.
    champions = set(versions.loc[versions["champion"], "run_id"])
    model = (table["tags.mlflow.runName"].fillna("run") + " `" + table["run_id"].str[:8] + "`"
             + table["run_id"].map(lambda r: " **champion**" if r in champions else ""))
    table = table.assign(Model=model).rename(columns=COLUMNS)
    for column in ("Accuracy", "Val Accuracy"):
        table[column] = table[column].map(lambda v: "not tested" if pd.isna(v) else f"{v:.4f}")
    table["Learning Time(ms)"] = table["Learning Time(ms)"].map(lambda v: "" if pd.isna(v) else f"{v * 1000:.0f}")
    return table[["Model", *COLUMNS.values()]]


def _download_figures(best: pd.Series, folder: Path) -> dict[str, str]:
    """The best run's figures, copied to folder/plots/<run id>/: its learning curves, and the
    confusion matrix of its test evaluation, in the run itself (a grid point, a tune's best trial)
    or in an evaluate run of its model (main)."""
    client = mlflow.MlflowClient()
    evaluations = mlflow.search_runs(experiment_ids=[best["experiment_id"]], order_by=["attributes.start_time DESC"],
                                     filter_string=f"tags.source_run_id = '{best['run_id']}' and tags.step = 'evaluate'")
    figures = {}
    for title, path in FIGURES.items():
        for run_id in [best["run_id"], *evaluations["run_id"]]:
            if any(f.path == path for f in client.list_artifacts(run_id, "plots")):
                local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                            dst_path=str(folder / "plots" / best["run_id"][:8]))
                figures[title] = Path(local).relative_to(folder).as_posix()
                break
    return figures


def _best_blocks(best: pd.Series, versions: pd.DataFrame, figures: dict[str, str]) -> list:
    test = best["metrics.test_accuracy"]
    blocks = [("h3", f"Best run: {best['tags.mlflow.runName'] or 'run'} `{best['run_id']}` (highest validation accuracy)"),
              ("p", f"best_val_accuracy {best['metrics.best_val_accuracy']:.4f}, test_accuracy "
                    f"{'not tested' if pd.isna(test) else f'{test:.4f}'}; hidden_layers {best['params.hidden_layers']}, "
                    f"units {best['params.units']}, learning_rate {best['params.learning_rate']}. "
                    + _why_champion(best, versions))]
    blocks += [("img", title, path) for title, path in figures.items()]
    missing = [title for title in FIGURES if title not in figures]
    if missing:
        blocks.append(("p", f"No {' or '.join(missing)} logged for this run (a confusion matrix needs its model "
                            "evaluated on the test split)."))
    return blocks


def _why_champion(best: pd.Series, versions: pd.DataFrame) -> str:
    """Whether the best run's model is the registered champion, and why (the registry's decision)."""
    own = versions[versions["run_id"] == best["run_id"]]
    champion = versions[versions["champion"]]
    if own["champion"].any():
        return f"Its model is the champion (version {own['version'].iloc[0]})."
    if len(own):
        return f"Its model is version {own['version'].iloc[-1]}, {own['decision'].iloc[-1]}."
    why = ("Its model is not registered (main's model, a grid's best point and a study's best trial are; "
           f"`python -m pipeline log-model --run {best['run_id']}` logs it, `mlflow.register_model` registers it)")
    if len(champion) and champion["data_digest"].iloc[0] != best["tags.data_digest"]:
        why += f"; the champion, version {champion['version'].iloc[0]}, was trained on other data"
    return why + "."


def _champion_blocks(name: str, versions: pd.DataFrame) -> list:
    champion = registry.champion(name)
    if champion is None:
        return [("h2", "Champion"), ("p", f"No champion: no version of registered model `{name}` has the alias yet.")]
    tags = champion.tags
    return [("h2", "Champion"),
            ("p", f"`models:/{name}@{registry.CHAMPION}` is version {champion.version} (source run "
                  f"`{champion.run_id or ''}`, data digest `{tags.get('data_digest', '')[:12]}`): "
                  f"best_val_accuracy {float(tags.get('best_val_accuracy', 'nan')):.4f}, "
                  f"test_accuracy {float(tags.get('test_accuracy', 'nan')):.4f}; {tags.get('champion_decision', '')}."),
            ("table", versions.drop(columns="champion"))]


def markdown(blocks: list) -> str:
    """Blocks as Markdown; tables through pandas' to_markdown (tabulate)."""
    out = []
    for kind, *content in blocks:
        if kind == "table":
            out.append(content[0].to_markdown(index=False, disable_numparse=True))  # "0.5000" stays as formatted
        elif kind == "img":
            out.append(f"![{content[0]}]({content[1]})")
        else:
            out.append({"h1": "# ", "h2": "## ", "h3": "### ", "p": ""}[kind] + content[0])
    return "\n\n".join(out) + "\n"


def page(blocks: list, title: str) -> str:
    """Blocks as one HTML page that a browser opens with its images (relative to the page)."""
    out = []
    for kind, *content in blocks:
        if kind == "table":
            table = content[0].to_html(index=False, border=0, escape=True).replace("**champion**", "<b>champion</b>")
            out.append(re.sub(r"`([^`<]*)`", r"<code>\1</code>", table))
        elif kind == "img":
            out.append(f'<figure><img src="{html.escape(content[1])}" alt="{content[0]}" style="max-width:100%">'
                       f"<figcaption>{content[0]}</figcaption></figure>")
        else:
            text = html.escape(content[0])
            parts = text.split("`")  # `code` spans
            text = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
            out.append(f"<{kind}>{text}</{kind}>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head>\n<body>\n" + "\n".join(out) + "\n</body></html>\n")
