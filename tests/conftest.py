"""Shared fixtures: an isolated store and HF cache per session, the real default model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_sessionstart(session):
    # Tests that load a model with llama_cpp.Llama directly get the package's CPU guard too, in
    # whatever order they run (llama.cpp's AMX kernels crash on AMX CPUs: edge_qwen.device).
    from edge_qwen.device import guard_cpu_kernels

    guard_cpu_kernels()

# Nothing in the tests may reach the network; the store is isolated from the user's.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The real default GGUF (Qwen2.5-Coder-0.5B-Instruct Q4_K_M), assembled once in the user's store.

    It is the same file in every run, so it is assembled in the real store (not a tmp dir)
    and reused; tests never write to it.
    """
    from edge_qwen.store import default_model_path

    return default_model_path()


@pytest.fixture()
def isolated_home(tmp_path, monkeypatch) -> Path:
    """A fresh EDGE_QWEN_HOME and HF cache for tests that write to the store."""
    home = tmp_path / "home"
    monkeypatch.setenv("EDGE_QWEN_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture(scope="session")
def llm(default_model):
    """The real default model loaded once for the whole session (EdgeQwen, n_ctx=4096), closed at the end."""
    from edge_qwen import EdgeQwen

    model = EdgeQwen(default_model, n_ctx=4096)
    yield model
    model.close()


# --- A served default model (the API-family tests) ---

@pytest.fixture(scope="module")
def server(llm):
    """A real HTTP server (uvicorn in a thread) over the session model as "qwen2.5"; its base URL.
    Modules that need other server options define their own `server`."""
    from edge_qwen.serve.app import ServerThread, create_app

    with ServerThread(create_app({"qwen2.5": llm})) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    """The official openai package pointed at `server` (no retries: a 5xx must fail the test)."""
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)


# --- Conversion fixtures (tiny random checkpoint, default model rebuilt and re-converted) ---

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TINY_CORPUS = [
    "def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
    "print('hello, world')  # 你好，世界", "量化模型在笔记本电脑上运行。", "JSON: {\"name\": \"Qwen\", \"size\": 0.5}",
    "emoji 🙂🚀 and numbers 12345 67890", "for i in range(10):\n\tprint(i * i)\n",
] * 20


def make_tiny_checkpoint(path: Path, tied: bool = False, dtype: str = "bfloat16", max_shard_size: str | None = None,
                         seed: int = 0) -> Path:
    """A tiny RANDOM Qwen2ForCausalLM saved by transformers itself (hidden 256 so K-quants apply,
    2 layers, 4 heads / 2 KV heads, a byte-level BPE vocab trained here with Qwen2's split regex,
    ChatML special tokens, vocab padded past the tokenizer like the real models)."""
    import torch
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from edge_qwen.convert.tokenizer import QWEN2_SPLIT_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TINY_CORPUS, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    tok.add_tokens([AddedToken("<tool_call>", special=False, normalized=False)])
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    vocab_size = (n_tok + 63) // 64 * 64 + 64  # padded embedding rows, as Qwen2 pads 151665 -> 151936
    eot, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")

    config = Qwen2Config(vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=tied,
                         bos_token_id=eot, eos_token_id=im_end, use_sliding_window=False)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # HF inits biases to 0 and norms to 1: make every tensor carry information
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.08)
    model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML_TEMPLATE)
    fast.save_pretrained(path)
    return Path(path)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Qwen2 checkpoint folder (bf16, untied lm_head), made once per session."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-qwen2")


@pytest.fixture(scope="session")
def rebuilt_checkpoint(default_model, tmp_path_factory):
    """The default model rebuilt as an f16 Hugging Face checkpoint (3 shards, ~1.2 GB), deleted at session end."""
    import shutil

    from edge_qwen.convert.rebuild import rebuild_checkpoint

    root = tmp_path_factory.mktemp("rebuilt")
    out = rebuild_checkpoint(default_model, root / "qwen2.5-coder-0.5b-instruct", dtype="f16",
                             max_shard_bytes=600_000_000, quiet=True)
    yield out
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def default_f16_gguf(rebuilt_checkpoint, tmp_path_factory):
    """rebuilt_checkpoint converted by edge-qwen to an f16 GGUF (~1.3 GB), deleted at session end."""
    from edge_qwen.convert.writer import convert

    out = convert(rebuilt_checkpoint, tmp_path_factory.mktemp("f16") / "qwen2.5-coder-0.5b-instruct-f16.gguf",
                  outtype="f16", quiet=True)
    yield out
    out.unlink(missing_ok=True)
