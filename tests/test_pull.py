"""`pull` and `models` against a real local HTTP stand-in for the Hugging Face Hub (tests/hubstub.py).

huggingface_hub really downloads over HTTP from the stub; nothing of ours is mocked. The CLI
tests run `edge-qwen` in a subprocess with HF_ENDPOINT pointing at the stub, as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_qwen.errors import EdgeQwenError, ModelNotFoundError
from edge_qwen.hub import ALLOW_PATTERNS, IGNORE_PATTERNS, list_checkpoints, pull, snapshot_path

sys.path.insert(0, str(Path(__file__).parent))
from hubstub import HubStub  # noqa: E402

REPO = "Qwen/Qwen2.5-Stub-Instruct"
BIG = "Qwen/Qwen2.5-Stub-Big"
PRIVATE = "Qwen/Qwen2.5-Stub-Private"
GATED = "Qwen/Qwen2.5-Stub-Gated"
LLAMA = "meta/Llama-Stub"
TOKEN = "hf_stubtoken123"

WANTED = ["LICENSE", "README.md", "added_tokens.json", "config.json", "generation_config.json", "merges.txt",
          "model.safetensors", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
UNWANTED = ["pytorch_model.bin", "onnx/model.onnx", ".gitattributes", "original/consolidated.00.pth",
            "qwen2.5-stub-q4_k_m.gguf", "text_encoder/model.safetensors"]


def _safetensors(n: int, seed: int) -> bytes:
    import numpy as np
    from safetensors.numpy import save

    rng = np.random.default_rng(seed)
    return save({"model.embed_tokens.weight": rng.standard_normal((n // 64, 64), dtype=np.float32),
                 "model.norm.weight": np.ones(64, dtype=np.float32)})


def _repo_files(arch: str = "Qwen2ForCausalLM", weights: bytes = b"", note: str = "") -> dict[str, bytes]:
    config = {"architectures": [arch], "model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "torch_dtype": "float32",
              "tie_word_embeddings": False, "note": note}
    files = {
        "config.json": json.dumps(config).encode(),
        "generation_config.json": b'{"eos_token_id": 151645}',
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2},
                                      "merges": ["a b"]}, "note": "中文 ✓"}, ensure_ascii=False).encode(),
        "tokenizer_config.json": b'{"chat_template": "{% for m in messages %}<|im_start|>{% endfor %}"}',
        "vocab.json": b'{"a": 0, "b": 1, "ab": 2}',
        "merges.txt": b"#version: 0.2\na b\n",
        "special_tokens_map.json": b'{"eos_token": "<|im_end|>"}',
        "added_tokens.json": b'{"<|im_end|>": 151645}',
        "LICENSE": b"Apache License 2.0\n",
        "README.md": "# stub 模型\n".encode(),
        "model.safetensors": weights or _safetensors(64 * 64, 0),
    }
    for name in UNWANTED:
        files[name] = b"must not be fetched " + name.encode()
    return files


@pytest.fixture(scope="module")
def hub():
    stub = HubStub().start()
    stub.main_files = _repo_files()
    stub.main_commit = stub.add_commit(REPO, stub.main_files)
    stub.v1_files = _repo_files(note="v1", weights=_safetensors(64 * 32, 1))
    stub.v1_commit = stub.add_commit(REPO, stub.v1_files, revision="v1")
    stub.add_commit(REPO, stub.main_files)  # v1 is a tag; main stays where it was
    # Above 10 MiB: huggingface_hub streams in 10 MiB chunks and resumes from the last whole one.
    stub.big_files = _repo_files(weights=_safetensors(6_000_000, 2))
    stub.add_commit(BIG, stub.big_files)
    stub.add_commit(PRIVATE, _repo_files(), token=TOKEN)
    stub.add_commit(GATED, _repo_files(), token=TOKEN, gated=True)
    stub.add_commit(LLAMA, _repo_files(arch="LlamaForCausalLM"))
    yield stub
    stub.stop()


@pytest.fixture()
def online(hub, isolated_home, monkeypatch, tmp_path):
    """An empty store, online, with HF_ENDPOINT pointing at the stub Hub."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # huggingface_hub fetches an "agent harness" registry from the endpoint it read at import
    # (huggingface.co here) unless a fresh copy is cached: give it one so the tests stay offline.
    registry = tmp_path / "agent_harnesses.json"
    registry.write_text('{"standardEnvVars": [], "harnesses": {}}')
    monkeypatch.setattr(huggingface_hub.constants, "AGENT_HARNESSES_PATH", str(registry))
    hub.clear_log()
    hub.drop_once.clear()
    hub.fail.clear()
    return isolated_home


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    full.update(env)
    return subprocess.run([sys.executable, "-c", "from edge_qwen.cli import main; main()", *args],
                          capture_output=True, text=True, env=full, timeout=120)


def _no_partials(home: Path) -> None:
    leftovers = [p for p in home.rglob("*") if ".incomplete" in p.name or ".partial" in p.name]
    assert leftovers == []


def test_pull_fetches_only_what_conversion_needs(hub, online):
    r = pull(REPO, quiet=True)
    assert r.commit == hub.main_commit and r.revision == "main"
    assert r.files == WANTED and sorted(r.fetched) == WANTED
    assert r.bytes_fetched == r.total_bytes == sum(len(hub.main_files[f]) for f in WANTED)
    for f in WANTED:
        assert (r.path / f).read_bytes() == hub.main_files[f]
    fetched = hub.file_gets()
    assert not [f for f in fetched if f in UNWANTED]
    assert {f for f in fetched if not f.startswith("cdn:")} == set(WANTED) - {"model.safetensors"}
    assert r.architecture == "Qwen2ForCausalLM" and r.warnings == [] and not r.offline
    assert r.path == snapshot_path(REPO) == snapshot_path(REPO, r.commit)
    assert str(r.path).startswith(str(online / "hf"))
    # Everything is there: a second pull asks the Hub for the listing but downloads nothing.
    hub.clear_log()
    again = pull(REPO, quiet=True)
    assert again.fetched == [] and again.bytes_fetched == 0 and hub.file_gets() == []


def test_revision(hub, online):
    r = pull(REPO, revision="v1", quiet=True)
    assert r.commit == hub.v1_commit and r.revision == "v1"
    assert (r.path / "model.safetensors").read_bytes() == hub.v1_files["model.safetensors"]
    assert snapshot_path(REPO, "v1") == r.path
    with pytest.raises(ModelNotFoundError, match="edge-qwen pull Qwen/Qwen2.5-Stub-Instruct`"):
        snapshot_path(REPO)  # main was never pulled
    with pytest.raises(ModelNotFoundError, match=r"revision 'v9' does not exist in Qwen/Qwen2\.5-Stub-Instruct"):
        pull(REPO, revision="v9", quiet=True)


def test_resume_after_connection_drop(hub, online):
    from safetensors.numpy import load_file

    hub.drop_once.add("model.safetensors")
    r = pull(BIG, quiet=True)
    blob = r.path / "model.safetensors"
    assert blob.read_bytes() == hub.big_files["model.safetensors"]
    assert load_file(blob)["model.embed_tokens.weight"].shape == (6_000_000 // 64, 64)
    cdn = [q for q in hub.requests if q.method == "GET" and q.path.startswith("/cdn/")]
    ranges = [q.headers.get("range") for q in cdn]
    # The first GET was cut halfway; the second asked only for the rest.
    assert len(cdn) == 2 and ranges[0] is None and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
    _no_partials(online)


def test_interrupted_pull_completes_later(hub, online, monkeypatch):
    hub.fail.add("model.safetensors")
    with pytest.raises(EdgeQwenError, match="HTTP 500") as exc:
        pull(REPO, quiet=True)
    assert "\n" not in exc.value.message
    _no_partials(online)
    # The pool stops at the first failure: what was downloaded stays, the rest is missing.
    [snap] = (online / "hf").glob("models--*/snapshots/*")
    missing = sorted(set(WANTED) - {p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file()})
    assert "model.safetensors" in missing and len(missing) < len(WANTED)
    with pytest.raises(ModelNotFoundError, match=r"only partly.*model\.safetensors.*edge-qwen pull"):
        snapshot_path(REPO)
    [ck] = list_checkpoints()
    assert ck.repo_id == REPO and ck.n_files == len(WANTED) - len(missing) and "model.safetensors" in ck.missing
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match=r"only partly.*model\.safetensors.*HF_HUB_OFFLINE"):
        pull(REPO, quiet=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    hub.fail.clear()
    hub.clear_log()
    r = pull(REPO, quiet=True)
    assert r.fetched == missing and r.bytes_fetched == sum(len(hub.main_files[f]) for f in missing)
    refetched = sorted(f for f in hub.file_gets() if not f.startswith("cdn:"))
    assert refetched == [f for f in missing if f != "model.safetensors"]  # only what was missing
    assert snapshot_path(REPO) == r.path


def test_token_is_forwarded(hub, online, monkeypatch):
    r = pull(PRIVATE, token=TOKEN, quiet=True)
    assert (r.path / "config.json").is_file()
    hub_requests = [q for q in hub.requests if q.path.startswith(("/api/models/", f"/{PRIVATE}/"))]
    assert hub_requests and all(q.headers.get("authorization") == f"Bearer {TOKEN}" for q in hub_requests)
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the environment works as well as the argument
    assert pull(GATED, quiet=True).files == WANTED


def test_not_qwen2_warns(hub, online):
    r = pull(LLAMA, quiet=True)
    assert r.architecture == "LlamaForCausalLM"
    assert len(r.warnings) == 1 and "LlamaForCausalLM" in r.warnings[0] and "Qwen2ForCausalLM" in r.warnings[0]


def test_snapshot_path_errors(isolated_home):
    with pytest.raises(ModelNotFoundError, match="run `edge-qwen pull Qwen/Nothing-Here`"):
        snapshot_path("Qwen/Nothing-Here")
    with pytest.raises(EdgeQwenError, match="ORG/NAME"):
        snapshot_path("../etc")


def test_allow_list_covers_conversion_files():
    from fnmatch import fnmatch

    def fetched(name: str) -> bool:  # huggingface_hub's rule: some allow pattern and no ignore pattern
        return any(fnmatch(name, p) for p in ALLOW_PATTERNS) and not any(fnmatch(name, p) for p in IGNORE_PATTERNS)

    for name in WANTED + ["model-00001-of-00002.safetensors", "model.safetensors.index.json", "LICENSE.txt"]:
        assert fetched(name), name
    for name in UNWANTED:
        assert not fetched(name), name


# ---- the CLI, in a subprocess, as a user runs it ------------------------------------------------

def test_cli_pull_offline_and_models(hub, online, default_model):
    env = {"HF_ENDPOINT": hub.endpoint}
    p = _cli("pull", REPO, "--json", **env)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["commit"] == hub.main_commit and out["files"] == WANTED and out["warnings"] == []
    assert out["bytes_fetched"] == sum(len(hub.main_files[f]) for f in WANTED)

    # Offline afterwards: the store answers, the Hub is not asked.
    hub.clear_log()
    p = _cli("pull", REPO, HF_HUB_OFFLINE="1", **env)
    assert p.returncode == 0, p.stderr
    assert "found in the store (offline)" in p.stdout and hub.requests == []
    p = _cli("pull", BIG, HF_HUB_OFFLINE="1", **env)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert f"{BIG} (revision main) is not in the model store" in p.stderr and "HF_HUB_OFFLINE" in p.stderr

    # The store listing: the pulled repo, and the GGUF files in models/ (one good, one damaged).
    models = online / "models"
    models.mkdir(parents=True, exist_ok=True)
    (models / "qwen-default.gguf").symlink_to(default_model)
    (models / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 10)
    p = _cli("models", "--json")
    assert p.returncode == 0, p.stderr
    listing = json.loads(p.stdout)
    [ck] = listing["checkpoints"]
    assert (ck["repo"], ck["revisions"], ck["commit"], ck["files"]) == (REPO, ["main"], hub.main_commit, len(WANTED))
    assert ck["architecture"] == "Qwen2ForCausalLM" and Path(ck["path"]) == Path(out["path"]) and ck["complete"]
    ggufs = {g["name"]: g for g in listing["gguf"]}
    assert ggufs["qwen-default"]["file_type"] == "Q4_K_M" and ggufs["qwen-default"]["size"] == 491_400_064
    assert ggufs["broken"]["error"] and ggufs["broken"]["file_type"] is None
    assert listing["default_model"]["assembled"] is False
    p = _cli("models")
    assert p.returncode == 0 and REPO in p.stdout and "Q4_K_M" in p.stdout and "DAMAGED" in p.stdout
    p = _cli("models", "--known", "--json")
    known = {m["repo"]: m for m in json.loads(p.stdout)}
    assert known["Qwen/Qwen2.5-0.5B-Instruct"]["license"] == "apache-2.0"
    assert known["Qwen/Qwen2.5-0.5B-Instruct"]["pulled"] is False
    p = _cli("models", "--known")
    assert p.returncode == 0 and "Qwen/Qwen2.5-7B-Instruct" in p.stdout and "LICENSE" in p.stdout


@pytest.mark.parametrize("repo, env, expect", [
    ("Qwen/Does-Not-Exist", {}, "does not exist on"),
    (PRIVATE, {}, "set HF_TOKEN"),
    (PRIVATE, {"HF_TOKEN": "hf_wrong"}, "set HF_TOKEN"),
    (GATED, {}, "gated repo"),
    (REPO, {"HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot reach the Hub at http://127.0.0.1:9"),
    ("not a repo id", {}, "ORG/NAME"),
])
def test_cli_errors_are_one_line(hub, online, repo, env, expect):
    p = _cli("pull", repo, **{"HF_ENDPOINT": hub.endpoint, **env})
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    err = p.stderr.strip()
    assert err.startswith("Error: ") and "\n" not in err and expect in err, err
    assert list((online / "hf").glob("*/snapshots/*/*")) == []  # nothing landed in the store
    _no_partials(online)


def test_cli_token_option(hub, online):
    p = _cli("pull", PRIVATE, "--token", TOKEN, "-q", HF_ENDPOINT=hub.endpoint)
    assert p.returncode == 0, p.stderr
    assert f"{PRIVATE} @ main" in p.stdout
    assert any(q.headers.get("authorization") == f"Bearer {TOKEN}" for q in hub.requests)


def test_cli_warns_on_other_architectures(hub, online):
    p = _cli("pull", LLAMA, HF_ENDPOINT=hub.endpoint)
    assert p.returncode == 0, p.stderr
    assert "warning:" in p.stderr and "LlamaForCausalLM" in p.stderr


def test_pull_then_convert_by_repo_id(hub, online, tiny_checkpoint, tmp_path):
    """The whole path a user takes: pull a real (tiny, random) Qwen2 checkpoint, then convert it offline by name."""
    from edge_qwen.gguf_file import check_gguf

    files = {p.relative_to(tiny_checkpoint).as_posix(): p.read_bytes()
             for p in tiny_checkpoint.rglob("*") if p.is_file()}
    commit = hub.add_commit("Qwen/Qwen2.5-Tiny-Random", files)
    p = _cli("pull", "Qwen/Qwen2.5-Tiny-Random", "-q", HF_ENDPOINT=hub.endpoint)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "tiny.gguf"
    p = _cli("convert", "Qwen/Qwen2.5-Tiny-Random", "-o", str(out), "--outtype", "f16", "-q", HF_HUB_OFFLINE="1")
    assert p.returncode == 0, p.stderr
    info = check_gguf(out)
    assert info.architecture == "qwen2" and info.metadata["qwen2.embedding_length"] == 256
    # The converter records where the weights came from: the pulled repo and its commit.
    assert info.metadata["edge_qwen.source.repo"] == "Qwen/Qwen2.5-Tiny-Random"
    assert info.metadata["edge_qwen.source.revision"] == commit


def test_truncated_pulled_shard_names_the_pull_that_repairs_it(hub, online, tiny_checkpoint, tmp_path):
    """A pulled weights file cut short (a crash, a full disk, a bad copy): convert names the file and
    `edge-qwen pull REPO --force`; a plain pull keeps what the store has, --force downloads it again."""
    repo = "Qwen/Qwen2.5-Tiny-Cut"
    files = {p.name: p.read_bytes() for p in tiny_checkpoint.iterdir() if p.is_file()}
    hub.add_commit(repo, files)
    assert _cli("pull", repo, "-q", HF_ENDPOINT=hub.endpoint).returncode == 0
    shard = snapshot_path(repo) / "model.safetensors"
    blob = shard.resolve()
    blob.write_bytes(blob.read_bytes()[:-4096])
    out = tmp_path / "cut.gguf"

    def convert_error() -> str:
        p = _cli("convert", repo, "-o", str(out), "-q", HF_HUB_OFFLINE="1")
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        err = p.stderr.strip()
        assert err.startswith("Error: ") and "\n" not in err, err
        assert not out.exists() and not list(tmp_path.glob(".*partial*"))
        return err

    err = convert_error()
    assert f"{shard} is truncated" in err and f"`edge-qwen pull {repo} --force`" in err, err
    p = _cli("pull", repo, "-q", HF_ENDPOINT=hub.endpoint)
    assert p.returncode == 0, p.stderr
    assert "truncated" in convert_error()  # a plain pull keeps the files the store has
    p = _cli("pull", repo, "--force", HF_ENDPOINT=hub.endpoint)
    assert p.returncode == 0, p.stderr
    assert "model.safetensors" in p.stdout  # listed among the files fetched again
    assert blob.read_bytes() == files["model.safetensors"]
    p = _cli("convert", repo, "-o", str(out), "-q", HF_HUB_OFFLINE="1")
    assert p.returncode == 0, p.stderr
    _no_partials(online)
    p = _cli("pull", repo, "--force", HF_HUB_OFFLINE="1")
    assert p.returncode == 1 and p.stderr.startswith("Error: ") and "needs the network" in p.stderr, p.stderr


def test_damaged_pulled_gguf_is_named_and_pull_force_replaces_it(hub, online, tiny_checkpoint, tmp_path):
    """`pull REPO --quant Q` of a GGUF the store already has, damaged since: one line naming the file
    and `--force`; `pull --quant Q --force` downloads it again."""
    from edge_qwen.convert.writer import convert

    repo = "Qwen/Qwen2.5-Tiny-Cut-GGUF"
    q8 = convert(tiny_checkpoint, tmp_path / "tiny-q8_0.gguf", outtype="q8_0", quiet=True)
    hub.add_commit(repo, {q8.name: q8.read_bytes()})
    assert _cli("pull", repo, "--quant", "q8_0", "-q", HF_ENDPOINT=hub.endpoint).returncode == 0
    (link,) = (online / "hf").glob(f"models--{repo.replace('/', '--')}/snapshots/*/{q8.name}")
    blob = link.resolve()
    blob.write_bytes(q8.read_bytes()[:-4096])
    p = _cli("pull", repo, "--quant", "q8_0", "-q", HF_ENDPOINT=hub.endpoint)
    err = p.stderr.strip()
    assert p.returncode == 1 and "Traceback" not in p.stderr and err.startswith("Error: ") and "\n" not in err, err
    assert "is truncated" in err and f"`edge-qwen pull {repo} --quant q8_0 --force`" in err, err
    p = _cli("pull", repo, "--quant", "q8_0", "--force", "-q", HF_ENDPOINT=hub.endpoint)
    assert p.returncode == 0, p.stderr
    assert blob.read_bytes() == q8.read_bytes()
    _no_partials(online)


def test_pull_then_convert_mmproj_and_a_separate_chat_template(hub, online, tmp_path, monkeypatch):
    """A Qwen2.5-VL repo whose chat template lives in chat_template.jinja (as newer repos keep it):
    pull fetches the image preprocessor's settings and the template, so `convert --mmproj` and the
    text model's template both work offline afterwards (issue 28)."""
    from click.testing import CliRunner
    from family_models import make_family_checkpoint

    from edge_qwen.cli import main
    from edge_qwen.gguf_file import check_gguf

    ckpt = make_family_checkpoint(tmp_path / "vl", "qwen2vl")
    files = {p.name: p.read_bytes() for p in ckpt.iterdir() if p.is_file()}
    cfg = json.loads(files["tokenizer_config.json"])
    template = cfg.pop("chat_template")
    files["tokenizer_config.json"] = json.dumps(cfg).encode()
    files["chat_template.jinja"] = template.encode()
    repo = "Qwen/Qwen2.5-VL-Tiny-Random"
    hub.add_commit(repo, files)
    r = pull(repo, quiet=True)
    assert {"preprocessor_config.json", "chat_template.jinja"} <= set(r.fetched)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mmproj, text = tmp_path / "mmproj.gguf", tmp_path / "text.gguf"
    out = CliRunner().invoke(main, ["convert", repo, "--mmproj", "-o", str(mmproj), "--outtype", "f16", "-q"])
    assert out.exit_code == 0, out.output
    assert check_gguf(mmproj, architectures=None).architecture == "clip"
    out = CliRunner().invoke(main, ["convert", repo, "-o", str(text), "--outtype", "f16", "-q"])
    assert out.exit_code == 0, out.output
    assert check_gguf(text).metadata["tokenizer.chat_template"] == template
