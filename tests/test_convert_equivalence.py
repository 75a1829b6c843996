"""edge-qwen's converter checked against code nobody here wrote, on the real model.

The default GGUF was made by llama.cpp's own converter. We rebuild a Hugging Face checkpoint
from it (f16), convert that back with edge-qwen, and compare with the original file, with
llama.cpp, with Hugging Face tokenizers and with transformers.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow

# English, Chinese, code, emoji, digits, whitespace runs and special tokens.
MIXED = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "请用 Python 写一个快速排序函数，并解释它的时间复杂度。 Thanks! 🙂🚀👍🏽\n"
    "```python\ndef quicksort(xs: list[int]) -> list[int]:\n    if len(xs) <= 1:\n        return xs\n"
    "    pivot, *rest = xs\n    return quicksort([x for x in rest if x < pivot]) + [pivot] + "
    "quicksort([x for x in rest if x >= pivot])\n```\n"
    "The year 2024 had 366 days; 3.14159 ≈ π. It's we'll they're I'M  \t  spaced   out.\n"
    "量化可以把模型缩小到原来的四分之一，同时几乎不损失精度。<|im_end|>\n<|im_start|>assistant\n"
)
PROSE = (
    "Large language models predict the next token from the tokens before it. To run them on a laptop, "
    "their weights are stored in fewer bits: eight, five or four bits per weight instead of sixteen. "
    "这种方法叫做量化，它让模型在普通电脑上也能快速运行。 The trade-off is a small loss in quality, "
    "measured as perplexity on held-out text. A good conversion tool must keep every tensor exactly, "
    "keep the tokenizer identical, and write the metadata the runtime needs: context length, rope base, "
    "number of heads and the chat template.\n\ndef fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n"
    "        a, b = b, a + b\n    return a\n\nprint([fib(i) for i in range(10)])  # 0 1 1 2 3 5 8 13 21 34\n"
    "Qwen2.5 is a family of models from Alibaba Cloud. 通义千问支持中文和英文，也能写代码。 "
)


@pytest.fixture(scope="module")
def original(default_model):
    import gguf

    return gguf.GGUFReader(str(default_model))


@pytest.fixture(scope="module")
def ours_f16(default_f16_gguf):
    import gguf

    return gguf.GGUFReader(str(default_f16_gguf))


def _plain_arrays(path) -> dict[str, tuple[int, np.ndarray]]:
    """name -> (ggml type, float array) of an F32/F16 GGUF, memory-mapped (no slow full parse)."""
    from edge_qwen.gguf_file import read_header

    _meta, tensors, start = read_header(path)
    out = {}
    for name, shape, ttype, off in tensors:
        dtype = {0: np.float32, 1: np.float16}[ttype]
        out[name] = (ttype, np.memmap(path, dtype=dtype, mode="r", offset=start + off, shape=tuple(reversed(shape))))
    return out


def _values(t) -> np.ndarray:
    import gguf

    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))


def _original_values(original):
    for t in original.tensors:
        # the rebuilt checkpoint holds llama.cpp's dequantized values rounded to f16
        yield t.name, _values(t).astype(np.float16)


def test_greedy_predictions_agree(default_model, default_f16_gguf, rebuilt_checkpoint):
    """llama.cpp on our f16 GGUF predicts what transformers predicts from the checkpoint (f32 compute).

    (The f32 output type is checked tensor for tensor on the tiny checkpoints in test_convert.py;
    a 2.5 GB f32 copy of the real model would add disk and time, not coverage.)
    """
    import torch
    from transformers import AutoModelForCausalLM

    ids = _positions(default_model)
    ours = _llama_argmax(default_f16_gguf, ids)
    orig = _llama_argmax(default_model, ids)
    model = AutoModelForCausalLM.from_pretrained(rebuilt_checkpoint, dtype=torch.float32)
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0].argmax(-1).numpy()
    del model
    vs_hf, vs_orig = (ours == hf).mean(), (ours == orig).mean()
    print(f"greedy agreement over {len(ids)} positions: edge-qwen f16 vs transformers {vs_hf:.4f}, "
          f"vs original Q4_K_M {vs_orig:.4f}")
    assert vs_hf >= 0.99
    assert vs_orig >= 0.98


def test_f16_tensors_within_f16_rounding(original, default_f16_gguf):
    f16 = _plain_arrays(default_f16_gguf)
    assert f16.keys() == {t.name for t in original.tensors}
    for name, want in _original_values(original):
        ttype, got = f16[name]
        assert ttype == (1 if got.ndim > 1 else 0)  # F16 matrices, F32 norms and biases
        assert np.array_equal(got, want), name


def test_metadata_matches_llama_cpp_converter(original, ours_f16):
    import gguf

    ours = ours_f16
    skip = {"general.file_type", "general.quantization_version"}  # Q4_K_M vs f16 differ by design

    def keys(r):
        return {k: f for k, f in r.fields.items()
                if k.startswith(("qwen2.", "tokenizer.", "general.architecture", "general.name")) and k not in skip}

    a, b = keys(original), keys(ours)
    # The default GGUF was made by an older llama.cpp converter; today's (the sdist's, whose output
    # the family tests match hash for hash) also writes add_eos_token = false for a ByteLevel
    # post-processor, which is llama.cpp's default when the key is absent.
    if "tokenizer.ggml.add_eos_token" not in a:
        assert b.pop("tokenizer.ggml.add_eos_token").contents() is False
    assert sorted(a.keys() - b.keys()) == sorted(b.keys() - a.keys()) == []
    for k in a:
        assert a[k].contents() == b[k].contents(), k
    assert ours.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    assert "edge_qwen.source.sha256" in ours.fields


def test_tokenization_identical(default_model, default_f16_gguf, rebuilt_checkpoint):
    import llama_cpp
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    def llama_ids(path, text):
        llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        try:
            return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        finally:
            llm.close()

    hf_tok = Tokenizer.from_file(str(rebuilt_checkpoint / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(rebuilt_checkpoint)
    for text in (MIXED, PROSE, "<tool_call>{\"a\": 1}</tool_call><|endoftext|>", "   leading spaces\n\n\nand 🙂"):
        want = llama_ids(default_model, text)
        assert llama_ids(default_f16_gguf, text) == want
        assert hf_tok.encode(text, add_special_tokens=False).ids == want
        assert auto(text, add_special_tokens=False)["input_ids"] == want
    assert hf_tok.decode(llama_ids(default_model, MIXED), skip_special_tokens=False) == MIXED


def _positions(default_model) -> list[int]:
    import llama_cpp

    llm = llama_cpp.Llama(str(default_model), vocab_only=True, verbose=False)
    ids = llm.tokenize((MIXED + PROSE * 3).encode("utf-8"), add_bos=False, special=True)
    llm.close()
    assert len(ids) >= 400
    return ids[:400]


def _llama_argmax(path, ids) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=512, n_batch=512, logits_all=True, verbose=False, n_threads=2)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)]).argmax(1)
    finally:
        llm.close()


def test_chat_template_renders_identically(original, ours_f16, rebuilt_checkpoint):
    from edge_qwen.chat_template import render_chat
    from transformers import AutoTokenizer

    ours = ours_f16.fields["tokenizer.chat_template"].contents()
    assert ours == original.fields["tokenizer.chat_template"].contents()
    tok = AutoTokenizer.from_pretrained(rebuilt_checkpoint)
    conversations = [
        [{"role": "user", "content": "写一个 hello world 🙂"}],
        [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "List 3 primes."},
         {"role": "assistant", "content": "{\"primes\": [2, 3, 5]}"}, {"role": "user", "content": "More?"}],
    ]
    for messages in conversations:
        for gen in (True, False):
            want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert render_chat(ours, messages, add_generation_prompt=gen) == want
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "查询天气",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    messages = [{"role": "user", "content": "北京天气怎么样?"}]
    want = tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert "<tools>" in want and render_chat(ours, messages, tools=tools) == want
