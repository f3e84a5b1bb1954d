"""The model registry: register a logged model with where it came from, and keep the `champion` alias.

One registered model per dataset (`<dataset>-resnet50` unless named). Each version carries tags
saying where it came from (dataset, data_digest, source_run_id, model_uri, param.<name> for the
training config) and its metrics (best_val_accuracy, test_accuracy, ...), so a version describes
itself even after its runs are deleted.

The champion rule (models:/<name>@champion is what predict and serve use):
- no champion yet: the new version becomes champion;
- champion trained on the same data (same data_digest): the new version takes the alias only if
  its best_val_accuracy is strictly higher. Validation, never test: selection must not see the
  test split;
- champion trained on different data (another data_digest, e.g. a different max_per_class or
  re-prepared images): the alias stays. Accuracies on different validation sets do not compare,
  and an automatic step must not replace a served model on a number that means something else.
  Promote by hand once you have compared them:
  `MlflowClient().set_registered_model_alias(name, "champion", version)`.
The reason is written on the version as the tag `champion_decision`.
"""

from dataclasses import dataclass

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from pipeline.card import ModelCard, read_card
from pipeline.config import PipelineError

CHAMPION = "champion"
SELECT_ON = "best_val_accuracy"  # validation: the test split is for reporting only
METRICS = ("best_val_accuracy", "best_val_loss", "test_accuracy", "test_macro_f1", "test_loss", "learning_time_s")
TABLE_PARAMS = ("hidden_layers", "units", "learning_rate")


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    uri: str  # models:/<name>/<version>
    champion: bool  # whether this version holds the champion alias now
    decision: str  # why it does or does not


def default_name(dataset: str) -> str:
    return f"{dataset}-resnet50"


def register(model_uri: str, registered_model: str = "", metrics: dict[str, float] | None = None,
             if_new: bool = False) -> Registration:
    """Register model_uri (a model logged by train) and move `champion` to it if it is better.

    registered_model: the name; "" means <dataset>-resnet50, the dataset read from the model's
    metadata. metrics: overrides of the metrics read from the run that logged the model
    (best_val_accuracy, test_accuracy, ...); grid and tune pass nothing and their best run's
    model URI. if_new: return the version already registered from model_uri, if there is one
    (a grid re-run whose points were all reused registers nothing new). Returns the version and
    whether it is now the champion, and why.
    """
    card, run_id = read_card(model_uri)
    name = registered_model or default_name(card.dataset)
    client = mlflow.MlflowClient()
    known = _registered_version(client, name, model_uri) if if_new else None
    if known:
        return Registration(name, str(known.version), f"models:/{name}/{known.version}",
                            CHAMPION in known.aliases, "already registered")
    scores = {k: v for k, v in _run_metrics(run_id).items() if k in METRICS} | (metrics or {})
    tags = _version_tags(model_uri, run_id, card, scores)
    version = mlflow.register_model(model_uri, name, tags=tags).version
    promote, decision = _champion_decision(client, name, tags)
    if promote:
        client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "champion_decision", decision)
    print(f"registered {name} version {version}: {decision}")
    return Registration(name, str(version), f"models:/{name}/{version}", promote, decision)


def _registered_version(client, name: str, model_uri: str):
    """The version of name registered from model_uri, if any."""
    try:
        found = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    version = next((v.version for v in found if v.tags.get("model_uri") == model_uri), None)
    return client.get_model_version(name, version) if version else None  # search leaves aliases out


def _run_metrics(run_id: str | None) -> dict[str, float]:
    return mlflow.get_run(run_id).data.metrics if run_id else {}


def _version_tags(model_uri: str, run_id: str | None, card: ModelCard, scores: dict) -> dict[str, str]:
    tags = {"dataset": card.dataset, "data_digest": card.data_digest, "source_run_id": run_id or "",
            "model_uri": model_uri}
    tags |= {f"param.{k}": str(v) for k, v in card.config.items()}
    return tags | {k: repr(float(v)) for k, v in scores.items()}


def _champion_decision(client, name: str, new: dict[str, str]) -> tuple[bool, str]:
    """(move the alias?, why) for a new version's tags against the current champion's."""
    if SELECT_ON not in new:
        return False, f"not champion: the version has no {SELECT_ON} to compare"
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return True, f"champion: the first version with a {SELECT_ON}"
    old = champion.tags
    if old.get("data_digest") != new["data_digest"]:
        return False, (f"not champion: champion version {champion.version} was trained on other data "
                       f"(digest {old.get('data_digest')!r}, this one {new['data_digest']!r}); "
                       "their accuracies do not compare, promote by hand if this one is better")
    ours, theirs = float(new[SELECT_ON]), float(old.get(SELECT_ON, "nan"))
    if ours > theirs or theirs != theirs:  # theirs != theirs: the champion has no score (NaN)
        return True, f"champion: {SELECT_ON} {ours:.4f} beats version {champion.version}'s {theirs:.4f}"
    return False, f"not champion: {SELECT_ON} {ours:.4f} does not beat version {champion.version}'s {theirs:.4f}"


def versions(name: str | None = None) -> pd.DataFrame:
    """One row per version of the registered model name (every registered model if None):
    name, version, aliases, source run, data digest, key parameters and metrics, created."""
    client = mlflow.MlflowClient()
    if name is not None:
        _require_model(client, name)
    found = client.search_model_versions(f"name = '{name}'" if name else None)
    aliases = _aliases(client, {v.name for v in found})
    rows = [{"name": v.name, "version": int(v.version), "aliases": ",".join(aliases.get((v.name, str(v.version)), [])),
             "source_run": v.tags.get("source_run_id", v.run_id or ""), "data_digest": v.tags.get("data_digest", ""),
             **{k: v.tags.get(f"param.{k}", "") for k in TABLE_PARAMS},
             **{k: float(v.tags.get(k, "nan")) for k in ("best_val_accuracy", "test_accuracy")},
             "created": pd.to_datetime(v.creation_timestamp, unit="ms").strftime("%Y-%m-%d %H:%M")}
            for v in found]
    columns = ["name", "version", "aliases", "source_run", "data_digest", *TABLE_PARAMS, "best_val_accuracy",
               "test_accuracy", "created"]
    return pd.DataFrame(rows, columns=columns).sort_values(["name", "version"]).reset_index(drop=True)


def _require_model(client, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise PipelineError(f"no registered model {name!r}: `python -m pipeline models list` shows "
                            "the registered models") from None


def _aliases(client, names) -> dict[tuple[str, str], list[str]]:
    """(name, version) -> its aliases, from the registered models (where MLflow keeps them)."""
    out = {}
    for name in names:
        for alias, version in client.get_registered_model(name).aliases.items():
            out.setdefault((name, str(version)), []).append(alias)
    return out


def champion(name: str):
    """The champion ModelVersion of a registered model, or None if it has none (or no such model)."""
    try:
        return mlflow.MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
