"""The settings and the import graph.

Settings: every TORCH_METAL_FUSED_* name anywhere in the tree is declared in torch_metal_fused/_config.py, which
docs/configuration.md lists, setting for setting; a value that would do nothing is rejected (where it is read, at
import, and by the C++ readers alike); the package's Python reads the environment only through _config.

Imports: the graph of `torch_metal_fused`'s modules has no cycle. Both module-level and function-level imports count:
the function-level ones load optional layers (the harness, the Metal backend, the compiled extension) where they are
used, which is deliberate, but they must still point down, never back up to a module that imports the caller. An
import's implicit import of its parent packages is not an edge (the package's __init__ imports the public API, so
every module would otherwise be in a cycle with it); `if TYPE_CHECKING:` blocks are not imports.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from torch_metal_fused import _config

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "torch_metal_fused"
NAME = re.compile(r"TORCH_METAL_FUSED_[A-Z0-9_]*[A-Z0-9]")
# Text files that may name a setting (the brief's list, and shaders, configs and text).
SUFFIXES = {".py", ".h", ".cpp", ".cu", ".cuh", ".mm", ".metal", ".sh", ".md", ".yml", ".yaml", ".toml", ".txt", ".cfg"}
EXTENSIONS = {"torch_metal_fused._C"}  # compiled modules: leaves of the import graph


def _tree_files() -> list[Path]:
    """The repository's files (tracked, and new ones not ignored), or every file under it outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
        files = [ROOT / p for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in ROOT.rglob("*") if ".git" not in p.parts and "build" not in p.parts]
    return [f for f in files if (f.suffix in SUFFIXES or f.name == "run") and f.is_file()]


def _names_in_tree() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for f in _tree_files():
        for name in NAME.findall(f.read_text(errors="replace")):
            found.setdefault(name, set()).add(str(f.relative_to(ROOT)))
    return found


# ---- settings ----


def test_every_setting_name_in_the_tree_is_declared_in_config():
    found = _names_in_tree()
    assert "TORCH_METAL_FUSED_BACKEND" in found and "TORCH_METAL_FUSED_EMU_SEED" in found  # the scan sees Python, C++
    undeclared = {name: sorted(files) for name, files in found.items() if name not in _config.SETTINGS}
    assert not undeclared, f"TORCH_METAL_FUSED_* names not declared in torch_metal_fused/_config.py: {undeclared}"


def test_every_declared_setting_is_read_where_it_says():
    """No stale declaration: each file a setting names as its reader exists and reads it (C++ and setup.py by name;
    Python modules through _config)."""
    for s in _config.SETTINGS.values():
        assert s.read_by and s.layer in (_config.PYTHON, _config.CPP, _config.BUILD, _config.EXTERNAL), s.name
        for path in s.read_by:
            text = (ROOT / path).read_text()
            if path.endswith(".py"):
                assert "_config" in text or "config." in text, f"{path} does not read {s.name} through _config"
            else:
                assert s.name in text, f"{path} does not read {s.name}"
        if s.layer == _config.CPP:
            assert any(path.startswith("csrc/") for path in s.read_by), s.name


def test_docs_configuration_lists_exactly_the_declared_settings():
    docs = (ROOT / "docs" / "configuration.md").read_text()
    rows = dict(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|(.*)$", docs, re.M))
    assert set(rows) == set(_config.SETTINGS), (
        f"only in docs/configuration.md: {sorted(set(rows) - set(_config.SETTINGS))}; "
        f"only in _config.py: {sorted(set(_config.SETTINGS) - set(rows))}"
    )
    assert set(NAME.findall(docs)) <= set(_config.SETTINGS)
    for name, row in rows.items():
        for path in _config.SETTINGS[name].read_by:  # the docs name the same readers
            assert path.removeprefix("torch_metal_fused/") in row, f"docs/configuration.md: {name} is read by {path}"


def test_python_reads_the_environment_only_through_config():
    """No module of the package but _config reads os.environ / os.getenv."""
    offenders = []
    for f in sorted(PACKAGE.rglob("*.py")):
        if f.name == "_config.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv", "unsetenv"):
                if isinstance(node.value, ast.Name) and node.value.id == "os":
                    offenders.append(f"{f.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


@pytest.mark.parametrize(
    ("setting", "good", "bad"),
    [
        (_config.STRICT, {"0": False, "1": True, " 1 ": True}, ["yes", "true", "2", "on"]),
        (_config.EMU_CHECK, {"0": False, "1": True}, ["yes", "false"]),
        (_config.NO_EXTENSION, {"0": False, "1": True}, ["no"]),
        (_config.REQUIRE_EXTENSION, {"1": True}, ["y"]),
        (_config.BACKEND, {"reference": "reference", "metal-emulated": "metal-emulated"}, ["metal", "cuda", "bogus"]),
        (_config.LORA_KCONCAT, {"0": "never", "1": "always"}, ["yes", "2", " 1"]),
        (
            _config.LORA_KCONCAT_GEMM,
            {"cooperative": "cooperative", "pingpong": "pingpong", "auto": None},
            ["coop", "ping-pong", "pingpong "],
        ),
        (_config.EMU_SEED, {"7": 7, "0": 0, "0x1f": 31, "010": 8, "12345": 12345}, ["often", "-1", "+5", " 5", "1.5"]),
        (_config.EMU_TIMEOUT_S, {"0": 0.0, "0.3": 0.3, "1e3": 1000.0, ".5": 0.5}, ["soon", "-1", "inf", "nan", " 5"]),
        (
            _config.EMU_FAULTS,
            {
                "compile:softmax, simd_width:rms_norm=16,": "compile:softmax,simd_width:rms_norm=16",
                "no_bfloat": "no_bfloat",
            },
            ["compile", "compile:", "max_threads:softmax", "no_bfloat:softmax", "simd_width:x=y", "bogus:softmax"],
        ),
    ],
    ids=lambda v: v.name if isinstance(v, _config.Setting) else None,
)
def test_values_that_would_do_nothing_are_rejected(setting, good, bad):
    for raw, value in good.items():
        assert setting.value({setting.name: raw}) == value, raw
    assert setting.value({}) is None and setting.value({setting.name: ""}) is None  # empty is unset
    for raw in bad:
        with pytest.raises(_config.ConfigError, match=re.escape(f"{setting.name}={raw!r} does nothing")) as exc:
            setting.value({setting.name: raw})
        assert setting.allowed in str(exc.value)


def test_accessors_read_the_environment_at_each_call(monkeypatch):
    monkeypatch.delenv(_config.STRICT.name, raising=False)
    assert _config.strict() is False
    monkeypatch.setenv(_config.STRICT.name, "1")
    assert _config.strict() is True
    monkeypatch.setenv(_config.STRICT.name, "yes")
    with pytest.raises(_config.ConfigError, match="TORCH_METAL_FUSED_STRICT='yes' does nothing: it takes 0 or 1"):
        _config.strict()
    monkeypatch.setenv(_config.CACHE.name, "")
    assert _config.cache_dir() == Path.home() / ".cache" / "torch_metal_fused"
    monkeypatch.setenv(_config.CACHE.name, "/tmp/tmf-cache")
    assert _config.cache_dir() == Path("/tmp/tmf-cache")
    for setting in (_config.LORA_KCONCAT, _config.EMU_SEED, _config.EMU_TIMEOUT_S):
        monkeypatch.delenv(setting.name, raising=False)
    assert (_config.lora_kconcat(), _config.emu_seed(), _config.emu_timeout_s()) == ("by_size", 1, 120.0)


def test_a_clang_that_is_not_found_is_an_error(monkeypatch):
    from torch_metal_fused.emulator import build

    monkeypatch.setenv(_config.CLANG.name, "clang++-does-not-exist")
    with pytest.raises(build.HarnessUnavailable, match="TORCH_METAL_FUSED_CLANG='clang\\+\\+-does-not-exist' is not"):
        build.find_clang()


def test_overriding_checks_and_restores(monkeypatch):
    monkeypatch.setenv(_config.BACKEND.name, "reference")
    monkeypatch.delenv(_config.STRICT.name, raising=False)
    with _config.overriding({_config.BACKEND.name: "metal-emulated", _config.STRICT.name: "1"}):
        assert _config.backend() == "metal-emulated" and _config.strict()
    assert _config.backend() == "reference" and _config.STRICT.name not in os.environ
    with pytest.raises(_config.ConfigError, match="does nothing"), _config.overriding({_config.BACKEND.name: "cuda"}):
        pass
    with pytest.raises(KeyError), _config.overriding({_config.PREFIX + "NOPE": "1"}):
        pass


def test_runner_faults_reject_an_unknown_fault():
    from torch_metal_fused.emulator import runner

    with pytest.raises(ValueError, match="'compile_softmax' is not a fault"), runner.faults("compile_softmax"):
        pass
    with runner.faults(" compile:softmax ,no_bfloat"):
        assert runner.active_faults() == "compile:softmax,no_bfloat" and runner.fault_active("no_bfloat")


def test_check_environment_rejects_bad_values_and_warns_of_unknown_names():
    env = {"TORCH_METAL_FUSED_STRICT": "yes", "TORCH_METAL_FUSED_BACKEND": "cuda", "OTHER": "x"}
    with pytest.raises(_config.ConfigError) as exc:
        _config.check_environment(env)
    assert "TORCH_METAL_FUSED_STRICT='yes'" in str(exc.value) and "TORCH_METAL_FUSED_BACKEND='cuda'" in str(exc.value)
    typo = _config.PREFIX + "STRIKT"  # spelt so that the scan of the tree above does not find it
    with pytest.warns(RuntimeWarning, match=rf"{typo} \(did you mean TORCH_METAL_FUSED_STRICT\?\)"):
        assert _config.check_environment({typo: "1"}) == [typo]
    assert _config.check_environment({name: "1" for name in ("TORCH_METAL_FUSED_STRICT", "PATH")}) == []


def test_import_rejects_a_value_that_would_do_nothing():
    env = {k: v for k, v in os.environ.items() if not k.startswith(_config.PREFIX)}
    cmd = [sys.executable, "-c", "import torch_metal_fused"]
    proc = subprocess.run(cmd, env={**env, "TORCH_METAL_FUSED_STRICT": "true"}, capture_output=True, text=True)
    assert proc.returncode != 0 and "TORCH_METAL_FUSED_STRICT='true' does nothing: it takes 0 or 1" in proc.stderr
    proc = subprocess.run(cmd, env={**env, "TORCH_METAL_FUSED_STRICT": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_config_imports_nothing_from_the_package():
    """setup.py loads _config.py by its path, before the package can be imported."""
    assert not [m for m in _imports(PACKAGE / "_config.py", "torch_metal_fused._config") if m.startswith("torch_")]


# ---- the import graph ----


def _modules() -> dict[str, Path]:
    mods = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = f
    return mods


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _import_nodes(tree: ast.AST):
    """Every import statement, module-level or in a function, outside `if TYPE_CHECKING:` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif not _is_type_checking(node):
            stack.extend(ast.iter_child_nodes(node))


def _imports(path: Path, module: str, known: dict[str, Path] | None = None) -> set[str]:
    """The modules `module` (at `path`) imports: the names as written, resolved to modules of the package where it
    knows them (`from pkg import name` is pkg.name where that is a module, else pkg)."""
    known = known or {}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def resolve(name: str) -> str:
        while name not in known and name not in EXTENSIONS and "." in name:
            name = name.rpartition(".")[0]
        return name

    found = set()
    for node in _import_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {resolve(a.name) for a in node.names}
            continue
        if node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        for a in node.names:
            full = f"{source}.{a.name}"
            found.add(full if full in known or full in EXTENSIONS else resolve(source))
    found.discard(module)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    for root, targets in graph.items():
        if root in index:
            continue
        work = [(root, iter(sorted(targets)))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {t for t in _imports(f, m, mods) if t in mods} for m, f in mods.items()}


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    assert "torch_metal_fused.emulator.runner" in graph["torch_metal_fused.backends.emulated"]  # function-level
    assert "torch_metal_fused._errors" in graph["torch_metal_fused.emulator.runner"]  # module-level
    cycles = _cycles(graph)
    assert not cycles, f"import cycles in torch_metal_fused: {cycles}"


def test_the_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_bottom_layer_imports_nothing_above_it():
    """_config, _errors and _families are what lower modules (the harness, the backends) share with the dispatcher:
    they import no other module of the package."""
    graph = _graph()
    for m in ("torch_metal_fused._config", "torch_metal_fused._errors", "torch_metal_fused._families"):
        assert graph[m] == set(), (m, graph[m])
    harness = [m for m in graph if m.startswith("torch_metal_fused.emulator")]
    for m in harness:  # the harness sits below the backends and the dispatcher
        above = {t for t in graph[m] if t.startswith(("torch_metal_fused.backends", "torch_metal_fused.ops"))}
        assert not above and "torch_metal_fused._backend" not in graph[m], (m, graph[m])
