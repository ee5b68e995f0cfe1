"""Imports run one way, down the layers of STYLE.md ("Layers").

Every module of the package (and the TFDS builders under data/, the data layer) is parsed with `ast`,
function bodies included, and its imports must: form no cycle; never reach a top-level script or
`configs/` (configs import the package, not the other way); never go up the layers (training and
inference share a rank and import neither each other); and sit at module level, except the optional
heavy extras of ALLOWED_IN_FUNCTIONS. Dynamic imports (importlib) are not seen. Below the entry points,
models/, kernels/, datasets/, inference/ and serving/ take the typed slices of dreamzero_jax/settings.py,
never the ml_collections config (SETTINGS_ONLY; `_whole_config_uses` says what is seen).
"""
import ast
import dataclasses
import fnmatch
import os
import sys
import typing

from dreamzero_jax import settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ('dreamzero_jax', 'data')   # the package, and the TFDS builders (the data layer)

# STYLE.md's layers, bottom up: (name, rank, module patterns). A module may import from a lower rank
# or from its own layer.
LAYERS = (
    ('foundations', 0, ('dreamzero_jax', 'dreamzero_jax.config', 'dreamzero_jax.flow', 'dreamzero_jax.sharding',
                        'dreamzero_jax.checkpoint', 'dreamzero_jax.torch_files', 'dreamzero_jax.embodiments',
                        'dreamzero_jax.errors', 'dreamzero_jax.checks', 'dreamzero_jax.settings')),
    # models.encoders: the frozen encoders turn a data batch into the DiT's inputs (LatentBatch); training
    # and inference both run them, so they sit below both (and below the data layer: they read a batch's
    # arrays, never a dataset).
    ('models', 1, ('dreamzero_jax.models*', 'dreamzero_jax.kernels*')),
    ('data', 2, ('dreamzero_jax.datasets*', 'dreamzero_jax.envs*', 'data*')),
    ('training', 3, ('dreamzero_jax.training*',)),
    ('inference', 3, ('dreamzero_jax.inference*',)),
    ('evaluation', 4, ('dreamzero_jax.evaluation*',)),
    ('serving', 5, ('dreamzero_jax.serve', 'dreamzero_jax.serving*')),
    ('entry points', 6, ('dreamzero_jax.quickstart', 'dreamzero_jax.evaluate', 'dreamzero_jax.convert',
                          'dreamzero_jax.summary', 'dreamzero_jax.experiments*')),
)
# Repository top level that the package must not import: scripts, configs, builders, benchmarks.
TOP_LEVEL = ('train', 'eval', 'configs', 'data', 'bench', 'tests')
# Optional heavy extras: imported inside the functions that need them.
ALLOWED_IN_FUNCTIONS = (
    'torch',                               # converters and references ([test])
    'metaworld', 'mujoco', 'matplotlib',   # the simulator and the results plots ([sim])
    'libtpu', 'jax.experimental.topologies', 'jax.experimental.pallas.ops.tpu',   # TPU only
    'tensorflow',                          # RLDS sources ([tf])
    'av', 'pyarrow',                       # LeRobot video and parquet
    # The TFDS / Grain readers, for training/vae_training.py's episode_frames alone: its objective and update
    # then import where they are not installed (bench/vae_sweep.py on a lent GPU machine).
    'dreamzero_jax.datasets.pipeline',
)

# Imports the layer order allows but the design does not: (importers, imported, why), module patterns.
FORBIDDEN = (
    (('dreamzero_jax.serve', 'dreamzero_jax.serving*', 'dreamzero_jax.inference*'), ('dreamzero_jax.training*',),
     'serving runs without training'),
)
BENCH = 'bench'   # benchmarks call the product, never the tests' fixtures

# Known exceptions (none): an entry here must still occur, or the test fails.
KNOWN_VIOLATIONS: set[str] = set()


def _modules() -> dict[str, str]:
  """Module name -> path, for every .py file under SOURCES."""
  out = {}
  for source in SOURCES:
    for folder, _, files in os.walk(os.path.join(ROOT, source)):
      for name in files:
        if name.endswith('.py'):
          path = os.path.join(folder, name)
          parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
          out['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
  return out


MODULES = _modules()


def _layer(module: str) -> tuple[str, int]:
  found = [(name, rank) for name, rank, patterns in LAYERS if any(fnmatch.fnmatch(module, p) for p in patterns)]
  assert len(found) == 1, f'{module}: in {len(found)} layers of LAYERS (expected exactly one)'
  return found[0]


def _bench_modules() -> dict[str, str]:
  """Module name -> path, for every bench/*.py."""
  folder = os.path.join(ROOT, BENCH)
  return {f'{BENCH}.{name[:-3]}': os.path.join(folder, name) for name in sorted(os.listdir(folder))
          if name.endswith('.py')} if os.path.isdir(folder) else {}


def _imports(module: str, path: str | None = None) -> list[tuple[str, str, int, bool]]:
  """(imported module, dotted name, line, inside a function) for every name `module` imports: for
  `from X import y`, the module is X.y where that is a scanned module, else X; the dotted name X.y."""
  path = path or MODULES[module]
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  package = module if path.endswith('__init__.py') else module.rpartition('.')[0]
  out = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, ast.Import):
        out.extend((alias.name, alias.name, child.lineno, in_function) for alias in child.names)
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ''
        if child.level:
          anchor = package.split('.')[:len(package.split('.')) - child.level + 1]
          base = '.'.join(anchor + ([base] if base else []))
        for alias in child.names:
          name = f'{base}.{alias.name}'
          out.append((name if name in MODULES else base, name, child.lineno, in_function))
      visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

  visit(tree, False)
  return out


def _internal(name: str) -> str | None:
  """The scanned module an imported name loads (its longest prefix among MODULES), or None."""
  parts = name.split('.')
  for n in range(len(parts), 0, -1):
    if '.'.join(parts[:n]) in MODULES:
      return '.'.join(parts[:n])
  return None


def _extra(name: str) -> bool:
  return any(name == e or name.startswith(e + '.') for e in ALLOWED_IN_FUNCTIONS)


def _graph() -> dict[str, set[str]]:
  return {m: {t for name, _, _, _ in _imports(m) if (t := _internal(name)) and t != m} for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def connect(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        connect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
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

  for v in sorted(graph):
    if v not in index:
      connect(v)
  return out


def _violations() -> dict[str, list[str]]:
  """'importer -> imported' -> why, for every import that breaks a rule."""
  out: dict[str, list[str]] = {}
  for module in sorted(MODULES):
    layer, rank = _layer(module)
    for name, dotted, line, in_function in _imports(module):
      where = f'{os.path.relpath(MODULES[module], ROOT)}:{line}'
      target = _internal(name)
      top = name.split('.')[0]
      key = f'{module} -> {target or name}'
      if module.split('.')[0] == 'dreamzero_jax' and top in TOP_LEVEL:
        out.setdefault(key, []).append(f'{where}: the package imports the top-level {top!r}')
      elif target is not None and target != module:
        target_layer, target_rank = _layer(target)
        if target_rank > rank or (target_rank == rank and target_layer != layer):
          out.setdefault(key, []).append(f'{where}: {layer} imports {target_layer}')
        for importers, imported, why in FORBIDDEN:
          if any(fnmatch.fnmatch(module, p) for p in importers) and any(fnmatch.fnmatch(target, p) for p in imported):
            out.setdefault(key, []).append(f'{where}: {why}')
      if in_function and not _extra(dotted):
        out.setdefault(key, []).append(f'{where}: imported inside a function (only ALLOWED_IN_FUNCTIONS are)')
  return out


def _bench_violations() -> list[str]:
  """Every import of the tests package by a benchmark (function bodies included)."""
  return [f'{os.path.relpath(path, ROOT)}:{line}: {BENCH}/ imports {name}'
          for module, path in _bench_modules().items() for name, _, line, _ in _imports(module, path)
          if name.split('.')[0] == 'tests']


def test_every_module_has_one_layer():
  for module in MODULES:
    _layer(module)


def test_no_import_cycles():
  cycles = _cycles(_graph())
  assert not cycles, 'import cycles (function-level imports count):\n' + '\n'.join(' <-> '.join(c) for c in cycles)


def test_imports_run_down_the_layers():
  violations = _violations()
  new = {k: v for k, v in violations.items() if k not in KNOWN_VIOLATIONS}
  assert not new, 'imports against STYLE.md "Layers":\n' + '\n'.join(
      f'  {k}\n' + '\n'.join(f'    {why}' for why in v) for k, v in sorted(new.items()))
  fixed = sorted(KNOWN_VIOLATIONS - set(violations))
  assert not fixed, 'KNOWN_VIOLATIONS that no longer occur (remove them): ' + ', '.join(fixed)


def test_benchmarks_import_nothing_of_the_tests():
  violations = _bench_violations()
  assert not violations, 'benchmarks call the product, not the tests:\n' + '\n'.join(violations)


def _tmp_package(tmp_path, monkeypatch, files: dict[str, str]) -> None:
  """A repository of `files` (path -> source; packages get an empty __init__.py) scanned instead of ROOT."""
  for name, source in files.items():
    path = tmp_path / name
    for parent in reversed(path.relative_to(tmp_path).parents[:-1]):
      (tmp_path / parent).mkdir(exist_ok=True)
      if parent.parts[0] != BENCH and not (tmp_path / parent / '__init__.py').exists():
        (tmp_path / parent / '__init__.py').write_text('')
    path.write_text(source)
  this = sys.modules[__name__]
  monkeypatch.setattr(this, 'ROOT', str(tmp_path))
  monkeypatch.setattr(this, 'MODULES', _modules())


def test_the_checker_refuses_training_in_serving_and_inference(tmp_path, monkeypatch):
  """serving/, inference/ and serve.py import nothing of training/, even though it ranks lower."""
  _tmp_package(tmp_path, monkeypatch, {
      'dreamzero_jax/training/trainer.py': '',
      'dreamzero_jax/serving/loading.py': 'from dreamzero_jax.training import trainer\n',
      'dreamzero_jax/serve.py': 'def f():\n  from .training import trainer\n',
      'dreamzero_jax/inference/policy.py': 'import dreamzero_jax.training.trainer\n',
      'dreamzero_jax/evaluate.py': 'from dreamzero_jax.training import trainer\n'})
  violations = _violations()
  for importer in ('dreamzero_jax.serving.loading', 'dreamzero_jax.serve', 'dreamzero_jax.inference.policy'):
    why = violations[f'{importer} -> dreamzero_jax.training.trainer']
    assert any('serving runs without training' in w for w in why), why
  assert 'dreamzero_jax.evaluate -> dreamzero_jax.training.trainer' not in violations   # an entry point may


def test_the_checker_refuses_configs_and_upward_imports_of_the_base_config(tmp_path, monkeypatch):
  """The base config is foundations: it imports no layer above, and no package module imports configs/."""
  _tmp_package(tmp_path, monkeypatch, {
      'dreamzero_jax/config.py': 'from dreamzero_jax.datasets import canvas\n',
      'dreamzero_jax/datasets/canvas.py': '',
      'dreamzero_jax/models/dit.py': 'def f():\n  from configs import base\n'})
  violations = _violations()
  assert any('foundations imports data' in w for w in violations['dreamzero_jax.config -> dreamzero_jax.datasets.canvas'])
  assert any("top-level 'configs'" in w for w in violations['dreamzero_jax.models.dit -> configs'])


def test_the_checker_refuses_benchmarks_importing_tests(tmp_path, monkeypatch):
  _tmp_package(tmp_path, monkeypatch, {
      'bench/fine.py': 'from dreamzero_jax.models import dit\n',
      'bench/bad.py': 'def f():\n  from tests.wan_reference import import_wan\n',
      'bench/worse.py': 'import tests.helpers\n',
      'dreamzero_jax/models/dit.py': ''})
  assert sorted(_bench_violations()) == ['bench/bad.py:2: bench/ imports tests.wan_reference',
                                         'bench/worse.py:1: bench/ imports tests.helpers']


def test_the_checker_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
  """An upward import hidden in a function body, written relatively, is found."""
  package = tmp_path / 'dreamzero_jax' / 'models'
  package.mkdir(parents=True)
  (tmp_path / 'dreamzero_jax' / '__init__.py').write_text('')
  (package / '__init__.py').write_text('')
  (package / 'dit.py').write_text('def f():\n  from ..inference import kv_cache\n')
  inference = tmp_path / 'dreamzero_jax' / 'inference'
  inference.mkdir()
  (inference / '__init__.py').write_text('')
  (inference / 'kv_cache.py').write_text('from dreamzero_jax.models import dit\n')
  this = sys.modules[__name__]
  monkeypatch.setattr(this, 'ROOT', str(tmp_path))
  monkeypatch.setattr(this, 'MODULES', _modules())
  assert _cycles(_graph()) == [['dreamzero_jax.inference.kv_cache', 'dreamzero_jax.models.dit']]
  why = _violations()['dreamzero_jax.models.dit -> dreamzero_jax.inference.kv_cache']
  assert any('models imports inference' in w for w in why) and any('inside a function' in w for w in why)


def test_serving_and_the_vae_objective_import_without_the_dataset_readers():
  """The policy server (and bench/policy_latency.py through inference.policy) and training/vae_training.py's
  objective load no TFDS or Grain: a GPU machine or a robot-side server needs neither."""
  import subprocess
  code = ('import sys; import dreamzero_jax.serve, dreamzero_jax.inference.policy, dreamzero_jax.training.vae_training; '
          'print(sorted(m for m in ("tensorflow_datasets", "grain") if m in sys.modules))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, check=True).stdout
  assert out.strip().splitlines()[-1] == '[]'


# ---- typed settings below the entry points ---------------------------------------------------------
# The layers under the entry points take the typed slices of dreamzero_jax/settings.py, never the
# ml_collections config (STYLE.md "Layers"; the entry points convert once). The datasets CLI is an
# entry point and may keep the config.
SETTINGS_ONLY = ('dreamzero_jax.models*', 'dreamzero_jax.kernels*', 'dreamzero_jax.datasets*',
                 'dreamzero_jax.inference*', 'dreamzero_jax.serving*')
SETTINGS_ENTRY_POINTS = ('dreamzero_jax.datasets.__main__',)
# The config's keys SECTION -> its fields: the slices of settings.Settings.
SECTIONS = {name: frozenset(f.name for f in dataclasses.fields(kind))
            for name, kind in typing.get_type_hints(settings.Settings).items() if dataclasses.is_dataclass(kind)}


def _typed(annotation) -> bool:
  """An annotation of a type other than a ConfigDict (settings.Settings, a RolloutSpec, ...)."""
  return annotation is not None and 'ConfigDict' not in ast.unparse(annotation)


def _whole_config_uses(module: str) -> list[str]:
  """Where `module` imports ml_collections or takes the whole config: a parameter annotated ConfigDict,
  or an attribute chain NAME.SECTION.FIELD (SECTION.FIELD a key of the config, e.g. `cfg.data.cameras`)
  whose NAME is not `self` nor a parameter or variable annotated with another type (the typed
  aggregate settings.Settings, which a Policy or a loader may take; a RolloutSpec's `spec.sampler.x`).
  A heuristic: `self.cfg.data.x`, a section passed on whole (`f(cfg.data)`) or a config parameter
  annotated as something else is not seen."""
  path = MODULES[module]
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  out = []
  where = lambda node: f'{os.path.relpath(path, ROOT)}:{node.lineno}'

  def visit(node, typed: frozenset):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
      for arg in args:
        if arg.annotation is not None and 'ConfigDict' in ast.unparse(arg.annotation):
          out.append(f'{where(arg)}: parameter {arg.arg!r} is a ConfigDict')
      local = {a.arg for a in args if _typed(a.annotation)}
      local |= {n.target.id for n in ast.walk(node) if isinstance(n, ast.AnnAssign)
                and isinstance(n.target, ast.Name) and _typed(n.annotation)}
      typed = typed | local
    elif isinstance(node, ast.Import) and any(a.name.split('.')[0] == 'ml_collections' for a in node.names):
      out.append(f'{where(node)}: imports ml_collections')
    elif isinstance(node, ast.ImportFrom) and (node.module or '').split('.')[0] == 'ml_collections':
      out.append(f'{where(node)}: imports ml_collections')
    elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
          and isinstance(node.value.value, ast.Name) and node.attr in SECTIONS.get(node.value.attr, ())
          and node.value.value.id not in typed | {'self'}):
      out.append(f'{where(node)}: {node.value.value.id}.{node.value.attr}.{node.attr} reads the whole config')
    for child in ast.iter_child_nodes(node):
      visit(child, typed)

  visit(tree, frozenset())
  return out


def _settings_violations() -> dict[str, list[str]]:
  return {m: why for m in sorted(MODULES)
          if any(fnmatch.fnmatch(m, p) for p in SETTINGS_ONLY) and m not in SETTINGS_ENTRY_POINTS
          and (why := _whole_config_uses(m))}


def test_the_layers_below_the_entry_points_take_settings_not_the_config():
  violations = _settings_violations()
  assert not violations, 'the whole config below the entry points (take settings.py slices):\n' + '\n'.join(
      f'  {m}\n' + '\n'.join(f'    {why}' for why in v) for m, v in violations.items())


def test_the_settings_checker_sees_a_config_import_parameter_and_section_chain(tmp_path, monkeypatch):
  """A planted ml_collections import, ConfigDict parameter and `cfg.data.cameras` are found; the typed
  aggregate, a typed spec, chains that name no config key, the datasets CLI and training (not in
  SETTINGS_ONLY) pass."""
  package = tmp_path / 'dreamzero_jax'
  for folder in ('inference', 'datasets', 'training'):
    (package / folder).mkdir(parents=True)
    (package / folder / '__init__.py').write_text('')
  (package / '__init__.py').write_text('')
  (package / 'inference' / 'bad.py').write_text(
      'import ml_collections\n'
      'def f(cfg: ml_collections.ConfigDict):\n  return cfg\n'
      'def g(cfg):\n  return cfg.data.cameras\n')
  (package / 'inference' / 'good.py').write_text(
      'from dreamzero_jax.settings import Settings\n'
      'def f(settings: Settings, data):\n  return settings.data.cameras, data.cameras, lambda: settings.model.dim\n'
      'def g(x, spec: RolloutSpec):\n  settings: Settings = x\n  return settings.video.height, spec.sampler.kind\n'
      'def h(enc):\n  return enc.vae.encode, enc.model.dim_of\n')
  (package / 'datasets' / '__main__.py').write_text('import ml_collections\ndef f(cfg):\n  return cfg.data.dir\n')
  (package / 'training' / 'loop.py').write_text('import ml_collections\ndef f(cfg):\n  return cfg.train.steps\n')
  this = sys.modules[__name__]
  monkeypatch.setattr(this, 'ROOT', str(tmp_path))
  monkeypatch.setattr(this, 'MODULES', _modules())
  violations = _settings_violations()
  assert list(violations) == ['dreamzero_jax.inference.bad']
  assert [why.split(': ', 1)[1] for why in violations['dreamzero_jax.inference.bad']] == [
      'imports ml_collections', "parameter 'cfg' is a ConfigDict", 'cfg.data.cameras reads the whole config']
