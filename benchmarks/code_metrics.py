"""Function size metrics for the host-side code of a package: every function longer than
``--max-lines`` lines or taking more than ``--max-params`` parameters.

A function's length is ``end_lineno - lineno + 1`` (its ``def`` line to its last line, decorators
not counted); its parameters are all of them — positional-only, positional, keyword-only, and
``*args`` and ``**kwargs`` one each (``self``/``cls`` included). Triton kernels (functions decorated
with ``triton.jit`` or ``triton.autotune``, called or not) are device code and are skipped.

    python benchmarks/code_metrics.py               # walks pcfast/
    python benchmarks/code_metrics.py pcfast/cli    # a folder or file
"""
from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

MAX_LINES = 80
MAX_PARAMS = 10
KERNEL_DECORATORS = ("triton.jit", "triton.autotune")


@dataclass(frozen=True)
class Function:
    path: Path
    name: str  # qualified: Class.method, outer.<locals>.inner
    line: int
    lines: int
    params: int


def _dotted(node: ast.expr) -> str:
    """``triton.jit`` for ``@triton.jit`` and ``@triton.jit(...)``; ``""`` for anything else."""
    if isinstance(node, ast.Call):
        node = node.func
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def is_kernel(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any(_dotted(d) in KERNEL_DECORATORS for d in node.decorator_list)


def parameter_count(args: ast.arguments) -> int:
    return (len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs)
            + (args.vararg is not None) + (args.kwarg is not None))


def functions(path: Path) -> list[Function]:
    """Every host-side function and method in ``path``, nested ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[Function] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                if not is_kernel(child):
                    found.append(Function(path, name, child.lineno, child.end_lineno - child.lineno + 1,
                                          parameter_count(child.args)))
                visit(child, f"{name}.<locals>.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def python_files(roots: list[Path]) -> list[Path]:
    files: list[Path] = []
    for root in roots:
        files.extend(sorted(root.rglob("*.py")) if root.is_dir() else [root])
    return files


def report(roots: list[Path], max_lines: int = MAX_LINES, max_params: int = MAX_PARAMS) -> tuple[str, int]:
    """The text report and the number of functions over a limit."""
    every = [f for path in python_files(roots) for f in functions(path)]
    long = sorted((f for f in every if f.lines > max_lines), key=lambda f: (-f.lines, str(f.path), f.line))
    wide = sorted((f for f in every if f.params > max_params), key=lambda f: (-f.params, str(f.path), f.line))
    lines = [f"functions over {max_lines} lines: {len(long)}"]
    lines += [f"  {f.lines:>4} lines  {f.path}:{f.line} {f.name}" for f in long]
    lines.append(f"functions with more than {max_params} parameters: {len(wide)}")
    lines += [f"  {f.params:>4} params {f.path}:{f.line} {f.name}" for f in wide]
    offenders = {(f.path, f.line) for f in long + wide}
    lines.append(f"{len(offenders)} of {len(every)} host-side functions over a limit "
                 f"({len(python_files(roots))} files)")
    return "\n".join(lines), len(offenders)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, default=[Path("pcfast")], help="folders or files (default: pcfast)")
    parser.add_argument("--max-lines", type=int, default=MAX_LINES)
    parser.add_argument("--max-params", type=int, default=MAX_PARAMS)
    parser.add_argument("--check", action="store_true", help="exit 1 when any function is over a limit")
    args = parser.parse_args(argv)
    text, offenders = report(args.paths, args.max_lines, args.max_params)
    print(text)
    return 1 if args.check and offenders else 0


if __name__ == "__main__":
    sys.exit(main())
