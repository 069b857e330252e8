"""The backend registry: one table, no import cycles, import failures reported as they are."""
import ast
import sys
from pathlib import Path

import pytest
import torch

import aia_kernels
from aia_kernels import backends, warnings_once

PACKAGE = Path(aia_kernels.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """aia_kernels module -> the aia_kernels modules it imports, at module level or inside a
    function. ``from . import x`` counts as an import of x alone when x is a module (the
    parent package is always imported first, which is no cycle of the code's making)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(parent + ([node.module] if node.module else []))
                submodules = {f"{base}.{alias.name}" for alias in node.names} & modules.keys()
                edges |= submodules if len(submodules) == len(node.names) else {base} | submodules
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle, each listed once from its smallest module name."""
    found = []

    def walk(start, node, path):
        for nxt in sorted(graph[node]):
            if nxt == start:
                found.append(path + [start])
            elif nxt > start and nxt not in path:
                walk(start, nxt, path + [nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return found


def test_import_graph_has_no_cycles():
    graph = import_graph()
    assert "aia_kernels.backends" in graph["aia_kernels.modules"]  # the graph sees real edges
    assert cycles(graph) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]  # and would see a cycle


def test_backend_packages_do_not_import_the_registry():
    graph = import_graph()
    for name, module in backends.BACKEND_MODULES.items():
        inside = [m for m in graph if m == module or m.startswith(module + ".")]
        assert inside, name
        assert all("aia_kernels.backends" not in graph[m] for m in inside), name


def test_one_table_names_every_fused_backend():
    assert backends.FUSED_BACKENDS == tuple(backends.BACKEND_MODULES) == ("triton", "native")
    assert backends.BACKENDS == ("reference", "triton", "native", "auto") == aia_kernels.BACKENDS
    assert all(name in backends.FUSED_BACKENDS for order in backends.AUTO_ORDER.values() for name in order)


def test_backend_modules_expose_what_the_registry_reads():
    import aia_kernels.native as native
    assert backends._load("native") is native
    assert native.primitives is backends.get("native", torch.device("cpu")).primitives
    assert native.unavailable_reason(torch.device("cpu")) is None


@pytest.fixture
def failing_module(tmp_path, monkeypatch):
    """A backend module whose import raises something other than ImportError."""
    (tmp_path / "aia_failing_backend.py").write_text("raise OSError('libfoo.so: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(backends.BACKEND_MODULES, "native", "aia_failing_backend")
    monkeypatch.setattr(warnings_once, "_warned", set())
    yield
    sys.modules.pop("aia_failing_backend", None)
    backends._imported.pop("aia_failing_backend", None)


def test_failed_import_is_the_reason(failing_module):
    reason = backends.unavailable_reason("native", torch.device("cpu"))
    assert reason == "importing aia_failing_backend failed: OSError: libfoo.so: cannot open shared object file"
    with pytest.raises(RuntimeError, match="AIA backend 'native' cannot run on cpu: importing aia_failing_backend"):
        aia_kernels.build("C", num_segments=3, backend="native")(torch.randn(6, 5, 4, 7))


def test_auto_fallback_warning_says_why(failing_module):
    module = aia_kernels.build("C", num_segments=3, backend="auto")
    with pytest.warns(RuntimeWarning, match="native: importing aia_failing_backend failed: OSError"):
        module(torch.randn(6, 5, 4, 7))
    assert module.last_backend == "reference"


def test_a_backend_module_through_the_table(tmp_path, monkeypatch):
    """What docs/adding_a_backend.md asks of a backend module is all the registry needs."""
    (tmp_path / "aia_example_backend.py").write_text(
        "import torch\n"
        "from aia_kernels.primitives.torch_impl import TorchPrimitives\n"
        "primitives = TorchPrimitives()\n"
        "def unavailable_reason(device):\n"
        "    return None if torch.device(device).type == 'cpu' else 'CPU only'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(backends.BACKEND_MODULES, "native", "aia_example_backend")
    try:
        assert backends.unavailable_reason("native", torch.device("meta")) == "CPU only"
        torch.manual_seed(0)
        module = aia_kernels.build("CinST->STinC", num_segments=3, backend="native").double()
        reference = aia_kernels.build("CinST->STinC", num_segments=3, backend="reference").double()
        reference.load_state_dict(module.state_dict())
        x = torch.randn(6, 5, 4, 7, dtype=torch.float64)
        torch.testing.assert_close(module(x), reference(x))
        assert module.last_backend == "native"
    finally:
        sys.modules.pop("aia_example_backend", None)
        backends._imported.pop("aia_example_backend", None)


def test_stand_in_hook(monkeypatch):
    from aia_kernels.primitives.torch_impl import TorchPrimitives
    stand_in = backends.FusedBackend("triton", TorchPrimitives(), lambda device: None)
    monkeypatch.setitem(backends.stand_ins, "triton", stand_in)
    assert backends.get("triton", torch.device("cpu")) is stand_in
    module = aia_kernels.build("C", num_segments=3, backend="triton")
    module(torch.randn(6, 5, 4, 7))
    assert module.last_backend == "triton"


def test_get_refuses_names_that_are_not_fused_backends():
    with pytest.raises(ValueError, match="not a fused AIA backend"):
        backends.get("reference", torch.device("cpu"))
