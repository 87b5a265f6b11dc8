"""``pgolf bundle``: the single ``train_gpt.py`` a submission ships.

The rules want all counted code in one ``train_gpt.py`` that runs from inside the records folder, where pgolf is
not installed. The bundle is that file. It holds, in this order:

1. a docstring and stdlib imports only;
2. ``MODULES``: ``{module name: (is_package, source)}`` for EVERY pgolf module the record run can execute and no
   other. The set is found statically: walk the ``import`` statements (function-local ones included) of
   :mod:`pgolf.artifact.record_run`, then of each pgolf module found, plus the packages that contain them. CLI-only,
   Snakemake-only and Hub-download code is left out unless the record run can reach it, and so are the modules
   of features the recipe or a kernel switch turns off (:func:`left_out_modules`);
3. a small importer (a ``sys.meta_path`` finder/loader) that serves ``pgolf.*`` from ``MODULES`` only, with a
   ``get_source`` so tracebacks, ``inspect`` and Triton's ``@jit`` see the real lines;
4. ``CONFIG_JSON``: the resolved recipe (every knob, so the file alone says what it runs; in the shipped form only
   the run's name: there the embedded ``pgolf.config`` is generated with the recipe's values as its defaults,
   :mod:`pgolf.artifact.config_module`) and ``CODE_HASH``, the sha256 of the bundled sources (exposed to pgolf as
   ``pgolf.__bundle__`` for provenance; in the shipped form the recipe is part of those sources);
5. ``if __name__ == "__main__":`` -> :func:`pgolf.artifact.record_run.bundle_main`.

The output is a pure function of the sources, the config and the options (sorted modules, canonical JSON, no
dates or paths), so equal inputs give equal bytes. Next to ``<out>`` goes ``<out>.json`` with the sha256, the
counted code bytes under both conventions (``file``: the bytes shipped; ``wrapper``: the brotli+base85
self-extracting wrapper around the minified file, see :mod:`pgolf.artifact.minify`), the module list, the code hash and
the third-party packages imported (for the folder's ``requirements.txt``).

``--minify-modules`` embeds the shipped form of the modules (:mod:`pgolf.artifact.shrink`: error messages as
tags, unused code dropped, docstrings, comments, asserts and annotations out, locals renamed, spaces compacted):
fewer counted bytes, the same computation. Tracebacks point at the embedded (shrunk) lines; the report's
``messages`` maps each error tag back to pgolf's source. The Snakemake bundle rule writes this form, and
:func:`code_identity` is its CODE_HASH.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import pgolf
from pgolf.config import RunConfig, parse_run_config, to_dict
from pgolf.io import atomic_write_bytes, atomic_write_json
from pgolf.artifact.config_module import shipped_config_changes
from pgolf.artifact.fold import left_out_modules  # noqa: F401  (part of this module's interface)
from pgolf.artifact.minify import counted_code, counter_versions, make_wrapper

PACKAGE = "pgolf"
PACKAGE_DIR = Path(pgolf.__file__).resolve().parent
ENTRY_MODULE = "pgolf.artifact.record_run"
# Never embedded, whatever imports them: the bundler itself (the record run imports it only outside a bundle, to
# compute the code identity a bundle carries as CODE_HASH).
NEVER_BUNDLED = {"pgolf.artifact.bundle": "the bundler: a bundle knows its own CODE_HASH"}
BUNDLE_FORMAT_VERSION = 1


class BundleError(ValueError):
    """A module cannot be found or embedded, or the written bundle does not behave like its sources."""


@dataclasses.dataclass(frozen=True)
class BundledModule:
    name: str  # dotted, e.g. "pgolf.data.loader"
    is_package: bool  # True for a package's __init__.py
    source: str  # the text embedded (the original, or minified)


# --------------------------------------------------------------------------------------------------------------
# Which modules: a static walk of the import graph
# --------------------------------------------------------------------------------------------------------------


def module_file(name: str, package_dir: Path = PACKAGE_DIR) -> tuple[Path, bool]:
    """(path, is_package) of a pgolf module, or BundleError if it is neither a module file nor a package."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        raise BundleError(f"{name}: not a {PACKAGE} module")
    rel = Path(*name.split(".")[1:])
    as_package = package_dir / rel / "__init__.py"
    as_module = package_dir.joinpath(rel).with_suffix(".py") if rel.parts else None
    if as_package.is_file():
        return as_package, True
    if as_module is not None and as_module.is_file():
        return as_module, False
    raise BundleError(f"{name}: no module file {as_module} and no package {as_package}")


def _is_module(name: str, package_dir: Path) -> bool:
    try:
        module_file(name, package_dir)
    except BundleError:
        return False
    return True


def _resolve_relative(module: str, is_package: bool, level: int, target: Optional[str]) -> str:
    """Absolute name of ``from <dots><target> import ...`` written in ``module``."""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        parts = parts[: len(parts) - (level - 1)]
    if not parts:
        raise BundleError(f"{module}: relative import beyond the top-level package")
    return ".".join(parts + ([target] if target else []))


_IMPORT_ERRORS = ("ImportError", "ModuleNotFoundError", "Exception", "BaseException")


def import_edges(source: str, module: str, is_package: bool = False) -> list[tuple[str, bool]]:
    """``(module name, guarded)`` for every import anywhere in ``source`` (top level, functions, try blocks), with
    absolute names; ``guarded``: inside the body of a ``try`` with a handler that catches ImportError.

    ``from a import b`` yields ``a`` and the candidate ``a.b`` (the caller keeps it only if it is a module).
    """
    edges: list[tuple[str, bool]] = []

    def visit(node: ast.AST, guarded: bool) -> None:
        if isinstance(node, ast.Try):
            catches = any(
                h.type is None or any(isinstance(n, ast.Name) and n.id in _IMPORT_ERRORS for n in ast.walk(h.type))
                for h in node.handlers
            )
            for child in node.body:
                visit(child, guarded or catches)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, guarded)
            return
        if isinstance(node, ast.Import):
            edges.extend((alias.name, guarded) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = _resolve_relative(module, is_package, node.level, node.module)
            edges.append((base, guarded))
            edges.extend((f"{base}.{alias.name}", guarded) for alias in node.names if alias.name != "*")
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(ast.parse(source, filename=module), False)
    return edges


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module name imported anywhere in ``source`` (see :func:`import_edges`)."""
    return {name for name, _ in import_edges(source, module, is_package)}


def _is_pgolf(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def reachable_modules(
    entry: str = ENTRY_MODULE, package_dir: Path = PACKAGE_DIR, left_out: frozenset[str] = frozenset()
) -> list[str]:
    """Sorted names of every pgolf module that importing ``entry`` and running it can import, ``entry`` included.

    Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first, so containing packages are included
    (and walked) too. ``left_out`` modules (see :func:`left_out_modules`) are neither included nor walked.
    """
    module_file(entry, package_dir)  # a clear error for a wrong entry
    left_out = left_out | frozenset(NEVER_BUNDLED)
    seen: set[str] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        if name in seen or name in left_out:
            continue
        seen.add(name)
        path, is_package = module_file(name, package_dir)
        found = imported_modules(path.read_text(encoding="utf-8"), name, is_package)
        for candidate in sorted(found):
            if _is_pgolf(candidate):
                for mod in (*_parents(candidate), candidate):
                    if mod not in seen and _is_module(mod, package_dir):
                        todo.append(mod)
        todo.extend(p for p in _parents(name) if p not in seen)
    return sorted(seen)


def third_party_imports(sources: dict[str, tuple[bool, str]], entry: str = ENTRY_MODULE) -> dict[str, list[str]]:
    """Top-level names of the non-stdlib packages the bundled modules import, for ``requirements.txt``.

    ``sources``: ``{module name: (is_package, source)}``. ``required``: imported without an ImportError guard by a
    module that itself is always loaded (reached from ``entry`` through unguarded imports); ``optional``: the rest
    (e.g. FlashAttention-3 behind a try, or Triton, whose only importer is itself imported behind a try).
    """
    edges = {name: import_edges(src, name, is_pkg) for name, (is_pkg, src) in sources.items()}
    always = _closure(sources, entry, lambda name: [target for target, guarded in edges[name] if not guarded])
    required: set[str] = set()
    optional: set[str] = set()
    for name in sorted(edges):
        for target, guarded in edges[name]:
            top = target.split(".")[0]
            if not top or _is_pgolf(top) or top in sys.stdlib_module_names or top == "__future__":
                continue
            (required if name in always and not guarded else optional).add(top)
    return {"required": sorted(required), "optional": sorted(optional - required)}


def collect_modules(
    entry: str = ENTRY_MODULE, package_dir: Path = PACKAGE_DIR, left_out: frozenset[str] = frozenset(),
) -> list[BundledModule]:
    """The modules to embed, sorted by name, with their sources as written (see :func:`module_table`)."""
    out = []
    for name in reachable_modules(entry, package_dir, left_out):
        path, is_package = module_file(name, package_dir)
        source = path.read_text(encoding="utf-8")
        out.append(BundledModule(name, is_package, source))
    return out


def reachable_in(sources: dict[str, tuple[bool, str]], entry: str = ENTRY_MODULE) -> list[str]:
    """Sorted names of the modules of ``sources`` ({name: (is_package, source)}) that ``entry`` can import."""
    return sorted(_closure(sources, entry, lambda name: imported_modules(sources[name][1], name, sources[name][0])))


def _closure(sources: dict[str, tuple[bool, str]], entry: str, imports_of) -> set[str]:
    """The modules of ``sources`` reached from ``entry``: each module's parent packages and the pgolf modules
    ``imports_of(name)`` names (importing a module runs its packages' ``__init__`` first)."""
    seen: set[str] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        if name in seen or name not in sources:
            continue
        seen.add(name)
        todo.extend(_parents(name))
        todo.extend(target for target in imports_of(name) if _is_pgolf(target))
    return seen


@dataclasses.dataclass(frozen=True)
class ModuleTable:
    modules: list[BundledModule]
    left_out: dict[str, str]  # module -> why the bundle does not embed it
    messages: dict[str, str]  # error-message tag -> the message in pgolf's sources (shrunk form only)


def module_table(cfg: RunConfig, minify: bool, package_dir: Path = PACKAGE_DIR, read_cache: bool = False) -> ModuleTable:
    """Exactly what the bundle of ``cfg`` embeds, the modules it leaves out (with the reason) and, in the shipped
    (``minify``) form, the message tags (:mod:`pgolf.artifact.shrink`). :func:`build_bundle` and
    :func:`code_identity` both call this, so they cannot drift. Shipped tables go to :mod:`pgolf.artifact.table_cache`;
    only ``read_cache`` (a plan's code identity) reads them: a written bundle is always computed."""
    left_out = left_out_modules(cfg)
    if not minify:
        return ModuleTable(collect_modules(ENTRY_MODULE, package_dir, frozenset(left_out)), left_out, {})
    from pgolf.artifact import table_cache

    # the recipe, every pgolf source, the interpreter; None: no cache (turned off, or another package's sources)
    key = table_cache.table_key(to_dict(cfg), package_dir) if package_dir == PACKAGE_DIR else None
    if read_cache and (hit := table_cache.load(key)) is not None:  # what shrinking would give
        return ModuleTable([BundledModule(*m) for m in hit["modules"]], hit["left_out"], hit["messages"])
    table = _shrunk_table(cfg, collect_modules(ENTRY_MODULE, package_dir, frozenset(left_out)), left_out)
    table_cache.store(key, [(m.name, m.is_package, m.source) for m in table.modules], table.left_out, table.messages)
    return table


def _shrunk_table(cfg: RunConfig, modules: list[BundledModule], left_out: dict[str, str]) -> ModuleTable:
    """The shipped form of ``modules``: the generated pgolf.config in place of the recipe modules, then
    :func:`pgolf.artifact.shrink.shrink_modules`."""
    from pgolf.artifact.config_module import REPLACED_MODULES, generated_config_source
    from pgolf.artifact.shrink import shrink_modules

    # the shipped form's pgolf.config: the recipe as the defaults of plain dataclasses (pgolf.artifact.config_module)
    sources = [(m.name, m.is_package, m.source) for m in modules if m.name not in REPLACED_MODULES]
    sources.append(("pgolf.config", False, generated_config_source(cfg)))
    shrunk, messages = shrink_modules(sorted(sources), ENTRY_MODULE, reachable_in, cfg)
    kept = {m.name for m in shrunk}
    replaced = {name: "replaced by the generated pgolf.config (pgolf.artifact.config_module)"
                for name in REPLACED_MODULES if name != "pgolf.config"}
    shaken = {m.name: replaced.get(m.name, "no shipped code imports it once unused code is dropped (pgolf.artifact.shrink)")
              for m in modules if m.name not in kept}
    return ModuleTable([BundledModule(m.name, m.is_package, m.source) for m in shrunk], {**left_out, **shaken},
                       messages)


def shipped_recipe(cfg: RunConfig) -> RunConfig:
    """The recipe a run's train_gpt.py embeds: the seed list cut to its first seed (the file takes --seed), the
    ``aggregate`` section at its defaults (reporting metadata the record run never reads) and ``data.workers`` at
    its default (the data stage's process count: no byte of the data), so that none of them rebuilds the code of
    finished seeds."""
    from pgolf.config import AggregateConfig, DataConfig

    data = dataclasses.replace(cfg.data, workers=DataConfig().workers)
    return dataclasses.replace(cfg, seeds=cfg.seeds[:1], aggregate=AggregateConfig(), data=data)


# The modules that write train_gpt.py without being embedded in it: with the embedded sources (code_identity) and
# the recipe they decide every byte of the file.
RENDERER_FILES = ("artifact/bundle.py", "artifact/shrink.py", "artifact/fold.py", "artifact/minify.py")


def renderer_hash(package_dir: Path = PACKAGE_DIR) -> str:
    """sha256 of the renderer's sources (:data:`RENDERER_FILES`): the bundle rule's param besides the code identity,
    so that editing a module the bundle neither embeds nor is written by (a report module, say) rebuilds nothing."""
    digest = hashlib.sha256()
    for name in RENDERER_FILES:
        digest.update(name.encode() + b"\0" + (package_dir / name).read_bytes() + b"\0")
    return digest.hexdigest()


def code_identity(cfg: RunConfig, minify: bool = True, package_dir: Path = PACKAGE_DIR) -> str:
    """The code identity of a recipe: the ``CODE_HASH`` of its bundled train_gpt.py (minified, as the Snakemake
    bundle rule writes it), computed from the installed sources without writing the bundle.

    Both entry points record it beside the code bytes they count (``code_hash`` of the gate report, or of the
    pack report when the pack stage counts the code): the staged pipeline's gate rule gets it through its params,
    the bundled record run has it as its own CODE_HASH. The artifact never holds it, so a knob that changes only
    the shipped code re-runs the gate, not the model compression.
    """
    return bundle_code_hash(module_table(cfg, minify, package_dir, read_cache=True).modules)


def bundle_code_hash(modules: list[BundledModule]) -> str:
    """sha256 over (name, kind, source) of the embedded modules, in name order: what the bundle runs."""
    digest = hashlib.sha256()
    for m in sorted(modules, key=lambda m: m.name):
        digest.update(f"{m.name}\0{'package' if m.is_package else 'module'}\0".encode("utf-8"))
        digest.update(m.source.encode("utf-8") + b"\0")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------


def string_literal(text: str) -> str:
    """A Python literal that evaluates to ``text``: a readable raw triple-quoted string when that is exact,
    ``repr`` otherwise (quotes or a trailing backslash that would end it early, a trailing quote that would
    merge with the closing ones, carriage returns that reading the file would turn into newlines, characters a
    source file cannot hold)."""
    risky = ("'''" in text or text.endswith(("\\", "'")) or "\r" in text or "\0" in text
             or "\ufeff" in text)
    if not risky:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates
            risky = True
    if risky:
        return repr(text)
    return "r'''" + text + "'''"


_IMPORTER = '''
class _BundleImporter(importlib.abc.MetaPathFinder, importlib.abc.InspectLoader):
    """Serves pgolf.* from MODULES, so this file runs where pgolf is not installed (and ignores one that is)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "pgolf" and not fullname.startswith("pgolf."):
            return None
        if fullname not in MODULES:
            raise ModuleNotFoundError(f"{fullname} is not part of this bundle ({__file__}): its recipe does not use it", name=fullname)
        spec = importlib.machinery.ModuleSpec(fullname, self, origin=self._filename(fullname), is_package=MODULES[fullname][0])
        spec.has_location = True  # sets __file__ (a name, not a file on disk)
        return spec

    def _filename(self, fullname):
        tail = fullname.replace(".", "/") + ("/__init__.py" if MODULES[fullname][0] else ".py")
        return os.path.join(os.path.abspath(__file__), tail)

    def is_package(self, fullname):
        return MODULES[fullname][0]

    def get_source(self, fullname):
        return MODULES[fullname][1]

    def get_code(self, fullname):
        return compile(MODULES[fullname][1], self._filename(fullname), "exec", dont_inherit=True)

    def exec_module(self, module):
        if module.__name__ == "pgolf":
            module.__bundle__ = {"code_hash": CODE_HASH, "file": os.path.abspath(__file__), "modules": sorted(MODULES)}
        exec(self.get_code(module.__name__), module.__dict__)


for _name in [n for n in sys.modules if n == "pgolf" or n.startswith("pgolf.")]:
    del sys.modules[_name]  # an installed pgolf must not shadow the bundled one
sys.meta_path.insert(0, _BundleImporter())
'''

_MAIN = '''
if __name__ == "__main__":
    import pgolf.artifact.record_run

    sys.exit(pgolf.artifact.record_run.bundle_main(json.loads(CONFIG_JSON), __file__))
'''


def render_bundle(cfg: RunConfig, modules: list[BundledModule], shipped: bool = False) -> str:
    """The text of ``train_gpt.py`` (deterministic). ``shipped`` (the shipped form): CONFIG_JSON holds only
    ``run``, the embedded generated ``pgolf.config`` every other value as its defaults
    (:mod:`pgolf.artifact.config_module`); else CONFIG_JSON holds every value."""
    names = [m.name for m in modules]
    if ENTRY_MODULE not in names:
        raise BundleError(f"the bundle must contain {ENTRY_MODULE}")
    if len(set(names)) != len(names):
        raise BundleError(f"duplicate module names in the bundle: {names}")
    code_hash = bundle_code_hash(modules)
    if shipped:
        config_json = json.dumps(shipped_config_changes(cfg), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    else:
        config_json = json.dumps(to_dict(cfg), sort_keys=True, indent=1, ensure_ascii=True)
    lines = [
        f'"""train_gpt.py for run {cfg.run!r} ({cfg.mode}): the whole pgolf record run in one file.',
        "",
        "Run it from inside the records folder, one process per GPU:",
        "",
        "    torchrun --standalone --nproc_per_node 8 train_gpt.py --seed 42 --data-dir ./data/",
        "",
        "It trains, collects GPTQ Hessians, quantizes, packs and evaluates in one process group (see",
        "pgolf/artifact/record_run.py below). Generated by `pgolf bundle` from pgolf " + pgolf.__version__ + "; do not edit:",
        "MODULES holds the sources, CONFIG_JSON the recipe"
        + (" (its name; every value is a default of the embedded pgolf.config)" if shipped else "")
        + ", CODE_HASH the sha256 of the sources.",
        '"""',
        "",
        "import importlib.abc",
        "import importlib.machinery",
        "import json",
        "import os",
        "import sys",
        "",
        f"BUNDLE_FORMAT_VERSION = {BUNDLE_FORMAT_VERSION}",
        f"CODE_HASH = {code_hash!r}",
        "",
        f"CONFIG_JSON = {string_literal(config_json)}",
        "",
        "# module name -> (is a package, source)",
        "MODULES = {}",
    ]
    for m in sorted(modules, key=lambda m: m.name):
        lines += ["", f"MODULES[{m.name!r}] = ({m.is_package!r}, {string_literal(m.source)})"]
    text = "\n".join(lines) + "\n" + _IMPORTER + _MAIN
    return text


def check_bundle(text: str, cfg: RunConfig, modules: list[BundledModule]) -> None:
    """The written text compiles and its literals give back exactly the modules and the config it was made from."""
    try:
        tree = ast.parse(text, filename="train_gpt.py")
        compile(text, "train_gpt.py", "exec", dont_inherit=True)
    except SyntaxError as exc:
        raise BundleError(f"the bundle does not compile: {exc}") from None
    embedded: dict[str, tuple[bool, str]] = {}
    config_json = None
    for node in tree.body:
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target = node.targets[0]
        if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name) and target.value.id == "MODULES":
            embedded[ast.literal_eval(target.slice)] = ast.literal_eval(node.value)
        elif isinstance(target, ast.Name) and target.id == "CONFIG_JSON":
            config_json = ast.literal_eval(node.value)
    expected = {m.name: (m.is_package, m.source) for m in modules}
    if embedded != expected:
        differ = sorted(n for n in set(embedded) | set(expected) if embedded.get(n) != expected.get(n))
        raise BundleError(f"the bundle's MODULES do not match the sources: {differ[:5]}")
    if config_json is None or _embedded_recipe(json.loads(config_json), embedded) != to_dict(cfg):
        raise BundleError("the bundle's CONFIG_JSON and pgolf.config do not give back the config")


def _embedded_recipe(config: dict, embedded: dict[str, tuple[bool, str]]) -> dict:
    """The recipe a bundle runs, as a plain dict: CONFIG_JSON read by the bundle's own ``pgolf.config`` when that is
    the generated module (the shipped form: executed on its own, it imports only the standard library; its
    recipe class is the dataclass with a ``run`` field, whatever name shrinking gave it), else by pgolf's."""
    is_package, source = embedded.get("pgolf.config", (True, ""))
    if is_package:
        return to_dict(parse_run_config(config, "bundle CONFIG_JSON"))
    namespace: dict[str, Any] = {}
    exec(compile(source, "pgolf.config (embedded)", "exec", dont_inherit=True), namespace)  # annotations evaluated
    recipes = [v for v in namespace.values() if isinstance(v, type) and dataclasses.is_dataclass(v)
               and "run" in {f.name for f in dataclasses.fields(v)}]
    if len(recipes) != 1:
        raise BundleError(f"the bundle's pgolf.config defines {len(recipes)} recipe classes, expected 1")
    return to_dict(recipes[0](**config))  # pgolf's to_dict reads any dataclass


@dataclasses.dataclass(frozen=True)
class Bundle:
    text: str
    modules: list[BundledModule]
    code_hash: str
    third_party: dict[str, list[str]]
    left_out: dict[str, str]  # module -> why the recipe never runs it
    messages: dict[str, str] = dataclasses.field(default_factory=dict)  # error tag -> message (shrunk form)


def build_bundle(cfg: RunConfig, *, minify: bool = False, package_dir: Path = PACKAGE_DIR) -> Bundle:
    """Collect, render and self-check the bundle for ``cfg`` (nothing is written)."""
    table = module_table(cfg, minify, package_dir)
    modules, left_out = table.modules, table.left_out
    text = render_bundle(cfg, modules, shipped=minify)
    check_bundle(text, cfg, modules)
    # the sources as written (the shrunk form loses the ImportError guards that tell optional from required), but
    # the shipped form's generated pgolf.config as embedded: it is not the package's pgolf/config/__init__.py
    generated = {"pgolf.config"} if minify else set()
    originals = {m.name: (m.is_package, m.source if m.name in generated
                          else module_file(m.name, package_dir)[0].read_text(encoding="utf-8")) for m in modules}
    embedded = {m.name for m in modules}
    return Bundle(text, modules, bundle_code_hash(modules), third_party_imports(originals),
                  {name: why for name, why in left_out.items() if _is_module(name, package_dir) and name not in embedded},
                  table.messages)


def bundle_report(bundle: Bundle, minify: bool) -> dict[str, Any]:
    """What ``<out>.json`` holds: identity, counted bytes under both conventions (counted by
    :func:`pgolf.artifact.minify.counted_code` on the very bytes written, with their sha256 and the versions the
    count depends on), contents, requirements."""
    data = bundle.text.encode("utf-8")
    (file_bytes, _, sha256), (wrapper_bytes, _, _) = (counted_code(data, c, "train_gpt.py") for c in ("file", "wrapper"))
    return {
        "format_version": BUNDLE_FORMAT_VERSION,
        "sha256": sha256,
        "bytes_file": file_bytes,
        "bytes_wrapper": wrapper_bytes,
        "counted_with": counter_versions(),
        "code_hash": bundle.code_hash,
        "entry": ENTRY_MODULE,
        "minify_modules": minify,
        "modules": [m.name for m in bundle.modules],
        "left_out": bundle.left_out,
        "third_party": bundle.third_party,
        "messages": bundle.messages,  # the shipped form's error tags ('<module>:<line>' of pgolf's sources)
        "pgolf_version": pgolf.__version__,
    }


# --------------------------------------------------------------------------------------------------------------
# Running the bundle where pgolf is not importable
# --------------------------------------------------------------------------------------------------------------


LAUNCHER = """\
# Runs a script as __main__ with pgolf made unimportable: proof that a bundle needs only third-party packages.
# Usage: python -I launcher.py SCRIPT [ARGS...]   (also as the script of torchrun)
import importlib.machinery, importlib.util, os, runpy, sys

for finder in list(sys.meta_path):  # e.g. the finder of an editable install
    try:
        found = finder is not importlib.machinery.PathFinder and finder.find_spec("pgolf", None) is not None
    except Exception:
        found = False
    if found:
        sys.meta_path.remove(finder)
sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "pgolf"))]
sys.path_importer_cache.clear()
if importlib.util.find_spec("pgolf") is not None:
    raise SystemExit("launcher: could not hide pgolf from this interpreter")
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def isolated_env() -> dict[str, str]:
    """The current environment minus what could make pgolf importable or change a rank (PYTHONPATH, torchrun's
    variables)."""
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
            "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def run_isolated(script: Path, args: list[str], timeout_seconds: float = 120.0, cwd: Optional[Path] = None,
                 python: str = sys.executable) -> subprocess.CompletedProcess:
    """``script args`` under ``python -I`` (no PYTHONPATH, no user site, no current directory on sys.path) through
    :data:`LAUNCHER`, which also hides an installed pgolf, from ``cwd`` (default: the script's folder)."""
    return subprocess.run(
        [python, "-I", "-c", LAUNCHER, str(script), *args], cwd=str(cwd or script.parent), env=isolated_env(),
        capture_output=True, text=True, timeout=timeout_seconds,
    )


def verify_help(text: str, timeout_seconds: float = 120.0) -> str:
    """Run the bundle and its wrapper form (:func:`pgolf.artifact.minify.make_wrapper`) with ``--help`` in subprocesses
    where pgolf is not importable (:func:`run_isolated`); both must succeed and print the same text, returned."""
    outputs = {}
    with tempfile.TemporaryDirectory(prefix="pgolf-bundle-") as tmp:
        for form, body in (("file", text), ("wrapper", make_wrapper(text))):
            folder = Path(tmp) / form
            folder.mkdir()
            script = folder / "train_gpt.py"
            script.write_text(body, encoding="utf-8")
            proc = run_isolated(script, ["--help"], timeout_seconds)
            if proc.returncode != 0:
                raise BundleError(f"the {form} form of the bundle fails `--help` (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            outputs[form] = proc.stdout
    if outputs["file"] != outputs["wrapper"]:
        raise BundleError(f"--help differs between the file and the wrapper form:\n{outputs['file']}\n---\n{outputs['wrapper']}")
    return outputs["file"]


def write_bundle(cfg: RunConfig, out: str | Path, *, minify: bool = False, verify: bool = True) -> dict[str, Any]:
    """Build the bundle, optionally verify that it and its wrapper run ``--help`` without pgolf, then write
    ``out`` and ``<out>.json`` atomically. Returns the report."""
    out = Path(out)
    bundle = build_bundle(cfg, minify=minify)
    report = bundle_report(bundle, minify)
    if verify:
        verify_help(bundle.text)
        report["verified_help"] = True
    atomic_write_bytes(out, bundle.text.encode("utf-8"))
    atomic_write_json(report_path(out), report)
    return report


def report_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".json")
