"""The install a newcomer does: README's commands, .ci/run, and the declared dependency bounds.

A dependency's newest release broke a fresh install once (hypothesis 6.170.10 removed what
hypothesis-jsonschema 0.23 calls) while CI, reusing an old environment, stayed green. These tests
keep the three places that describe the install in agreement, and check that what is installed
lies inside the bounds pyproject.toml declares.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _readme_commands() -> list[str]:
    """The commands of the README's first bash block (comments stripped)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command_in_a_fresh_venv():
    install, test = _readme_commands()
    assert install.startswith("pip install -e '.[model]'") and "edge-qwen demo" in install
    assert test.endswith("python -m pytest") and "'.[model,test]'" in test
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = [line.strip() for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == test, "the last line of .ci/run must be the README's test command, verbatim"
    fresh = [c for c in commands if "venv" in c]
    assert any(c.startswith("rm -rf") for c in fresh) and any("-m venv" in c for c in fresh)
    assert any(c.startswith("source") and "activate" in c for c in commands)


def test_ci_venv_must_lie_outside_the_checkout(tmp_path):
    # The guard runs before anything is installed or removed; a venv inside the checkout would be
    # found by pytest's collection and make the clone dirty.
    r = subprocess.run(["bash", str(ROOT / ".ci" / "run")], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "EDGE_QWEN_CI_VENV": str(ROOT / "ci-venv")})
    assert r.returncode == 2 and "outside the checkout" in r.stderr
    assert not (ROOT / "ci-venv").exists()


def _declared() -> list[Requirement]:
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    for extra in ("model", "test"):
        reqs += [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"][extra]]
    return reqs


def test_every_declared_dependency_has_an_upper_bound():
    # A lower bound alone lets pip take any future release; one that breaks us must fail in CI
    # (fresh venv) with a bound to move, not at a user's machine with no explanation.
    loose = [str(r) for r in _declared()
             if not any(s.operator in ("<", "<=", "==", "~=") for s in r.specifier)]
    assert not loose, f"declare an upper bound (or an exact pin) for: {loose}"


def test_installed_versions_lie_inside_the_declared_bounds():
    outside = []
    for req in _declared():
        if req.marker and not req.marker.evaluate():
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            outside.append(f"{req.name} is not installed (declared {req})")
            continue
        if not req.specifier.contains(version, prereleases=True):
            outside.append(f"{req.name} {version} is outside {req.specifier}")
    assert not outside, "\n".join(outside)


def test_hypothesis_pair_works_together():
    # The incompatibility the bounds exist for: hypothesis-jsonschema draws objects with
    # hypothesis' internal `many(...).more()`, which hypothesis 6.170.10 removed.
    from hypothesis import given, settings
    from hypothesis_jsonschema import from_schema

    seen = []

    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name"], "maxProperties": 2}

    @settings(max_examples=10, database=None, deadline=None)
    @given(from_schema(schema))
    def draw(value):
        seen.append(value)
        assert isinstance(value, dict) and isinstance(value["name"], str) and len(value) <= 2

    draw()
    assert seen


@pytest.mark.parametrize("script", ["hf_to_gguf.py", "quantize.py"])
def test_convert_scripts_show_help(script):
    r = subprocess.run([sys.executable, str(ROOT / "convert" / script), "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "Usage" in r.stdout, shlex.join([script, r.stderr[-500:]])
