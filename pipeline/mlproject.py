"""MLproject and the README's parameter table, generated from the step configs:
`python -m pipeline.mlproject` rewrites both.

Every entry point is a step of pipeline.cli with one parameter per config field (same name, type
and default), passed on to the command as --field-name; tests/test_cli.py checks both are current.
"""

from dataclasses import MISSING
from pathlib import Path

from pipeline.cli import STEPS
from pipeline.config import parameters

HEADER = """# Entry points of the pipeline, generated from pipeline/config.py by `python -m pipeline.mlproject`
# (tests/test_cli.py checks it is current). Run with `mlflow run . -e STEP -P name=value`.
name: resnet50-pipeline

conda_env: conda.yaml

entry_points:
"""
TYPES = {int: "int", float: "float", str: "string"}


def render() -> str:
    lines = [HEADER.rstrip("\n")]
    for step, (cls, _, _) in STEPS.items():
        lines += [f"  {step}:", "    parameters:"]
        ordered = sorted(parameters(cls), key=lambda f: f.default is not MISSING)  # required ones first
        for f in ordered:
            kind = TYPES[f.type if isinstance(f.type, type) else eval(f.type)]
            if f.default is MISSING:
                lines.append(f"      {f.name}: {kind}")
            else:
                default = f.default if f.default != "" else '""'
                lines.append(f"      {f.name}: {{type: {kind}, default: {default}}}")
        options = " ".join(f"--{f.name.replace('_', '-')} {{{f.name}}}" for f in ordered)
        lines += ["    command: >-", f"      python -m pipeline {step} {options}"]
    return "\n".join(lines) + "\n"


def parameter_table() -> str:
    """The README's table: each parameter once, with the entry points that take it, its default and
    help (per entry point where they differ, e.g. output: predictions.csv for predict, report.md for report)."""
    seen = {}
    for step, (cls, _, _) in STEPS.items():
        for f in parameters(cls):
            seen.setdefault(f.name, []).append((step, f))
    lines = ["| parameter | entry points | default | meaning |", "| --- | --- | --- | --- |"]
    for name, taken in seen.items():
        defaults = {step: _default(f) for step, f in taken}
        helps = {step: f.metadata.get("help", "") for step, f in taken}
        default = _per_step(defaults, "{value} ({step})", ", ")
        meaning = _per_step(helps, "{step}: {value}", "; ")
        lines.append(f"| `{name}` | {', '.join(defaults)} | {default} | {meaning} |")
    return "\n".join(lines)


def _default(f) -> str:
    return "required" if f.default is MISSING else ('""' if f.default == "" else f"`{f.default}`")


def _per_step(values: dict[str, str], form: str, sep: str) -> str:
    """The one value all steps share, or each value with the steps that have it."""
    groups = {}
    for step, value in values.items():
        groups.setdefault(value, []).append(step)
    if len(groups) == 1:
        return next(iter(groups))
    return sep.join(form.format(step=", ".join(steps), value=value) for value, steps in groups.items())


def with_table(readme: str) -> str:
    """readme with the text between its parameter-table markers replaced by parameter_table()."""
    start, end = readme.index(TABLE_START) + len(TABLE_START), readme.index(TABLE_END)
    return readme[:start] + "\n" + parameter_table() + "\n" + readme[end:]


TABLE_START, TABLE_END = "<!-- parameters: python -m pipeline.mlproject -->", "<!-- end of parameters -->"

if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    (root / "MLproject").write_text(render())
    (root / "README.md").write_text(with_table((root / "README.md").read_text()))
