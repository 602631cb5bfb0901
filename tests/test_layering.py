"""The import rules of docs/architecture.md, checked on the source (every import, also those inside
functions): a forbidden import added anywhere fails this test, naming the file and line."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("demmae_jax", "data_pipelines")
# The programs on top of the library: they may import any of it, and nothing below imports them.
APPS = ("demmae_jax.experiments", "demmae_jax.study", "demmae_jax.area_eval",
        "demmae_jax.baselines", "demmae_jax.probe", "demmae_jax.cli", "demmae_jax.gis.change",
        "demmae_jax.gis.evaluate")
CORE = ("demmae_jax.sharding", "demmae_jax.metrics", "demmae_jax.checkpoints", "demmae_jax.api",
        "demmae_jax.workdirs", "demmae_jax.config_files")
# (modules, the imports they must not make, why)
RULES = [
    (("data_pipelines",), ("demmae_jax",), "the data pipelines know no model"),
    (("demmae_jax.models",), ("data_pipelines", "demmae_jax.train", "demmae_jax.inference") + CORE
     + APPS, "the models are pure Flax modules"),
    (CORE, ("demmae_jax.train", "demmae_jax.inference") + APPS,
     "the core serves training and inference alike"),
    (("demmae_jax.inference",), ("demmae_jax.train",) + APPS,
     "using a trained model needs no training code"),
    (("demmae_jax.train",), APPS, "training is a library stage, not a program"),
    (PACKAGES, ("scripts", "benchmarks", "tests", "subprocess"),
     "the library never runs or imports a program: scripts call the library"),
]


def imports(path: Path) -> list[tuple[int, str]]:
  """(line, dotted name) of every import in a file; `from a import b` gives a and a.b."""
  out = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      out.append((node.lineno, node.module))
      out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
  return out


def _under(name: str, prefixes) -> bool:
  return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(root: Path) -> list[str]:
  found = []
  for package in PACKAGES:
    for path in sorted((root / package).rglob("*.py")):
      module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
      for line, name in imports(path):
        for importers, forbidden, why in RULES:
          if _under(module, importers) and _under(name, forbidden):
            found.append(f"{path.relative_to(root)}:{line}: {module} imports {name} ({why})")
  return sorted(set(found))


def test_the_library_keeps_its_import_rules():
  assert violations(ROOT) == []


def test_a_forbidden_import_is_detected(tmp_path):
  for package in PACKAGES:
    (tmp_path / package).mkdir()
  bad = tmp_path / "demmae_jax" / "inference"
  bad.mkdir()
  (bad / "__init__.py").write_text("")
  (bad / "restore.py").write_text("import jax\n\ndef f():\n  from demmae_jax.train import loop\n")
  (tmp_path / "data_pipelines" / "reader.py").write_text("from demmae_jax import api\n")
  (tmp_path / "demmae_jax" / "study.py").write_text("from demmae_jax.train import finetune\n")
  assert violations(tmp_path) == [
      "data_pipelines/reader.py:1: data_pipelines.reader imports demmae_jax (the data pipelines "
      "know no model)",
      "data_pipelines/reader.py:1: data_pipelines.reader imports demmae_jax.api (the data "
      "pipelines know no model)",
      "demmae_jax/inference/restore.py:4: demmae_jax.inference.restore imports demmae_jax.train "
      "(using a trained model needs no training code)",
      "demmae_jax/inference/restore.py:4: demmae_jax.inference.restore imports "
      "demmae_jax.train.loop (using a trained model needs no training code)"]
