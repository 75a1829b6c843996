"""Official GGUF repos: `pull REPO --quant Q` fetches only that quantization (all split parts when
split, loaded as one model), against the local Hub stand-in (tests/hubstub.py, real HTTP); and
checkpoints already in the user's own Hugging Face cache are used, not downloaded again."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from hubstub import HubStub  # noqa: E402

from edge_qwen.cli import main
from edge_qwen.errors import ModelNotFoundError
from edge_qwen.hub import gguf_files_for_quant, mmproj_for_quant, pull, pull_gguf, snapshot_path

REPO = "Qwen/Qwen2.5-Tiny-Instruct-GGUF"
MMPROJ = "mmproj-qwen2.5-tiny-f16.gguf"


def _tiny_mmproj(path: Path) -> Path:
    """A small valid GGUF standing in for a vision tower (only its header is read by pull)."""
    import gguf

    w = gguf.GGUFWriter(path, "clip")
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_tensor("v.patch_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _split(src: Path, out_dir: Path, stem: str, max_tensors: int) -> list[Path]:
    """Rewrite a GGUF as llama.cpp gguf-split parts (STEM-0000i-of-0000n.gguf) with gguf-py's writer."""
    import gguf

    r = gguf.GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(out_dir / f"{stem}.gguf", arch, split_max_tensors=max_tensors)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture",):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, f.contents(), vtype, sub_type=sub)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_shape=tuple(reversed([int(d) for d in t.shape])) if
                     t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else None,
                     raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sorted(out_dir.glob(f"{stem}-*-of-*.gguf"))


@pytest.fixture()
def hub(tiny_checkpoint, tmp_path, isolated_home, monkeypatch):
    import huggingface_hub.constants

    from edge_qwen.convert.writer import convert

    files: dict[str, bytes] = {}
    q8 = convert(tiny_checkpoint, tmp_path / "src" / "qwen2.5-tiny-instruct-q8_0.gguf", outtype="q8_0", quiet=True)
    f16 = convert(tiny_checkpoint, tmp_path / "src" / "f16.gguf", outtype="f16", quiet=True)
    parts = _split(f16, tmp_path / "src", "qwen2.5-tiny-instruct-f16", max_tensors=12)
    assert len(parts) == 3
    files[q8.name] = q8.read_bytes()
    files.update({p.name: p.read_bytes() for p in parts})
    files["README.md"] = b"# tiny GGUF\n"
    files[MMPROJ] = _tiny_mmproj(tmp_path / "src" / MMPROJ).read_bytes()  # pulled with the model
    stub = HubStub().start()
    stub.add_commit(REPO, files)
    monkeypatch.setenv("HF_ENDPOINT", stub.endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    registry = tmp_path / "agent_harnesses.json"  # keeps huggingface_hub from fetching its registry
    registry.write_text('{"standardEnvVars": [], "harnesses": {}}')
    monkeypatch.setattr(huggingface_hub.constants, "AGENT_HARNESSES_PATH", str(registry))
    yield stub
    stub.stop()


def test_pull_one_quant_and_split_parts(hub, monkeypatch):
    import llama_cpp

    r = pull_gguf(REPO, "Q8_0", quiet=True)
    assert r.files == ["qwen2.5-tiny-instruct-q8_0.gguf", MMPROJ] and r.path.name == r.files[0]
    assert r.architecture == "qwen2" and r.mmproj == r.path.parent / MMPROJ  # the mmproj beside its model
    assert len(hub.file_gets(REPO)) == 2  # that file and the mmproj, nothing else of the repo
    s = pull_gguf(REPO, "f16", quiet=True)
    assert s.files == [f"qwen2.5-tiny-instruct-f16-0000{i}-of-00003.gguf" for i in (1, 2, 3)] + [MMPROJ]
    assert s.path.name.endswith("-00001-of-00003.gguf")
    llm = llama_cpp.Llama(str(s.path), n_ctx=64, verbose=False)  # llama.cpp finds the other parts beside it
    try:
        assert llm.n_vocab() > 0 and llm.create_completion("hi", max_tokens=2, temperature=0)["usage"]["completion_tokens"]
    finally:
        llm.close()
    again = pull_gguf(REPO, "q8_0", quiet=True)
    assert again.fetched == [] and again.path == r.path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert pull_gguf(REPO, "q8_0", quiet=True).path == r.path  # offline: from the store
    with pytest.raises(ModelNotFoundError, match="q4_k_m.*has f16, q8_0"):
        pull_gguf(REPO, "q4_k_m", quiet=True)


def test_cli_pull_quant(hub):
    r = CliRunner().invoke(main, ["pull", REPO, "--quant", "q8_0", "-q"])
    assert r.exit_code == 0 and "qwen2.5-tiny-instruct-q8_0.gguf" in r.output, r.output
    r = CliRunner().invoke(main, ["pull", REPO, "--quant", "iq1_s"])
    assert r.exit_code != 0 and r.output.startswith("Error: ") and "q8_0" in r.output, r.output


def test_pulled_gguf_runs_by_its_repo_id(hub):
    """`run`, `show`, `list` take a pulled GGUF repo by its id, and ID:QUANT once two are pulled (issue 28)."""
    from edge_qwen.catalog import list_models
    from edge_qwen.store import resolve_model

    r = pull_gguf(REPO, "q8_0", quiet=True)
    assert resolve_model(REPO) == r.path
    out = CliRunner().invoke(main, ["show", REPO])
    assert out.exit_code == 0 and "Q8_0" in out.output, out.output
    s = pull_gguf(REPO, "f16", quiet=True)
    with pytest.raises(ModelNotFoundError, match=f"name one as {REPO}:QUANT"):
        resolve_model(REPO)
    assert resolve_model(f"{REPO}:f16") == s.path and resolve_model(f"{REPO}:q8_0") == r.path
    assert {m.name for m in list_models()} >= {f"{REPO}:q8_0", f"{REPO}:f16"}  # split parts listed once
    out = CliRunner().invoke(main, ["run", f"{REPO}:q8_0", "hi", "-n", "2", "--temp", "0"])
    assert out.exit_code == 0, out.output


def test_quant_file_choice():
    names = ["a-Q4_K_M.gguf", "a-q8_0-00002-of-00002.gguf", "a-q8_0-00001-of-00002.gguf", "mmproj-a-f16.gguf",
             "b-f16-00001-of-00003.gguf", "b-f16-00003-of-00003.gguf"]
    assert gguf_files_for_quant(names, "q4_k_m", "r") == ["a-Q4_K_M.gguf"]
    assert gguf_files_for_quant(names, "q8_0", "r") == ["a-q8_0-00001-of-00002.gguf", "a-q8_0-00002-of-00002.gguf"]
    with pytest.raises(Exception, match="incomplete"):
        gguf_files_for_quant(names, "f16", "r")


def test_checkpoint_in_the_users_hf_cache(tiny_checkpoint, isolated_home, tmp_path, monkeypatch):
    """A checkpoint downloaded before by transformers/huggingface-cli (the user's HF_HOME) is used where it is."""
    repo, commit = "acme/tiny-qwen2", "0123456789abcdef0123456789abcdef01234567"
    cache = Path(tmp_path / "hf_home" / "hub")  # isolated_home's HF_HOME
    root = cache / "models--acme--tiny-qwen2"
    snap = root / "snapshots" / commit
    shutil.copytree(tiny_checkpoint, snap)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    # huggingface_hub's offline check compares the snapshot with the commit's recorded file listing
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    found = snapshot_path(repo)
    assert found == snap
    r = pull(repo, quiet=True)
    assert r.path == snap and r.fetched == [] and "Hugging Face cache" in r.warnings[0]
    out = CliRunner().invoke(main, ["convert", repo, "-o", str(tmp_path / "x.gguf"), "-q"])
    assert out.exit_code == 0, out.output


def test_mmproj_choice():
    names = ["m-Q4_K_M.gguf", "m-Q8_0.gguf", "mmproj-m-F16.gguf", "mmproj-m-Q8_0.gguf", "mmproj-m-BF16.gguf"]
    assert mmproj_for_quant(names, "q8_0") == "mmproj-m-Q8_0.gguf"  # the model's own quantization
    assert mmproj_for_quant(names, "Q4_K_M") == "mmproj-m-F16.gguf"  # else f16
    assert mmproj_for_quant(["m-Q4_K_M.gguf"], "q4_k_m") is None


def test_gguf_in_the_users_hf_cache(hub, tmp_path, monkeypatch):
    """A quantization downloaded before by huggingface-cli or llama.cpp's -hf (the user's HF cache) is used
    from there: nothing is fetched, online or offline, and its mmproj comes with it."""
    import huggingface_hub

    user = tmp_path / "user_hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(user))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    huggingface_hub.snapshot_download(REPO, cache_dir=str(user), endpoint=hub.endpoint,
                                      allow_patterns=["qwen2.5-tiny-instruct-q8_0.gguf", MMPROJ])
    before = len(hub.file_gets(REPO))
    r = pull_gguf(REPO, "q8_0", quiet=True)
    assert r.fetched == [] and r.path.is_relative_to(user) and len(hub.file_gets(REPO)) == before
    assert "Hugging Face cache" in r.warnings[0] and r.mmproj == r.path.parent / MMPROJ
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert pull_gguf(REPO, "q8_0", quiet=True).path == r.path
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # a quantization the user's cache lacks: into the store as usual
    f16 = pull_gguf(REPO, "f16", quiet=True)
    assert not f16.path.is_relative_to(user) and f16.fetched
