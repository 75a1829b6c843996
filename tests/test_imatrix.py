"""Importance matrices: the statistic, llama.cpp's file formats, bad input, and that it helps."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edge_qwen.cli import main
from edge_qwen.errors import OutputExistsError
from edge_qwen.gguf_file import read_header
from edge_qwen.quant.imatrix import (ImatrixError, compute_imatrix, default_calibration_path, imatrix, load_imatrix)
from edge_qwen.quant.quantize import quantize

# Evaluation text for the KL test: written for this test, not part of the calibration corpus.
EVAL_TEXT = """The harbor town woke slowly on Sunday. Gulls argued over the fish market's leftovers, a baker pulled \
the first trays of bread from the oven, and an old man repainted the name on his boat in careful blue letters. \
Visitors would arrive on the noon ferry, but for now the streets belonged to the people who lived there.

def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

print([fibonacci(i) for i in range(10)])

城市里的公园是很多人周末放松的地方。有人在湖边跑步，有人在树下下棋，还有孩子们在草地上放风筝。傍晚的时候，广场上响起音乐，大家一起跳舞，热闹又开心。

<|im_start|>user
How can I read a CSV file in JavaScript?<|im_end|>
<|im_start|>assistant
In Node.js you can read the file with fs.promises.readFile, split it into lines, and split each line on commas; \
for real data with quoted fields, use a parser library.<|im_end|>
"""


@pytest.fixture(scope="module")
def tiny_f16(tiny_checkpoint, tmp_path_factory) -> Path:
    from edge_qwen.convert.writer import convert

    return convert(tiny_checkpoint, tmp_path_factory.mktemp("tinyi") / "tiny-f16.gguf", outtype="f16", quiet=True)


@pytest.fixture(scope="module")
def tiny_im(tiny_f16):
    return compute_imatrix(tiny_f16, "default", n_ctx=64, chunks=2, quiet=True)


def test_default_corpus():
    p = default_calibration_path()
    text = p.read_text(encoding="utf-8")
    assert 20_000 < p.stat().st_size < 400_000
    assert len(re.findall(r"[\u4e00-\u9fff]", text)) > 1500  # Chinese prose
    for marker in ("<|im_start|>user", "<|im_start|>assistant", "<|im_end|>", "```python", "def ",
                   "```javascript", "const ", "```sql", "SELECT", "license"):
        assert marker in text, marker
    assert EVAL_TEXT.split("\n")[0][:40] not in text  # the KL evaluation text is held out


def test_statistic_matches_transformers(tiny_checkpoint, tiny_f16, tiny_im):
    """Our cb_eval sums equal sum of x^2 per input column of every Linear, computed by transformers."""
    import torch
    from llama_cpp import Llama
    from transformers import Qwen2ForCausalLM

    voc = Llama(str(tiny_f16), vocab_only=True, verbose=False)
    toks = voc.tokenize(default_calibration_path().read_text(encoding="utf-8").encode(), add_bos=True, special=True)
    add_bos, bos = voc._model.add_bos_token(), voc.token_bos()
    voc.close()
    model = Qwen2ForCausalLM.from_pretrained(tiny_checkpoint, torch_dtype=torch.float32).eval()
    names = {"self_attn.q_proj": ["attn_q"], "self_attn.k_proj": ["attn_k"], "self_attn.v_proj": ["attn_v"],
             "self_attn.o_proj": ["attn_output"], "mlp.gate_proj": ["ffn_gate"], "mlp.up_proj": ["ffn_up"],
             "mlp.down_proj": ["ffn_down"]}
    sums: dict[str, torch.Tensor] = {}

    def hook(key):
        def fn(_mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[key] = sums.get(key, 0) + (x * x).sum(0)
        return fn

    for i, layer in enumerate(model.model.layers):
        for path, (short,) in names.items():
            mod = layer.get_submodule(path)
            mod.register_forward_pre_hook(hook(f"blk.{i}.{short}.weight"))
    with torch.no_grad():
        for c in range(2):
            chunk = list(toks[c * 64:(c + 1) * 64])
            if add_bos:
                chunk[0] = bos
            model(torch.tensor([chunk]))
    assert set(tiny_im.sums) == set(sums) and len(sums) == 14
    for name, ref in sums.items():
        assert tiny_im.counts[name].tolist() == [128.0], name
        ours = tiny_im.sums[name][0]
        np.testing.assert_allclose(ours, ref.numpy(), rtol=0.03, atol=1e-3 * float(ref.max()), err_msg=name)


def test_gguf_format_round_trip(tiny_im, tiny_f16, tmp_path):
    import gguf

    path = tiny_im.save(tmp_path / "t.imatrix.gguf")
    r = gguf.GGUFReader(str(path))
    assert bytes(r.fields["general.type"].parts[-1]).decode() == "imatrix"
    assert int(r.fields["imatrix.chunk_count"].parts[-1][0]) == 2
    assert int(r.fields["imatrix.chunk_size"].parts[-1][0]) == 64
    t = {x.name: x for x in r.tensors}
    assert len(t) == 28 and "blk.0.ffn_down.weight.in_sum2" in t and "blk.1.attn_q.weight.counts" in t
    assert list(t["blk.0.ffn_down.weight.in_sum2"].shape) == [512, 1]  # ne0 = input columns, ne1 = matrices
    assert t["blk.0.ffn_down.weight.counts"].data.tolist() == [[128.0]]
    back = load_imatrix(path)
    assert back.datasets == ["default"] and back.chunk_count == 2 and back.chunk_size == 64
    for name, v in tiny_im.importance().items():
        np.testing.assert_allclose(back.importance()[name], v, rtol=1e-6)
    back.check_model(tiny_f16)


def test_legacy_dat_format(tiny_im, tmp_path):
    path = tiny_im.save(tmp_path / "t.imatrix.dat")
    back = load_imatrix(path)
    assert back.chunk_count == 2 and back.datasets == ["default"]
    for name, v in tiny_im.importance().items():
        np.testing.assert_allclose(back.importance()[name], v, rtol=1e-6)
    # a file laid out by hand as llama.cpp's legacy writer does: n, [len, name, ncall, nval, values], chunks, dataset
    vals = np.array([2.0, 4.0, 6.0], dtype=np.float32)
    raw = struct.pack("<i", 1) + struct.pack("<i", 3) + b"w.x" + struct.pack("<ii", 2, 3) + vals.tobytes()
    raw += struct.pack("<i", 7) + struct.pack("<i", 8) + b"wiki.txt"
    (tmp_path / "hand.dat").write_bytes(raw)
    hand = load_imatrix(tmp_path / "hand.dat")
    assert hand.importance()["w.x"].tolist() == [1.0, 2.0, 3.0]  # stored as mean * ncall
    assert hand.chunk_count == 7 and hand.datasets == ["wiki.txt"]


def test_bad_imatrix_files(tiny_f16, tiny_im, tmp_path):
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"\x05\x00\x00\x00 this is not an imatrix")
    with pytest.raises(ImatrixError, match="not an imatrix file"):
        load_imatrix(junk)
    good = tiny_im.save(tmp_path / "g.imatrix.gguf")
    cut = tmp_path / "cut.imatrix.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size - 100])
    with pytest.raises(ImatrixError, match="truncated"):
        load_imatrix(cut)
    with pytest.raises(ImatrixError, match="holds no imatrix entries"):
        load_imatrix(tiny_f16)
    with pytest.raises(ImatrixError, match="does not exist"):
        load_imatrix(tmp_path / "nope.gguf")
    before = set(tmp_path.iterdir())
    r = CliRunner().invoke(main, ["quantize", str(tiny_f16), "--type", "IQ2_XS", "--imatrix", str(junk),
                                  "-o", str(tmp_path / "o.gguf")])
    assert r.exit_code != 0 and "not an imatrix file" in r.output and "Traceback" not in r.output
    assert set(tmp_path.iterdir()) == before


def test_calibration_errors_and_cli(tiny_f16, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    for cal, pattern in ((tmp_path / "missing.txt", "does not exist"), (empty, "is empty"),
                         (latin, "not UTF-8"), (short, "fewer than one chunk")):
        with pytest.raises(ImatrixError, match=pattern):
            compute_imatrix(tiny_f16, cal, n_ctx=64, quiet=True)
    out = tmp_path / "cli.imatrix.gguf"
    r = CliRunner().invoke(main, ["imatrix", str(tiny_f16), "--calibration", "default", "-o", str(out),
                                  "--chunks", "1", "--chunk-size", "64", "-q"])
    assert r.exit_code == 0, r.output
    assert re.search(r"wrote .*cli\.imatrix\.gguf\s+\(14 tensors, 1 chunks = 64 tokens of default", r.output)
    assert load_imatrix(out).counts["blk.0.attn_q.weight"].tolist() == [64.0]
    with pytest.raises(OutputExistsError):
        imatrix(tiny_f16, "default", out, chunks=1, n_ctx=64, quiet=True)
    r = CliRunner().invoke(main, ["imatrix", str(tmp_path / "nope.gguf"), "-o", str(tmp_path / "x.gguf")])
    assert r.exit_code != 0 and "does not exist" in r.output


def _logits(path: Path, toks: list[int]) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=512, n_batch=512, logits_all=True, verbose=False)
    llm.eval(toks)
    out = np.array(llm.scores[: len(toks)], dtype=np.float32)
    llm.close()
    return out


@pytest.mark.slow
def test_imatrix_lowers_kl_divergence(default_f16_gguf, tmp_path):
    """On the real 0.5B (rebuilt and converted to f16 by us), Q3_K_S with an imatrix from the
    shipped corpus is closer to f16 than Q3_K_S without one. The 896-wide rows fall back from
    Q3_K to Q4_0 (145 tensors; only the 24 ffn_down stay Q3_K); both use the imatrix."""
    from llama_cpp import Llama

    from edge_qwen.bench.metrics import kl_divergence

    with_im = quantize(default_f16_gguf, tmp_path / "with.gguf", "Q3_K_S", calibration="default", chunks=2,
                       quiet=True)
    imfile = tmp_path / "qwen2.5-coder-0.5b-instruct.imatrix.gguf"
    assert with_im.imatrix == imfile and imfile.is_file()  # `--calibration default` computed and kept it
    meta, _, _ = read_header(with_im.path)
    assert meta["general.quantize.calibration"] == "default"
    without = quantize(default_f16_gguf, tmp_path / "without.gguf", "Q3_K_S", quiet=True)
    assert with_im.files[0].tensor_types == without.files[0].tensor_types  # same recipe, only the rounding differs

    voc = Llama(str(default_f16_gguf), vocab_only=True, verbose=False)
    toks = voc.tokenize(EVAL_TEXT.encode(), add_bos=False, special=True)
    voc.close()
    assert len(toks) > 200
    ref = _logits(default_f16_gguf, toks)
    kl_with = float(np.mean(kl_divergence(ref, _logits(with_im.path, toks))))
    kl_without = float(np.mean(kl_divergence(ref, _logits(without.path, toks))))
    print(f"\nQ3_K_S mean KL vs f16 over {len(toks)} tokens: without imatrix {kl_without:.4f}, "
          f"with imatrix {kl_with:.4f}")
    assert kl_with < kl_without
