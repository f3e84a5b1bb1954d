"""MLproject and the README's parameter table, generated from the step configs:
`python -m pipeline.mlproject` rewrites both.

Every entry point is a step of pipeline.cli with one parameter per config field (same name, type
and default), passed on to the command as --field-name; tests/test_cli.py checks both are current.
"""

from dataclasses import MISSING, fields
from pathlib import Path

from pipeline.cli import STEPS

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
        ordered = sorted(fields(cls), key=lambda f: f.default is not MISSING)  # required ones first
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
    """The README's table: each parameter once, with the entry points that take it, its default and help."""
    seen = {}
    for step, (cls, _, _) in STEPS.items():
        for f in fields(cls):
            seen.setdefault(f.name, (f, []))[1].append(step)
    lines = ["| parameter | entry points | default | meaning |", "| --- | --- | --- | --- |"]
    for name, (f, steps) in seen.items():
        default = "required" if f.default is MISSING else ('""' if f.default == "" else f"`{f.default}`")
        lines.append(f"| `{name}` | {', '.join(steps)} | {default} | {f.metadata.get('help', '')} |")
    return "\n".join(lines)


def with_table(readme: str) -> str:
    """readme with the text between its parameter-table markers replaced by parameter_table()."""
    start, end = readme.index(TABLE_START) + len(TABLE_START), readme.index(TABLE_END)
    return readme[:start] + "\n" + parameter_table() + "\n" + readme[end:]


TABLE_START, TABLE_END = "<!-- parameters: python -m pipeline.mlproject -->", "<!-- end of parameters -->"

if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    (root / "MLproject").write_text(render())
    (root / "README.md").write_text(with_table((root / "README.md").read_text()))
