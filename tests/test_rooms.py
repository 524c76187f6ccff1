"""The house in rooms, checked from the source (no import runs): every room imports only the rooms below it, no
module imports itself back through any chain (imports inside functions count; `if TYPE_CHECKING:` blocks do not),
trainer/ never imports gradio, app/ never imports torch or the libraries built on it, no module passes 500 lines
and train() reads in at most 150. The map is the README's ("The rooms")."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("trainer", "app")

# room -> the rooms it may import (besides itself). "trainer" is the room-free core: config, errors, atomic writes,
# progress, resources, file hashes, presets, image sheets.
ALLOWED = {
    "trainer": set(),
    "trainer.models": {"trainer"},
    "trainer.data": {"trainer", "trainer.models"},
    "trainer.memory": {"trainer", "trainer.models"},
    "trainer.lora": {"trainer", "trainer.models", "trainer.data"},
    "trainer.training": {"trainer", "trainer.models", "trainer.data", "trainer.memory", "trainer.lora"},
    "trainer.preview": {"trainer", "trainer.models", "trainer.lora", "trainer.training"},
    "trainer.world": {"trainer", "trainer.models", "trainer.data", "trainer.lora", "trainer.training"},
    "trainer.doctor": {"trainer", "trainer.models", "trainer.memory"},
    "trainer.bench": {"trainer", "trainer.models", "trainer.data", "trainer.memory", "trainer.lora",
                      "trainer.training", "trainer.preview", "trainer.world", "trainer.doctor"},
    "trainer.cli": {"trainer", "trainer.models", "trainer.data", "trainer.memory", "trainer.lora", "trainer.training",
                    "trainer.preview", "trainer.world", "trainer.doctor", "trainer.bench"},
    # The app reaches runs only through their folders and the CLI; what it imports from trainer/ is torch-free.
    "app": {"trainer", "trainer.models", "trainer.data", "trainer.memory", "trainer.lora", "trainer.training",
            "trainer.preview", "trainer.doctor"},
}
TORCH_STACK = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors.torch")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = modules()


def imports(name: str, path: Path) -> set[str]:
    """Every module name `name` imports (absolute, as written or resolved from a relative import), at any depth of
    the file except under `if TYPE_CHECKING:`; a package's lazily resolved names (`_WHERE`) count as imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                out.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package
                    for _ in range(child.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                out.add(base)
                out.update(f"{base}.{a.name}" for a in child.names)  # `from pkg import submodule`
            elif isinstance(child, ast.Assign) and any(getattr(t, "id", "") == "_WHERE" for t in child.targets):
                out.update(f"{name}.{target}" for target in ast.literal_eval(child.value).values())
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return out


def ours(imported: str) -> str | None:
    """The module of this project an import lands in (a name imported from a module resolves to the module)."""
    while imported and imported not in MODULES:
        imported = imported.rpartition(".")[0]
    return imported or None


GRAPH = {name: {m for m in map(ours, imports(name, path)) if m and m != name} for name, path in MODULES.items()}


def room(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "app":
        return "app"
    if module == "trainer.__main__":
        return "trainer.cli"
    if len(parts) > 1 and f"trainer.{parts[1]}" in ALLOWED:
        return f"trainer.{parts[1]}"
    return "trainer"


def test_every_module_has_a_room_and_the_map_names_every_room():
    rooms = {room(m) for m in MODULES}
    assert rooms == set(ALLOWED), f"rooms without a rule or rules without a room: {rooms ^ set(ALLOWED)}"
    loose = [m for m in MODULES if room(m) == "trainer" and m != "trainer" and (ROOT / m.replace(".", "/")).is_dir()]
    assert not loose, f"packages under trainer/ the map does not name: {loose}"


def test_rooms_import_only_the_rooms_below_them():
    wrong = sorted(f"{m} imports {t} ({room(m)} may import {sorted(ALLOWED[room(m)]) or 'no other room'})"
                   for m, targets in GRAPH.items() for t in targets
                   if room(t) != room(m) and room(t) not in ALLOWED[room(m)])
    assert not wrong, "\n".join(wrong)


def test_the_room_map_itself_has_no_cycle():
    done = set()

    def walk(r, trail):
        assert r not in trail, f"rooms import each other: {' -> '.join([*trail, r])}"
        if r in done:
            return
        for below in ALLOWED[r]:
            walk(below, [*trail, r])
        done.add(r)

    for r in ALLOWED:
        walk(r, [])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def connect(v):
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            node, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        component.append(w)
                        if w == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_no_import_cycle_even_through_imports_inside_functions():
    assert cycles(GRAPH) == []


def test_the_cycle_finder_finds_a_cycle():  # the check above would pass vacuously with a broken finder
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("package, banned", [("trainer", ("gradio",)), ("app", TORCH_STACK)])
def test_the_headless_trainer_and_the_torch_free_app(package, banned):
    wrong = sorted(f"{m} imports {i}" for m, p in MODULES.items() if m.split(".")[0] == package
                   for i in imports(m, p) if i in banned or i.startswith(tuple(f"{b}." for b in banned)))
    assert not wrong, "\n".join(wrong)


def test_no_module_over_500_lines():
    paths = [*MODULES.values(), ROOT / "launch.py", ROOT / "setup.py"]
    long = {str(p.relative_to(ROOT)): n for p in paths if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert not long, long


def test_train_reads_in_at_most_150_lines():
    tree = ast.parse(MODULES["trainer.training.loop"].read_text(encoding="utf-8"))
    (train,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train"]
    assert train.end_lineno - train.lineno + 1 <= 150
