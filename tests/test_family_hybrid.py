"""The hybrid Qwen models (Qwen3.5, Qwen3.5-MoE, Qwen3-Next): conversion tensor-identical to
llama.cpp's converter (with and without the MTP block), quantization with an importance matrix,
layer kinds, the runtime's safe prompt path, and the server answering through the openai client.

The reference is RECORDED (tests/data/llamacpp_reference_hybrid.json), as for the other family
models: tests/make_llamacpp_reference.py --hybrid runs llama.cpp's convert_hf_to_gguf.py
(llama-cpp-python 0.3.36's sdist) on the tiny checkpoints of tests/family_hybrid.py and writes it.
"""

from __future__ import annotations

import json
import shutil
import warnings
from functools import lru_cache
from pathlib import Path

import pytest
from click.testing import CliRunner

from family_hybrid import HYBRID_ARCHS, make_hybrid_checkpoint
from family_models import digest_diff
from family_models import gguf_digest as _digest

from edge_qwen.cli import main
from edge_qwen.convert.writer import convert

gguf_digest = lru_cache(maxsize=None)(_digest)
REFERENCE = json.loads((Path(__file__).parent / "data" / "llamacpp_reference_hybrid.json").read_text())["files"]
# case -> (architecture, checkpoint has the MTP block, converted with mtp)
CASES = {"qwen35": ("qwen35", True, True), "qwen35-nomtp": ("qwen35", True, False),
         "qwen35moe": ("qwen35moe", True, True), "qwen3next": ("qwen3next", True, True),
         "qwen3next-nomtp": ("qwen3next", False, False)}
# What CI converts: each architecture, outtype and MTP variant once in the fast tier, more in the
# slow one (all 15 recorded files are checked by make_llamacpp_reference.py --hybrid)
SLOW = pytest.mark.slow
COMPARED = [("qwen35", "f16"), pytest.param("qwen35", "q8_0", marks=SLOW), pytest.param("qwen35-nomtp", "f16", marks=SLOW),
            ("qwen35moe", "bf16"), pytest.param("qwen3next", "f16", marks=SLOW), ("qwen3next", "q8_0"),
            pytest.param("qwen3next-nomtp", "f16", marks=SLOW)]


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hybrid")
    out = {a: make_hybrid_checkpoint(root / f"tiny-{a}", a) for a in HYBRID_ARCHS}
    out["qwen3next-nomtp"] = make_hybrid_checkpoint(root / "tiny-qwen3next-nomtp", "qwen3next", mtp=False)
    return out


@pytest.fixture(scope="module")
def converted(hybrid, tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid_gguf")
    cache: dict[tuple[str, str], Path] = {}

    def get(case: str, outtype: str) -> Path:
        if (case, outtype) not in cache:
            arch, has_mtp, mtp = CASES[case]
            src = hybrid[arch if has_mtp else f"{arch}-nomtp"]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[case, outtype] = convert(src, root / f"{case}-{outtype}.gguf", outtype=outtype, quiet=True,
                                               mtp=mtp)
        return cache[case, outtype]

    return get


@pytest.mark.parametrize("case,outtype", COMPARED)
def test_tensor_identical_to_llamacpp(converted, case, outtype):
    ours = gguf_digest(converted(case, outtype))
    ref = REFERENCE[f"{case}-{outtype}"]
    assert digest_diff(ours, ref) == []
    assert len(ours["tensors"]) == len(ref["tensors"]) > 30


def test_reference_covers_mtp_and_layer_kinds():
    """What the recorded llama.cpp files hold: the MTP block as block L with its nextn tensors (none with
    --no-mtp), the linear-attention tensors on blocks 0-2 only, the recurrent-layer flags."""
    with_mtp, without = REFERENCE["qwen35-f16"], REFERENCE["qwen35-nomtp-f16"]
    assert with_mtp["keys"]["qwen35.block_count"] == 5 and with_mtp["keys"]["qwen35.nextn_predict_layers"] == 1
    assert "blk.4.nextn.eh_proj.weight" in with_mtp["tensors"] and "blk.4.attn_q.weight" in with_mtp["tensors"]
    assert without["keys"]["qwen35.block_count"] == 4 and "qwen35.nextn_predict_layers" not in without["keys"]
    assert not any(t.startswith("blk.4.") for t in without["tensors"])
    assert with_mtp["keys"]["qwen35.attention.recurrent_layers"] == [True, True, True, False, False]
    assert {t.split(".")[1] for t in with_mtp["tensors"] if ".ssm_a" in t} == {"0", "1", "2"}
    assert REFERENCE["qwen3next-f16"]["keys"]["qwen3next.nextn_predict_layers"] == 1  # counted from mtp.layers.*


# --- bad input ------------------------------------------------------------------------------------

def _without_tensor(src: Path, dst: Path, drop: str) -> None:
    """A copy of checkpoint `src` without tensor `drop` (its shard rewritten, its index entry gone)."""
    from edge_qwen.convert.checkpoint import open_checkpoint
    from family_models import write_safetensors

    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shard = index["weight_map"].pop(drop)
    ckpt = open_checkpoint(src)
    keep = {ref.name: ref.read() for ref in ckpt.tensors.values()
            if index["weight_map"].get(ref.name) == shard}
    write_safetensors(dst / shard, keep)
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))


def test_mtp_block_with_a_missing_tensor(hybrid, tmp_path):
    src = tmp_path / "broken"
    _without_tensor(hybrid["qwen35"], src, "mtp.layers.0.self_attn.k_proj.weight")
    out = tmp_path / "x.gguf"
    r = CliRunner().invoke(main, ["convert", str(src), "-o", str(out)])
    assert r.exit_code != 0 and r.output.startswith("Error: ") and len(r.output.strip().splitlines()) == 1, r.output
    assert "MTP block" in r.output and "mtp.layers.0.self_attn.k_proj.weight" in r.output and "--no-mtp" in r.output
    assert not out.exists() and not list(tmp_path.glob("*.gguf*"))
    # --no-mtp converts the rest
    r = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--no-mtp", "--outtype", "q8_0"])
    assert r.exit_code == 0, r.output
    assert digest_diff(gguf_digest(out), REFERENCE["qwen35-nomtp-q8_0"]) == []


def test_no_mtp_block_at_all(hybrid, tmp_path):
    """Qwen3-Next's config does not say how many MTP layers: without mtp.* tensors, --no-mtp is needed."""
    r = CliRunner().invoke(main, ["convert", str(hybrid["qwen3next-nomtp"]), "-o", str(tmp_path / "x.gguf")])
    assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1 and "--no-mtp" in r.output, r.output
    assert not (tmp_path / "x.gguf").exists()


def test_unknown_future_qwen_architecture(hybrid, tmp_path):
    src = tmp_path / "future"
    shutil.copytree(hybrid["qwen35"], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(architectures=["Qwen5ForConditionalGeneration"], model_type="qwen5")
    (src / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "x.gguf")])
    assert r.exit_code != 0 and r.output.startswith("Error: ") and len(r.output.strip().splitlines()) == 1, r.output
    assert "Qwen5ForConditionalGeneration is not supported" in r.output
    for name in ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration", "Qwen3NextForCausalLM",
                 "Qwen2ForCausalLM"):
        assert name in r.output
    assert not list(tmp_path.glob("*.gguf*"))


# --- quantize, imatrix, inspect, load and generate -------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("case", ["qwen35", "qwen35moe", "qwen3next"])
def test_quantize_inspect_and_generate(converted, case, tmp_path):
    import llama_cpp

    from edge_qwen.convert.writer import inspect_gguf
    from edge_qwen.device import guard_cpu_kernels
    from edge_qwen.quant.quantize import quantize

    guard_cpu_kernels()
    f16 = converted(case, "f16")
    res = quantize(f16, tmp_path, qtype="Q4_K_M,Q8_0", calibration="default", chunks=1, quiet=True)
    files = {f.qtype: f.path for f in res.files}
    imatrix = next(tmp_path.glob("*.imatrix.gguf"))
    import gguf

    names = [t.name for t in gguf.GGUFReader(str(imatrix)).tensors]
    # the importance matrix covers the linear attention's projections and the experts
    assert any(".attn_qkv.weight" in n for n in names) and any(".ssm_out.weight" in n for n in names)
    if "moe" in case or case == "qwen3next":
        assert any("ffn_down_exps" in n for n in names)
    q4 = inspect_gguf(files["Q4_K_M"])
    assert q4["file_type"] == 15 and "Q4_K" in q4["tensor_types"]
    moe = "+moe" if case != "qwen35" else ""
    assert q4["layer_kinds"] == {f"linear_attention{moe}": 3, f"attention{moe}": 1, f"mtp{moe}": 1}
    r = gguf.GGUFReader(str(files["Q4_K_M"]))
    types = {t.name: t.tensor_type.name for t in r.tensors}
    # llama.cpp's rules: the conv kernel, A, dt and the router stay f32; the rest is quantized
    assert types["blk.0.ssm_conv1d.weight"] == "F32" and types["blk.0.ssm_a"] == "F32"
    assert types["blk.0.ssm_dt.bias"] == "F32" and types["blk.0.ssm_norm.weight"] == "F32"
    if moe:
        assert types["blk.0.ffn_gate_inp.weight"] == "F32"
    for path in (files["Q4_K_M"], files["Q8_0"]):
        llm = llama_cpp.Llama(str(path), n_ctx=128, n_threads=2, verbose=False)
        try:
            assert llama_cpp.llama_model_is_hybrid(llm.model)
            out = llm.create_completion("The capital of France is", max_tokens=6, temperature=0.0)
        finally:
            llm.close()
        assert out["usage"]["completion_tokens"] > 0


def test_memory_counts_the_recurrent_state(converted):
    """doctor/recommend: KV cells only in the attention layers, and a recurrent state per slot."""
    from edge_qwen.device import attention_layers, describe_kv, kv_cache_bytes, recurrent_state_bytes
    from edge_qwen.gguf_file import check_gguf

    meta = check_gguf(converted("qwen35", "f16")).metadata
    assert attention_layers(meta) == 1  # blocks 0-2 are Gated DeltaNet, block 4 is the MTP block
    # per linear layer and sequence: conv (4-1) x (256 + 2*2*64) + state 64 x 256, float32
    per_seq = 3 * ((3 * (256 + 2 * 2 * 64) + 64 * 256) * 4)
    assert recurrent_state_bytes(meta, 1) == per_seq and recurrent_state_bytes(meta, 4) == 4 * per_seq
    assert kv_cache_bytes(meta, 1000) == 1000 * 1 * 2 * (64 * 2 + 64 * 2)
    assert "recurrent state 4 x" in describe_kv(meta, 4096, 4)
    from edge_qwen.bench.sweep import kv_cache_bytes as recommend_bytes
    from edge_qwen.bench.sweep import model_shape

    shape = model_shape(converted("qwen35", "f16"))
    assert shape["n_layer_kv"] == 1 and shape["recurrent_bytes"] == per_seq
    assert recommend_bytes(shape, 4096, parallel=3) == 3 * (2 * 4096 * 2 * 64 * 2 + per_seq)
    r = CliRunner().invoke(main, ["doctor", "--no-offload-check", "--model", str(converted("qwen35", "f16")),
                                  "--parallel", "3"])
    assert r.exit_code == 0 and "recurrent state 3 x" in r.output, r.output


def test_runtime_takes_the_safe_prompt_path(converted):
    """A hybrid model re-evaluates every prompt (no prefix reuse, no host cache): the same greedy answer
    as a fresh load, the second request reporting no cached tokens."""
    from edge_qwen import EdgeQwen

    m = EdgeQwen(converted("qwen3next", "q8_0"), n_ctx=256, parallel=2, reuse_prefix=True)
    try:
        assert not m.engine.exact_prefix and m.engine.host_cache_bytes == 0
        msgs = [{"role": "user", "content": "Tell me about Paris."}]
        a = m.chat(msgs, max_tokens=8, temperature=0.0, enable_thinking=False)
        b = m.chat(msgs, max_tokens=8, temperature=0.0, enable_thinking=False)
    finally:
        m.close()
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    assert b["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0) == 0


# --- the server and the openai client ---------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city", "days"], "additionalProperties": False}}}
SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "n": {"type": "integer"}},
    "required": ["city", "n"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def served(converted, tmp_path_factory):
    """`edge-qwen serve` (the CLI, a child process) over the tiny Qwen3.5 quantized to Q4_K_M, 2 slots."""
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx

    from edge_qwen.quant.quantize import quantize

    root = tmp_path_factory.mktemp("served")
    q4 = quantize(converted("qwen35", "f16"), root / "qwen35-q4_k_m.gguf", qtype="Q4_K_M", quiet=True).files[0].path
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", "from edge_qwen.cli import main; main()", "serve", str(q4),
                             "--port", str(port),
                             "--parallel", "2", "--ctx", "1024", "--threads", "2"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"edge-qwen serve did not start: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def oa(served):
    import openai

    return openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.mark.slow
def test_served_chat_stream_and_thinking(oa):
    model = oa.models.list().data[0].id
    msgs = [{"role": "user", "content": "Where is Paris?"}]
    on = oa.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0)
    # Qwen3.5's template opens the think block: the reply starts inside the reasoning
    assert (on.choices[0].message.model_extra or {}).get("reasoning_content")
    assert on.usage.completion_tokens > 0
    off = oa.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0,
                                     extra_body={"enable_thinking": False})
    assert not (off.choices[0].message.model_extra or {}).get("reasoning_content")
    assert off.choices[0].message.content
    chunks = list(oa.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0, stream=True,
                                             extra_body={"enable_thinking": False}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == off.choices[0].message.content  # the same greedy answer, streamed
    assert chunks[-1].choices[-1].finish_reason in ("stop", "length") or chunks[-2].choices[0].finish_reason


@pytest.mark.slow
def test_served_json_schema(oa):
    import jsonschema

    model = oa.models.list().data[0].id
    r = oa.chat.completions.create(model=model, messages=[{"role": "user", "content": "A city and a number."}],
                                   max_tokens=64, temperature=0, response_format=SCHEMA,
                                   extra_body={"enable_thinking": False})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA["json_schema"]["schema"])


@pytest.mark.slow
def test_served_xml_tool_calls(oa):
    """Qwen3.5 calls tools in XML; the call is constrained by its grammar and returned as OpenAI tool_calls,
    streamed too, without the XML in the content."""
    import jsonschema

    model = oa.models.list().data[0].id
    msgs = [{"role": "user", "content": "Weather in Paris for 2 days?"}]
    kw = dict(model=model, messages=msgs, tools=[WEATHER], max_tokens=64, temperature=0,
              tool_choice={"type": "function", "function": {"name": "get_weather"}},
              extra_body={"enable_thinking": False})
    r = oa.chat.completions.create(**kw)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and r.choices[0].finish_reason == "tool_calls"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    assert "<function" not in (r.choices[0].message.content or "")
    chunks = list(oa.chat.completions.create(stream=True, **kw))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    content = "".join(d.content or "" for d in deltas)
    streamed = "".join(tc.function.arguments or "" for d in deltas for tc in (d.tool_calls or []))
    assert "<tool_call>" not in content and "<function" not in content and "<parameter" not in content
    assert json.loads(streamed) == args


@pytest.mark.slow
def test_served_parallel_requests(oa):
    from concurrent.futures import ThreadPoolExecutor

    model = oa.models.list().data[0].id

    def ask(q: str) -> str:
        return oa.chat.completions.create(model=model, messages=[{"role": "user", "content": q}], max_tokens=12,
                                          temperature=0, extra_body={"enable_thinking": False}).choices[0].message.content

    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(ask, ["Hello there", "Bonjour, ça va ?"]))
    # batched logits are not bit-identical to single ones, so the answers are only checked to come back
    assert all(isinstance(a, str) and a for a in both)


@pytest.mark.slow
def test_checkpoints_are_what_transformers_loads(hybrid):
    """transformers 5 finds every text tensor it expects, of the right shape, in the tiny checkpoints
    (the vision tower is another part, not built here; the mtp.* block is ignored by transformers)."""
    import torch
    import transformers

    classes = {"qwen35": "Qwen3_5ForConditionalGeneration", "qwen35moe": "Qwen3_5MoeForConditionalGeneration",
               "qwen3next": "Qwen3NextForCausalLM"}
    for arch, cls in classes.items():
        _model, info = getattr(transformers, cls).from_pretrained(hybrid[arch], dtype=torch.bfloat16,
                                                                   output_loading_info=True)
        assert not [k for k in info["missing_keys"] if "visual" not in k], (arch, info["missing_keys"])
        assert not info["unexpected_keys"] and not info["mismatched_keys"], (arch, info)


# --- XML tool calls, parsed (engine/tool_calls_xml.py) -----------------------------------------------

XML_REPLY = ("I will look it up.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nSão Paulo\n</parameter>\n"
             "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=get_weather>\n"
             "<parameter=city>\n北京\n</parameter>\n<parameter=days>\n1\n</parameter>\n</function>\n</tool_call>")


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_xml_calls_streamed_in_pieces(step):
    from edge_qwen.engine.tool_calls import ToolCallParser, openai_deltas, parse_tools

    tools = parse_tools([WEATHER], "auto")
    p = ToolCallParser(tools)
    events = []
    for i in range(0, len(XML_REPLY), step):
        events += p.feed(XML_REPLY[i:i + step])
    events += p.flush()
    content, calls = p.finish()
    assert content == "I will look it up."
    assert [(c.name, c.value()) for c in calls] == [("get_weather", {"city": "São Paulo", "days": 3}),
                                                   ("get_weather", {"city": "北京", "days": 1})]
    deltas = openai_deltas(events)
    streamed = "".join(d.get("content") or "" for d in deltas)
    assert "<" not in streamed and streamed.strip() == content
    args = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            args[tc["index"]] = args.get(tc["index"], "") + tc["function"]["arguments"]
    assert [json.loads(a) for a in args.values()] == [c.value() for c in calls]


def test_xml_call_that_does_not_validate_is_not_returned():
    from edge_qwen.engine.tool_calls import parse_reply, parse_tools

    tools = parse_tools([WEATHER], "auto")
    bad = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"
    assert parse_reply(bad, tools)[1] == []  # "days" is required
    other = "<tool_call>\n<function=rm_rf>\n<parameter=path>\n/\n</parameter>\n</function>\n</tool_call>"
    assert parse_reply(other, tools)[1] == []  # a function that was not offered
