"""The package's shape: one package per stage, imports pointing down only, no import cycle (over `ast`, so imports
inside functions count too)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "ich_kaggle"

# layer of each top-level part: a module may import its own part or a part of a LOWER layer, nothing else
LAYERS = {
    "core": 0,
    "data": 1,
    "models": 2,
    "engine": 3,
    "recipes": 4,
    "train": 5,
    "predict": 5,
    "stack": 5,
    "submit": 5,
    "report": 5,
    "kaggle": 7,  # Kaggle artefacts by kind: code, weights, model (= the bundle, run as `apply` runs it), kernels
    "bench": 6,
    "docs": 6,  # docs: the README block written from the demo's saved output
    "bundle": 6,
    "apply": 6.5,  # apply runs bundles
    "demo": 7,  # the whole pipeline on the synthetic competition
    "serve": 7,  # the web app
    "commands": 8,  # each command's flags and handler
    "cli": 9,
    "__main__": 10,
}
# what core may import besides itself: it stays free of torch so scoring and validating are light anywhere
CORE_THIRD_PARTY = {"numpy", "pandas", "yaml", "tqdm"}  # the light ones among pyproject.toml's dependencies


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module imported, line) for every import statement of the file, at any depth."""
    me = module_name(path).split(".")
    base = me if path.name == "__init__.py" else me[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                prefix = ".".join(base[: len(base) - node.level + 1])
                mod = f"{prefix}.{node.module}" if node.module else prefix
            else:
                mod = node.module
            out.append((mod, node.lineno))
            for a in node.names:  # `from . import x` imports the submodule x
                sub = f"{mod}.{a.name}"
                if (PKG.parent / Path(*sub.split("."))).with_suffix(".py").exists() or (
                    PKG.parent / Path(*sub.split(".")) / "__init__.py"
                ).exists():
                    out.append((sub, node.lineno))
    return out


def part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "ich_kaggle" else None


def files() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def test_every_part_has_a_layer():
    parts = {part(module_name(f)) for f in files()} - {None}
    assert parts <= set(LAYERS), f"give these parts a layer in LAYERS: {sorted(parts - set(LAYERS))}"


def test_imports_point_down_only():
    bad = []
    for f in files():
        me = part(module_name(f))
        for mod, line in imports(f):
            if mod == "ich_kaggle":  # the root package: only __version__, it imports nothing of the package
                continue
            other = part(mod)
            if other is None or me is None or other == me:
                continue
            if LAYERS[other] >= LAYERS[me]:
                bad.append(
                    f"{f.relative_to(PKG.parent)}:{line} ({me}, layer {LAYERS[me]}) imports {mod} "
                    f"({other}, layer {LAYERS[other]})"
                )
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


def test_root_package_and_core_stay_light():
    root = [m for m, _ in imports(PKG / "__init__.py") if m.startswith("ich_kaggle")]
    assert not root, f"ich_kaggle/__init__.py must import nothing of the package: {root}"
    stdlib = set(sys.stdlib_module_names)
    bad = []
    for f in (PKG / "core").rglob("*.py"):
        for mod, line in imports(f):
            top = mod.split(".")[0]
            if top not in stdlib and top not in CORE_THIRD_PARTY and top != "ich_kaggle":
                bad.append(f"{f.relative_to(PKG.parent)}:{line} imports {mod}")
    assert not bad, "core imports only the standard library, numpy, pandas, yaml and tqdm:\n" + "\n".join(bad)


def test_no_import_cycle():
    graph: dict[str, set[str]] = {}
    known = {module_name(f) for f in files()}
    for f in files():
        graph[module_name(f)] = {m for m, _ in imports(f) if m in known and m != module_name(f)}
    # a package's __init__ that re-exports its own modules is not a cycle of design: drop parent -> child edges
    for mod, deps in graph.items():
        graph[mod] = {d for d in deps if not d.startswith(mod + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


HEAVY = ("torch", "timm", "cv2", "albumentations", "segmentation_models_pytorch", "sklearn", "matplotlib")
LOAD_EVERY_CONFIG = """
import sys
from ich_kaggle.core import config, ensemble, freshness, io, labels, layout, lock, manifest, metrics, registry
for name in config.available() + config.available_ensembles():
    cfg = config.load(name)
    if cfg.is_ensemble:
        ensemble.load_members(cfg, [])
for bad in ("train.loss=hinge", "stack.model=lstm", "tta.transforms=vflip", "data.source=disk", "model.pool=max"):
    try:
        config.load("seresnext50_512", [bad])
    except Exception as e:
        assert type(e).__name__ == "UserError", e
    else:
        raise AssertionError(bad)
heavy = sorted(m for m in %r if m in sys.modules)
stages = sorted(m for m in sys.modules if m.startswith("ich_kaggle.") and not m.startswith("ich_kaggle.core"))
print(heavy, stages)
"""


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=PKG.parent)


def test_core_runs_without_torch_or_a_stage():
    """At run time too (the registries name their providers as strings, which the ast test cannot see): every core
    module imports, every shipped config and ensemble loads and every name check answers, and neither torch (nor
    any heavy library) nor a module of a higher layer was imported."""
    proc = _run(["-c", LOAD_EVERY_CONFIG % (HEAVY,)])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[] []", f"core pulled in (heavy libraries, stages): {proc.stdout}"


def test_a_bad_fold_answers_before_torch_is_imported():
    """`train --fold abc` is one line, and nothing heavy was imported to say so (`-X importtime` lists every import)."""
    proc = _run(["-X", "importtime", "-m", "ich_kaggle", "train", "--fold", "abc"])
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    errors = [line for line in lines if not line.startswith("import time:")]
    assert errors == ["error: fold 'abc' is neither a fold number nor 'all'; use --fold 0..4 or all"]
    imported = {line.split("|")[-1].strip() for line in lines if line.startswith("import time:")}
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_every_command_answers_help():
    """`--help` of the CLI and of each command in the table (argparse formats help with %: a bare % breaks it)."""
    import contextlib
    import io

    import pytest

    from ich_kaggle import cli

    for argv in (["--help"], *([name, "--help"] for name in cli.COMMANDS)):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
            cli.main(argv)
        assert done.value.code == 0 and "usage:" in out.getvalue(), argv
