"""The package runs on what `install_requires` installs: every import of the package, and the jobs, in a process that
cannot see the test-only packages (torch, pytest, hypothesis, ...) or anything else outside the runtime closure.

CI proves the same in a fresh virtual environment (`.ci/run`); these tests catch it earlier and name the module.
"""

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "qponder_jax"
# The benchmarks' reference side (`bench ... --reference`) and nothing else may import these: extras "test"/"bench".
REFERENCE_ONLY = {"torch", "trl", "datasets", "accelerate"}


def install_requires() -> list[str]:
    """The INSTALL_REQUIRES list of setup.py, read without running setup()."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "INSTALL_REQUIRES" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no INSTALL_REQUIRES list")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_distributions() -> set[str]:
    """Every distribution `pip install .` brings in: INSTALL_REQUIRES and, recursively, their own requirements
    (markers evaluated for this interpreter, extras not taken)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in install_requires()]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = _norm(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += [Requirement(r) for r in importlib.metadata.requires(req.name) or ()]
        except importlib.metadata.PackageNotFoundError:
            pass  # not installed here: a pinned requirement the installed environment lacks shows up elsewhere
    return seen


def hidden_modules() -> set[str]:
    """Top-level import names that only distributions outside the runtime closure provide."""
    allowed = runtime_distributions()
    hidden = set()
    for module, dists in importlib.metadata.packages_distributions().items():
        if not any(_norm(d) in allowed for d in dists):
            hidden.add(module)
    return hidden - {"qponder_jax", "configs"}


def _third_party_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"qponder_jax", "configs"}


def test_every_module_the_package_imports_is_pinned_in_install_requires():
    """Direct imports name their distribution in INSTALL_REQUIRES itself, not only through another's requirements."""
    direct = {_norm(Requirement(r).name) for r in install_requires()}
    providers = importlib.metadata.packages_distributions()
    assert "torch" in hidden_modules() and "pytest" in hidden_modules()  # the closure is computed, not everything
    bad = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        names = _third_party_imports(path)
        if path.parent.name == "benchmarks":
            names -= REFERENCE_ONLY
        if missing := sorted(n for n in names if not any(_norm(d) in direct for d in providers.get(n, ()))):
            bad[str(path.relative_to(REPO))] = missing
    assert not bad, f"imported at run time but not pinned in setup.py's INSTALL_REQUIRES: {bad}"


# Run in a child process: every meta-path finder refuses the hidden top-level names, so `import torch` fails and
# `importlib.util.find_spec("torch")` is None, as in an environment where they were never installed.
_BOOTSTRAP = """
import json, runpy, sys
hidden = set(json.loads(sys.argv[1]))

class Hide:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in hidden:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.finder, attr)

sys.meta_path[:] = [Hide(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
mode, target = sys.argv[2], sys.argv[3]
sys.argv = [target] + sys.argv[4:]
if mode == "module":
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    exec(compile(target, "<check>", "exec"))
"""


def _run_without_extras(mode: str, target: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    cmd = [sys.executable, "-c", _BOOTSTRAP, json.dumps(sorted(hidden_modules())), mode, target, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def test_the_hiding_child_cannot_import_torch():
    out = _run_without_extras("code", "import importlib.util; assert importlib.util.find_spec('torch') is None\n"
                                      "import torch")  # fmt: skip
    assert out.returncode != 0 and "No module named 'torch'" in out.stderr, out.stderr[-2000:]


def test_every_module_of_the_package_imports_without_the_extras():
    code = (
        "import importlib, pkgutil, qponder_jax\n"
        "names = [m.name for m in pkgutil.walk_packages(qponder_jax.__path__, 'qponder_jax.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(len(names), 'modules')\n"
    )
    out = _run_without_extras("code", code, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split()[0]) > 50


@pytest.mark.slow
def test_the_demo_runs_every_job_without_the_extras_and_says_nothing_about_torch(tmp_path):
    """The README's first command, reduced (configs/demo.py:smoke): sft, grpo, eval and export all run."""
    out = _run_without_extras("module", "qponder_jax.main", "--config=configs/demo.py:smoke", f"--workdir={tmp_path}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[stage 7/7]" in out.stdout and (tmp_path / "7_export" / "hf" / "config.json").is_file()
    assert "torch" not in (out.stdout + out.stderr).lower(), [
        line for line in (out.stdout + out.stderr).splitlines() if "torch" in line.lower()
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "target, args",
    [
        ("qponder_jax.main", ["--config=configs/distill.py:tiny"]),  # distill (the tiny teacher)
        ("qponder_jax.main", ["--config=configs/eval.py:vqa_tiny"]),  # eval on videos (PyAV decoding)
        ("qponder_jax.data.datasets", ["build", "synthetic_vqa"]),  # a tfds build (no TensorFlow)
        ("qponder_jax.bench", ["decode", "--size", "tiny", "--no-reference", "--repeats", "1"]),  # bench, our side
    ],
    ids=["distill", "eval-video", "datasets-build", "bench"],
)
def test_the_other_job_paths_run_without_the_extras(tmp_path, target, args):
    where = "--data_dir" if target == "qponder_jax.data.datasets" else "--out" if target == "qponder_jax.bench" else ""
    args = args + ([f"{where}={tmp_path}"] if where else [f"--workdir={tmp_path}"])
    out = _run_without_extras("module", target, *args)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "pytorch" not in (out.stdout + out.stderr).lower()
