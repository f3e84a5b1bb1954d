"""The model registry: register a logged model with where it came from, and keep the `champion` alias.

One registered model per dataset (`<dataset>-resnet50` unless named). Besides MLflow's own
`source` (the model URI) and `run_id` (the train run), each version carries a few tags (TAGS):
the data it learnt from (data_digest), the two scores the champion rule and a reader need
(best_val_accuracy, test_accuracy) and why it is or is not champion (champion_decision, which
names the version it was compared with and both figures; compared_version for queries). The
parameters, class names and whole config are in the model card (pipeline.card, in the version's
metadata), the other metrics in the source run.

The champion rule (models:/<name>@champion is what predict and serve use):
- no champion yet: the new version becomes champion;
- champion trained on the same data (same data_digest): the new version takes the alias only if
  its best_val_accuracy is strictly higher. Validation, never test: selection must not see the
  test split;
- champion trained on other data (another data_digest: another max_per_class, split or
  re-prepared images): both models are scored on the shared validation rows, the new version's
  validation images that the champion neither trained on nor was tested on (by content sha1,
  from both prepared-data manifests); never a test image of either. The new version takes the
  alias only if its accuracy there is strictly higher, on at least MIN_SHARED_ROWS rows. Fewer
  rows, other class names, or unreadable prepared data or images: the alias stays; the decision
  then says how many shared rows there were, both accuracies and both data digests.
Promote by hand with `MlflowClient().set_registered_model_alias(name, "champion", version)`.
"""

from dataclasses import asdict, dataclass

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from pipeline import prepared
from pipeline.card import ModelCard, load_model, read_card
from pipeline.config import PipelineError

CHAMPION = "champion"
SELECT_ON = "best_val_accuracy"  # validation: the test split is for reporting only
METRICS = ("best_val_accuracy", "test_accuracy")  # the scores a version carries as tags; the rest stay in its run
TAGS = ("data_digest", *METRICS, "champion_decision", "compared_version")  # every tag a version can carry
TABLE_PARAMS = ("hidden_layers", "units", "learning_rate")  # `models list`'s columns, from the model card
MIN_SHARED_ROWS = 5  # validation rows both models can be scored on, to compare models on other data


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
    (best_val_accuracy, test_accuracy: METRICS); grid and tune pass nothing and their best run's
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
    scores = {k: v for k, v in (_run_metrics(run_id) | (metrics or {})).items() if k in METRICS}
    tags = _version_tags(card, scores)
    version = mlflow.register_model(model_uri, name, tags=tags).version
    promote, decision, comparison = _champion_decision(client, name, tags, model_uri, card)
    if promote:
        client.set_registered_model_alias(name, CHAMPION, version)
    for key, value in {**comparison, "champion_decision": decision}.items():
        client.set_model_version_tag(name, version, key, value)
    print(f"registered {name} version {version}: {decision}")
    return Registration(name, str(version), f"models:/{name}/{version}", promote, decision)


def _registered_version(client, name: str, model_uri: str):
    """The version of name registered from model_uri, if any."""
    try:
        found = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    version = next((v.version for v in found if v.source == model_uri), None)
    return client.get_model_version(name, version) if version else None  # search leaves aliases out


def _run_metrics(run_id: str | None) -> dict[str, float]:
    return mlflow.get_run(run_id).data.metrics if run_id else {}


def _version_tags(card: ModelCard, scores: dict) -> dict[str, str]:
    return {"data_digest": card.data_digest} | {k: score_text(v) for k, v in scores.items()}


def score_text(value: float) -> str:
    """A score as a tag: 6 significant digits, without float32's noise (0.7, not 0.699999988079071).

    The champion rule compares best_val_accuracy tags of versions trained on the same data
    (same data_digest), so with the same number n of validation images: accuracies k/n, which
    differ by at least 1/n. 6 significant digits (rounding by at most 5e-7) keep any two of them
    apart for n below 1,000,000 images."""
    return f"{float(value):.6g}"


def _score(tag: str | None) -> float:
    """A score tag read back, NaN if missing. Versions registered before score_text carry
    repr(float32) tags (0.699999988079071): rounded alike, so that the same score ties."""
    return float(score_text(float(tag))) if tag else float("nan")


def _champion_decision(client, name: str, new: dict[str, str], model_uri: str,
                       card: ModelCard) -> tuple[bool, str, dict]:
    """(move the alias?, why, {"compared_version": the champion's version} or {}) for a new version."""
    if SELECT_ON not in new:
        return False, f"not champion: the version has no {SELECT_ON} to compare", {}
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return True, f"champion: the first version with a {SELECT_ON}", {}
    old = champion.tags
    compared = {"compared_version": str(champion.version)}
    if old.get("data_digest") != new["data_digest"]:
        promote, decision = _compare_on_shared_rows(f"models:/{name}/{champion.version}", champion.version,
                                                    model_uri, card)
        return promote, decision, compared
    ours, theirs = _score(new[SELECT_ON]), _score(old.get(SELECT_ON))
    if ours > theirs or theirs != theirs:  # theirs != theirs: the champion has no score (NaN)
        return True, f"champion: {SELECT_ON} {ours:.4f} beats version {champion.version}'s {theirs:.4f}", compared
    return (False, f"not champion: {SELECT_ON} {ours:.4f} does not beat version {champion.version}'s {theirs:.4f}",
            compared)


def _compare_on_shared_rows(champion_uri: str, version: str, model_uri: str, card: ModelCard) -> tuple[bool, str]:
    """Both models' accuracy on the shared validation rows (see the module's docstring)."""
    theirs_card, _ = read_card(champion_uri)
    digests = f"data {card.data_digest} against version {version}'s {theirs_card.data_digest}"
    if list(theirs_card.class_names) != list(card.class_names):
        return False, f"not champion: version {version} has other classes ({digests}); promote by hand"
    try:
        rows = shared_validation_rows(card, theirs_card)
    except PipelineError as e:
        return False, f"not champion: cannot compare with version {version} on shared rows ({e})"
    if len(rows) < MIN_SHARED_ROWS:
        return False, (f"not champion: only {len(rows)} validation row(s) that version {version} did not train "
                       f"or test on, fewer than {MIN_SHARED_ROWS} ({digests}); promote by hand")
    ours, theirs = accuracy_on(model_uri, rows), accuracy_on(champion_uri, rows)
    verdict = "beats" if ours > theirs else "does not beat"
    decision = (f"{'champion' if ours > theirs else 'not champion'}: accuracy {ours:.4f} on {len(rows)} shared "
                f"validation rows {verdict} version {version}'s {theirs:.4f} ({digests})")
    return ours > theirs, decision


def shared_validation_rows(challenger: ModelCard, champion: ModelCard) -> pd.DataFrame:
    """The challenger's validation rows (path, label, sha1) whose image the champion neither trained
    on nor was tested on, nor the challenger was tested or trained on, by content sha1; from both
    models' prepared-data manifests (card.config["data"])."""
    ours, theirs = (prepared.load(c.config["data"]).manifest for c in (challenger, champion))
    seen = set(theirs.loc[theirs["split"].isin(["train", "test"]), "sha1"])
    seen |= set(ours.loc[ours["split"].isin(["train", "test"]), "sha1"])
    val = ours[ours["split"] == "val"]
    return val[~val["sha1"].isin(seen)].drop_duplicates("sha1")[["path", "label", "sha1"]].reset_index(drop=True)


def accuracy_on(model_uri: str, rows: pd.DataFrame, batch_size: int = 32) -> float:
    """The accuracy of the model at model_uri on rows (path, label), run as predict runs it."""
    from pipeline.predict import file_probabilities

    model, card, _ = load_model(model_uri)
    # TensorFlow, not OpenVINO: a second OpenVINO model in a process that has run training hung
    # in AsyncInferQueue once (not understood yet); a few hundred validation images are cheap.
    probs = file_probabilities(model, card, rows["path"].tolist(), "tensorflow", batch_size)
    return float(np.mean(np.array(card.class_names)[probs.argmax(axis=1)] == rows["label"].to_numpy()))


def versions(name: str | None = None) -> pd.DataFrame:
    """One row per version of the registered model name (every registered model if None):
    name, version, aliases, source run, data digest, key parameters (TABLE_PARAMS, from the model
    card), best_val_accuracy and test_accuracy (from the tags), created."""
    return _versions_and_cards(name)[0]


def _versions_and_cards(name: str | None) -> tuple[pd.DataFrame, dict]:
    """(versions(name), each version's model card by (name, version), None for a model this
    pipeline did not log): a card is read once, for the table and for describe."""
    client = mlflow.MlflowClient()
    if name is not None:
        _require_model(client, name)
    found = client.search_model_versions(f"name = '{name}'" if name else None)
    aliases = _aliases(client, {v.name for v in found})
    cards = {(v.name, str(v.version)): _card_or_none(v.name, v.version) for v in found}
    rows = [{"name": v.name, "version": int(v.version), "aliases": ",".join(aliases.get((v.name, str(v.version)), [])),
             "source_run": v.run_id or "", "data_digest": v.tags.get("data_digest", ""),
             **_parameters(cards[(v.name, str(v.version))]), **{k: _score(v.tags.get(k)) for k in METRICS},
             "created": pd.to_datetime(v.creation_timestamp, unit="ms").strftime("%Y-%m-%d %H:%M")}
            for v in found]
    columns = ["name", "version", "aliases", "source_run", "data_digest", *TABLE_PARAMS, *METRICS, "created"]
    return pd.DataFrame(rows, columns=columns).sort_values(["name", "version"]).reset_index(drop=True), cards


def _card_or_none(name: str, version) -> ModelCard | None:
    try:
        return read_card(f"models:/{name}/{version}")[0]
    except PipelineError:
        return None


def _parameters(card: ModelCard | None) -> dict[str, str]:
    """TABLE_PARAMS of a version, from its model card; blank for a model this pipeline did not log."""
    if card is None:
        return dict.fromkeys(TABLE_PARAMS, "")
    return {k: str(card.config.get(k, "")) for k in TABLE_PARAMS}


def describe(name: str) -> tuple[pd.DataFrame, list[dict]]:
    """(versions(name), one dict per version: version, aliases, metrics, champion decision, the
    version it was compared with, and its model card) for `models show`."""
    table, cards = _versions_and_cards(name)
    client = mlflow.MlflowClient()
    details = []
    for row in table.itertuples():
        tags = client.get_model_version(name, str(row.version)).tags
        # a model this pipeline did not log: read_card's one-line error, as before
        card = cards[(name, str(row.version))] or read_card(f"models:/{name}/{row.version}")[0]
        details.append({"version": row.version, "aliases": row.aliases,
                        "metrics": {k: _score(tags[k]) for k in METRICS if k in tags},
                        "champion_decision": tags.get("champion_decision", ""),
                        **{k: tags[k] for k in ("compared_version",) if k in tags}, "card": asdict(card)})
    return table, details


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
