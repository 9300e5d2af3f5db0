"""The package's shape is part of its design: a stage imports the core and nothing of another stage,
the core imports no stage, modules stay small, and every module of substance has its own test file.
Read off the source (ast), so a new module is held to the same rule without being listed here."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "inversion"
STAGES = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists() and p.name != "core")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
TESTED_ABOVE = 50  # lines: a module this long has tests/<package>/test_<module>.py or tests/test_<module>.py


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def package_of(path):
    return path.relative_to(PACKAGE).parts[0]


def imported_packages(source, module_parts):
    """The inversion packages a module imports (absolute or relative, wherever the import statement is).
    `module_parts`: the module's path under the repository, e.g. ("inversion", "render", "report.py")."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = ".".join([*module_parts[:-node.level], *(node.module or "").split(".")]).strip(".") \
                if node.level else node.module or ""
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for parts in (n.split(".") for n in names):
            if parts[0] == "inversion" and len(parts) > 1 and parts[1] in [*STAGES, "core"]:
                found.add(parts[1])
    return found


def test_the_stages_are_the_ones_the_docs_name():
    assert {"baseline", "extract", "render", "train"} <= set(STAGES)
    assert not [p for p in PACKAGE.glob("*.py") if p.name != "__init__.py"], "every module lives in core or a stage"


def test_a_stage_imports_the_core_only_and_the_core_no_stage():
    wrong = []
    for path in modules():
        own = package_of(path)
        for other in imported_packages(path.read_text(), path.relative_to(ROOT).parts) - {own, "core"}:
            wrong.append(f"{path.relative_to(ROOT)} imports inversion.{other}")
    assert not wrong, "\n".join(wrong)


def test_the_rule_sees_every_form_of_import():
    """The rule would pass vacuously if imported_packages missed a form of import."""
    source = ("from inversion.train import training\nfrom ..baseline import optimisation\n"
              "import inversion.extract.extraction\ndef f():\n    from inversion import core\n")
    assert imported_packages(source, ("inversion", "render", "probe.py")) == {"train", "baseline", "extract", "core"}
    assert imported_packages("from . import figures\n", ("inversion", "render", "probe.py")) == {"render"}


def test_no_module_is_over_the_limit():
    long = {str(p.relative_to(ROOT)): n for p in modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long


def test_no_function_is_over_the_limit():
    long = []
    for path in [*modules(), *ROOT.glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body_start = node.body[0].lineno
                if isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
                    body_start = node.body[0].end_lineno + 1  # the docstring does not count
                if node.end_lineno - body_start + 1 > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not long, long


def test_every_module_of_substance_has_its_own_test_file():
    tests = ROOT / "tests"
    missing = []
    for path in modules():
        if len(path.read_text().splitlines()) <= TESTED_ABOVE:
            continue
        name = f"test_{path.stem}.py"
        if not (tests / package_of(path) / name).exists() and not (tests / name).exists():
            missing.append(str(path.relative_to(ROOT)))
    assert not missing, missing
