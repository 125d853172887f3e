"""The package's layout holds: dependencies point one way, no module or function grows past what one reads at once,
and the public names stay where the README says they are."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "qwen3lab"

# package -> the packages it may import (besides itself). Serving and inference never reach into training; the model
# and its text know nothing of either; the top-level modules (cli, demo, generate) sit on top.
ALLOWED = {
    "model": set(),
    "text": set(),
    "infer": {"model", "text"},
    "serve": {"model", "text", "infer"},
    "train": {"model", "text", "infer"},
    "eval": {"model", "text", "infer", "train", "generate"},
    "sweep": {"model", "train"},
    "generate": {"model", "text", "infer"},
}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
DECLARATIVE = {("cli.py", "build_parser")}  # a table of flags, one statement per flag


def _modules():
    return sorted(p for p in SRC.rglob("*.py"))


def _group(module: str) -> str:
    """'qwen3lab.train.objectives.grpo' -> 'train'; top-level modules are their own group."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "qwen3lab"


def _imports(path: Path) -> set[str]:
    """The qwen3lab modules a file imports anywhere in it (function-local imports too), as absolute names."""
    package = ["qwen3lab", *path.relative_to(SRC).parent.parts]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("qwen3lab")}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                up = package[: len(package) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            if base.startswith("qwen3lab"):
                found |= {base} if node.module else {f"{base}.{a.name}" for a in node.names}
    return found


def test_dependencies_point_one_way():
    wrong = []
    for path in _modules():
        module = ".".join(["qwen3lab", *path.relative_to(SRC).with_suffix("").parts])
        group = _group(module)
        if group not in ALLOWED:  # the package's __init__, cli, demo: on top of everything
            continue
        for target in _imports(path):
            other = _group(target)
            if other not in (group, "qwen3lab") and other not in ALLOWED[group]:
                wrong.append(f"{path.relative_to(SRC)} imports {target}")
            if other == "qwen3lab" and target != "qwen3lab":
                wrong.append(f"{path.relative_to(SRC)} imports the top-level {target}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_modules_and_functions_stay_readable(path):
    lines = path.read_text().splitlines()
    assert len(lines) <= MAX_MODULE_LINES, f"{path.name}: {len(lines)} lines; split it by concern"
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if (path.name, node.name) not in DECLARATIVE:
                assert n <= MAX_FUNCTION_LINES, f"{path.name}:{node.lineno} {node.name}: {n} lines"


def test_public_names_where_the_readme_puts_them():
    import qwen3lab

    assert set(qwen3lab.__all__) == {
        "ModelConfig",
        "Qwen3",
        "Tokenizer",
        "load_model",
        "load_tokenizer",
        "new_model",
        "preset",
        "save_model",
        "train",
    }
    for name in qwen3lab.__all__:
        assert getattr(qwen3lab, name) is not None
    assert callable(qwen3lab.generate.generate) and callable(qwen3lab.generate.stream)  # `import qwen3lab` is enough
    from qwen3lab.generate import SamplingParams, generate  # noqa: F401
    from qwen3lab.serve import create_app  # noqa: F401
