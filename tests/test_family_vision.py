"""Images through libmtmd for Qwen2.5-VL: the tiny random VL checkpoint of tests/family_models.py
converted by edge-qwen (text model + --mmproj vision tower), compared with llama-cpp-python's own
Qwen25VLChatHandler on the same two files; image parts, the CLI, and bad images."""

from __future__ import annotations

import base64
import io
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from family_models import make_family_checkpoint

from edge_qwen.cli import main
from edge_qwen.vision import ImageError, VisionChat, image_messages, read_image

GREEDY = {"temperature": 0.0, "max_tokens": 8}
SYSTEM = "You are a helpful assistant."  # the handler's default system prompt, given to both


def _png(seed: int, size=(56, 84)) -> bytes:
    from PIL import Image

    rs = np.random.RandomState(seed)
    buf = io.BytesIO()
    Image.fromarray((rs.random_sample((*size, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _messages(data: bytes, text: str = "Describe") -> list[dict]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _url(data)}},
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def vl_files(tmp_path_factory):
    from edge_qwen.convert.writer import convert

    root = tmp_path_factory.mktemp("vl")
    ckpt = make_family_checkpoint(root / "tiny-qwen2.5-vl", "qwen2vl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = convert(ckpt, root / "vl-f16.gguf", outtype="f16", quiet=True)
        mmproj = convert(ckpt, root / "mmproj-vl-f16.gguf", outtype="f16", quiet=True, mmproj=True)
    return text, mmproj


@pytest.fixture(scope="module")
def vision(vl_files):
    vc = VisionChat(*vl_files, n_ctx=1024)
    yield vc
    vc.close()


def test_images_change_the_answer_and_match_llama_cpp_python(vision, vl_files):
    import llama_cpp
    from llama_cpp.llama_chat_format import Qwen25VLChatHandler

    a, b = _png(1), _png(2)
    ours = [vision.chat(_messages(x), **GREEDY) for x in (a, b, a)]
    texts = [r["choices"][0]["message"]["content"] for r in ours]
    assert texts[0] != texts[1] and texts[0] == texts[2]  # an image changes the greedy answer; same image, same
    positions = vision.prefill(_messages(a))["positions"]
    assert ours[0]["usage"]["prompt_tokens_details"]["image_tokens"] == 12  # 84x56 -> 112x84 px -> 4x3 merged

    class Handler(Qwen25VLChatHandler):
        # llama-cpp-python's template loses the newline after "assistant" (Jinja drops a
        # template's final newline); the model's own template (Qwen's) has it, so add it back
        CHAT_FORMAT = Qwen25VLChatHandler.CHAT_FORMAT + "\n"

    llm = llama_cpp.Llama(str(vl_files[0]), chat_handler=Handler(clip_model_path=str(vl_files[1]), verbose=False),
                          n_ctx=1024, n_threads=2, verbose=False)
    try:
        for data, want in ((a, texts[0]), (b, texts[1])):
            r = llm.create_chat_completion(messages=_messages(data), repeat_penalty=1.0, top_k=0, min_p=0.0, **GREEDY)
            assert r["choices"][0]["message"]["content"] == want
            assert r["usage"]["prompt_tokens"] == positions  # its count is the rope positions the prompt took
    finally:
        llm.close()


def test_stream_and_qwen_api_parts(vision):
    a = _png(1)
    whole = vision.chat(_messages(a), **GREEDY)["choices"][0]["message"]["content"]
    chunks = list(vision.chat(_messages(a), stream=True, **GREEDY))
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] and chunks[-1]["usage"]["prompt_tokens_details"]["image_tokens"]
    qwen = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": [{"image": _url(a)}, {"text": "Describe"}]}]
    assert vision.chat(qwen, **GREEDY)["choices"][0]["message"]["content"] == whole


def test_cli_image_chat(vl_files, tmp_path):
    img = tmp_path / "photo.png"
    img.write_bytes(_png(1))
    args = ["chat", str(vl_files[0]), "--mmproj", str(vl_files[1]), "--image", str(img), "描述这张图片",
            "--temperature", "0", "--max-tokens", "6"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and r.output.strip(), r.output
    again = CliRunner().invoke(main, args)
    assert again.output == r.output
    r = CliRunner().invoke(main, ["chat", str(vl_files[0]), "--image", str(img), "x"])
    assert r.exit_code != 0 and "--mmproj" in r.output
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    r = CliRunner().invoke(main, ["chat", str(vl_files[0]), "--mmproj", str(vl_files[1]), "--image", str(bad), "x"])
    assert r.exit_code != 0 and r.output.startswith("Error: ") and "not an image" in r.output, r.output


@pytest.mark.parametrize("case,message", [
    ("text", "not an image"),
    ("truncated", "truncated"),
    ("huge", "too large"),
    ("big", "9000x100"),
    ("http", "offline"),
    ("file", "data: URLs"),
    ("base64", "base64"),
    ("mime", "not an image"),
])
def test_bad_images_are_refused(case, message):
    png = _png(3)
    url = {"text": _url(b"hello, not an image"), "truncated": _url(png[: len(png) // 2]),
           "huge": _url(_huge_png()), "big": _url(_huge_png(9000, 100)), "http": "https://example.com/cat.png", "file": "/etc/hostname",
           "base64": "data:image/png;base64,@@@", "mime": "data:text/plain;base64,aGk="}[case]
    with pytest.raises(ImageError, match=message) as e:
        read_image(url)
    assert e.value.status == 400


def _huge_png(w: int = 20000, h: int = 20000) -> bytes:
    """A w x h PNG header of a few KB (the pixels are never decoded: the size is refused first)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = zlib.compress(b"".join(b"\0" + b"\0" * w for _ in range(16)))  # only the header matters
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def test_model_files_are_checked(vl_files, tiny_checkpoint, tmp_path):
    from edge_qwen.convert.writer import convert
    from edge_qwen.errors import ModelFileError

    with pytest.raises(ModelFileError, match="Qwen2.5-VL"):
        VisionChat(convert(tiny_checkpoint, tmp_path / "q2.gguf", outtype="q8_0", quiet=True), vl_files[1])
    with pytest.raises(ModelFileError, match="clip"):
        VisionChat(vl_files[0], vl_files[0])
    assert image_messages("hi", ["a.png"])[-1]["content"][0]["image_url"]["url"] == "a.png"


def test_server_openai_and_qwen_shapes(vision):
    import httpx
    import openai

    from edge_qwen.serve.app import ServerThread, create_app
    from edge_qwen.vision import VisionServed

    a, b = _png(1), _png(2)
    want = [vision.chat(_messages(x), **GREEDY)["choices"][0]["message"]["content"] for x in (a, b)]
    with ServerThread(create_app({"vl": VisionServed(vision)})) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        got = [client.chat.completions.create(model="vl", messages=_messages(x), **GREEDY).choices[0].message.content
               for x in (a, b)]
        assert got == want
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="vl", messages=_messages(a), stream=True, **GREEDY) if c.choices)
        assert streamed == want[0]
        with httpx.Client(base_url=url, timeout=120) as http:
            qwen = {"model": "vl", "input": {"messages": [{"role": "system", "content": SYSTEM}, {
                "role": "user", "content": [{"image": _url(a)}, {"text": "Describe"}]}]}, "parameters": GREEDY}
            r = http.post("/api/v1/qwen/predict", json=qwen)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want[0]
            for bad, why in ((_url(b"not an image"), "not an image"), ("https://example.com/x.png", "offline"),
                             ("/etc/hostname", "data: URLs")):
                r = http.post("/v1/chat/completions", json={"model": "vl", "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": bad}}]}]})
                assert r.status_code == 400 and why in r.json()["error"]["message"], r.text
                assert r.json()["error"]["code"] == "invalid_image"
