"""The shape of the code, kept by tests so that it cannot rot: layered packages with imports pointing down,
no import cycles, and DVC deps that cover every module a stage executes."""

from __future__ import annotations

import ast

import pytest
import yaml

from milora.stages import STAGES
from tests.imports import ROOT, all_modules, closure, files, imports_of

# Bottom to top: a package imports only packages at or below its own layer.
LAYERS = [
    ["milora.core"],
    ["milora.pipeline"],
    ["milora.model"],
    ["milora.data"],
    ["milora.evaluation"],
    ["milora.stages", "milora.tracking"],
    ["milora.cli"],
    ["flows"],
]
LEVEL = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def package_of(module: str) -> str:
    """`milora.core.svd` -> `milora.core`; `flows.steps` -> `flows`; the `milora` package itself -> `milora`."""
    parts = module.split(".")
    if parts[0] == "flows":
        return "flows"
    return ".".join(parts[:2]) if len(parts) > 1 else "milora"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_modules():
    graph = {m: set(imports_of(m)) for m in all_modules()}
    assert _cycles(graph) == []


def test_no_import_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    for m in all_modules():
        graph.setdefault(package_of(m), set()).update(package_of(i) for i in imports_of(m) if package_of(i) != package_of(m))
    assert _cycles(graph) == []


def test_imports_point_down():
    wrong = []
    for m in all_modules():
        src = package_of(m)
        for i in imports_of(m):
            dst = package_of(i)
            if src == "milora" or dst == "milora":  # the package root: a lazy facade over milora.core
                continue
            if LEVEL[dst] > LEVEL[src]:
                wrong.append(f"{m} imports {i} ({src} is below {dst})")
    assert wrong == []


def test_milora_never_imports_flows_and_only_the_cli_imports_the_cli():
    for m in all_modules():
        if m.startswith("milora"):
            assert not any(i.startswith("flows") for i in imports_of(m)), m
        if not m.startswith(("milora.cli", "flows.commands")):
            assert not any(i.startswith("milora.cli") for i in imports_of(m)), m


def test_the_layer_rules_see_the_imports_they_judge():
    """The import walker itself: a lazy import inside a function counts, `TYPE_CHECKING` imports do not."""
    assert "milora.core.adapter" in imports_of("milora.stages.svd")
    assert "milora.pipeline.config" in imports_of("milora.stages.__init__".removesuffix(".__init__"))
    assert "milora.core.adapter" not in imports_of("milora")  # only under TYPE_CHECKING / __getattr__
    assert "milora.tracking.registration" in imports_of("milora.cli.register")  # imported inside main()


# ------------------------------------------------------------------------------------------------ DVC deps


def _stage_deps() -> dict[str, list[str]]:
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    return {name: [d if isinstance(d, str) else next(iter(d)) for d in s.get("deps", [])] for name, s in dvc.items()}


def _entry_modules(stage: str) -> tuple[str, ...]:
    """What `milora stage NAME` runs: the console script's dispatcher, the `stage` command, the stage module
    (and for `train`, the `python -m milora.cli` it re-launches under torchrun)."""
    extra = ("milora.cli.__main__",) if stage == "train" else ()
    return ("milora.cli", "milora.cli.stage", f"milora.stages.{stage}", *extra)


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_deps_cover_every_module_the_stage_executes(stage):
    deps = _stage_deps()[stage]
    cmd = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"][stage]["cmd"]
    assert cmd == f"milora stage {stage}"
    executed = files(closure(*_entry_modules(stage)))
    uncovered = sorted(f for f in executed
                       if not any(f == d.rstrip("/") or f.startswith(d.rstrip("/") + "/") for d in deps))
    assert uncovered == [], f"add these to the deps of stage {stage!r} in dvc.yaml"


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_deps_name_no_code_the_stage_does_not_execute(stage):
    """Deps are exact: an edit re-runs the stages that run the edited code, and no others."""
    executed = files(closure(*_entry_modules(stage)))
    code = [d for d in _stage_deps()[stage] if d.startswith(("milora/", "flows/"))]
    extra = [d for d in code if not any(f == d or f.startswith(d.rstrip("/") + "/") for f in executed)]
    assert extra == []


def test_stage_modules_have_a_typed_run():
    for stage in STAGES:
        tree = ast.parse((ROOT / "milora" / "stages" / f"{stage}.py").read_text(encoding="utf-8"))
        run = next(f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "run")
        assert [ast.unparse(a.annotation) for a in run.args.args] == ["Config", "Paths"], stage
        assert ast.unparse(run.returns) == "None", stage


def test_no_flows_module_shadows_a_top_level_module():
    """Prefect loads a flow by its file path (`flows/pipeline.py:milora_pipeline`) with `flows/` on `sys.path`:
    a `flows/<name>.py` named like an installed package or a standard module (a `flows/dvc.py` once) would
    shadow it in the flow's process, e.g. `import dvc` finding `flows/dvc.py`."""
    import importlib.util
    import sys

    shadowing = [p.name for p in sorted((ROOT / "flows").glob("*.py")) if p.stem != "__init__"
                 and (p.stem in sys.stdlib_module_names or importlib.util.find_spec(p.stem) is not None)]
    assert shadowing == []


def test_make_test_runs_the_longest_files_first():
    """`tests/conftest.py` orders the files longest first; xdist keeps that order only under
    `--no-loadscope-reorder` (else it orders them by their number of tests), and a misspelt name would be ignored."""
    from tests.conftest import LONGEST_FIRST

    assert all((ROOT / "tests" / name).is_file() for name in LONGEST_FIRST), LONGEST_FIRST
    (line,) = [ln for ln in (ROOT / "Makefile").read_text().splitlines() if "-m pytest -n" in ln]
    assert "--dist loadfile" in line and "--no-loadscope-reorder" in line, line
