"""The package skeleton: CLI entry, store, GGUF checks, safe outputs."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from edge_qwen import __version__
from edge_qwen.cli import main
from edge_qwen.errors import ModelFileError, OutputExistsError
from edge_qwen.files import atomic_output
from edge_qwen.gguf_file import check_gguf


def test_version_and_help():
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output
    r = CliRunner().invoke(main, ["-h"])
    assert r.exit_code == 0 and "demo" in r.output


def test_import_is_light():
    code = "import sys, edge_qwen, edge_qwen.cli; print(sorted(m for m in ('llama_cpp','numpy','torch','gguf','fastapi') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_default_model_checks(default_model):
    info = check_gguf(default_model)
    assert info.architecture == "qwen2"
    assert info.n_tensors == 291
    assert info.metadata["tokenizer.ggml.pre"] == "qwen2"
    assert info.metadata["qwen2.embedding_length"] == 896
    assert 6.0 < info.bits_per_weight < 6.4


@pytest.mark.parametrize("cut", [4, 100, 5_000_000, 400_000_000])
def test_truncated_gguf_is_refused(default_model, tmp_path, cut):
    bad = tmp_path / "cut.gguf"
    with open(default_model, "rb") as f:
        bad.write_bytes(f.read(cut))
    with pytest.raises(ModelFileError, match="truncated|not a GGUF|damaged"):
        check_gguf(bad)


def test_foreign_and_missing_files(tmp_path):
    foreign = tmp_path / "x.gguf"
    foreign.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with pytest.raises(ModelFileError, match="not a GGUF"):
        check_gguf(foreign)
    with pytest.raises(ModelFileError, match="does not exist"):
        check_gguf(tmp_path / "nope.gguf")
    with pytest.raises(ModelFileError, match="folder"):
        check_gguf(tmp_path)


def test_atomic_output_never_leaves_partial(tmp_path):
    out = tmp_path / "o.bin"
    with pytest.raises(RuntimeError):
        with atomic_output(out) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_output(out) as tmp:
        tmp.write_bytes(b"whole")
    assert out.read_bytes() == b"whole"
    with pytest.raises(OutputExistsError, match="--force"):
        with atomic_output(out) as tmp:
            tmp.write_bytes(b"again")
    with atomic_output(out, force=True) as tmp:
        tmp.write_bytes(b"forced")
    assert out.read_bytes() == b"forced"
