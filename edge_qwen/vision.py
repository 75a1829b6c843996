"""Images for Qwen2.5-VL, Qwen3-VL and Qwen3.5 through libmtmd (llama_cpp.mtmd_cpp): reading image
parts, checking images, and a chat that puts them in the prompt.

A vision-language model is two GGUF files (`edge-qwen convert` and `edge-qwen convert --mmproj`):
the text model and its vision tower (VISION_MODELS says which tower goes with which model;
Qwen3-VL's also feeds "deepstack" features to the first text layers, which libmtmd handles). `VisionChat(model, mmproj)` loads both; `chat(messages)`
takes OpenAI content parts (`{"type": "image_url", "image_url": {"url": ...}}`, `{"type":
"text", ...}`) and the Qwen API's (`{"image": ...}`, `{"text": ...}`). An image is a `data:`
URL (base64), a local file (only where the caller allows it, e.g. the CLI), or http(s) (refused
unless `allow_http`: edge-qwen is offline by default). libmtmd turns each image into its
tokens (Qwen2.5-VL: one per 28x28 pixels, Qwen3-VL and Qwen3.5: one per 32x32, wrapped in
<|vision_start|>/<|vision_end|>) and
evaluates them with their multimodal rope positions; llama-cpp-python's sampler then writes the
reply (image requests do not run on the batched text engine yet).
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import io
import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EdgeQwenError, ModelFileError, RequestError

MAX_IMAGE_BYTES = 20 << 20
MAX_SIDE = 8192  # larger images are refused before decoding (a 20000x20000 PNG is 1.6 GB of pixels)
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_QUIET = None  # the no-op log callback, kept alive for as long as libmtmd may call it


class ImageError(RequestError):
    """An image part that cannot be used: unreadable, not an image, truncated, too large, refused."""

    code = "invalid_image"


@dataclass
class Image:
    """One checked image: its bytes and size."""

    data: bytes
    width: int
    height: int
    source: str  # for messages: "data: URL", the file name or the URL


def read_image(url: str, *, allow_files: bool = False, allow_http: bool = False) -> Image:
    """Fetch and check one image reference (data: URL, file path / file:// URL, http(s) URL)."""
    if not isinstance(url, str) or not url:
        raise ImageError("an image part needs a URL string (a data: URL, or a file from the CLI)", param="messages")
    if url.startswith("data:"):
        m = re.fullmatch(r"data:([\w.+/-]*)(;[\w=.-]+)*;base64,(.*)", url, re.S)
        if not m:
            raise ImageError("a data: image URL must be data:image/<type>;base64,<data>", param="messages")
        if m.group(1) and not m.group(1).startswith("image/"):
            raise ImageError(f"the data: URL holds {m.group(1)!r}, not an image", param="messages")
        if len(m.group(3)) > MAX_IMAGE_BYTES * 4 // 3 + 8:
            raise ImageError(f"the image is larger than {MAX_IMAGE_BYTES >> 20} MiB", param="messages")
        try:
            data = base64.b64decode(m.group(3), validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("the data: URL's base64 is damaged", param="messages") from None
        return check_image(data, "data: URL")
    if re.match(r"https?://", url):
        if not allow_http:
            raise ImageError("http(s) image URLs are not fetched: edge-qwen runs offline; send the image as a "
                             "data: URL (or allow http images with --allow-http-images)", param="messages")
        return _fetch(url)
    if not allow_files:
        raise ImageError("image URLs must be data: URLs here (local files are read only from the CLI)",
                         param="messages")
    path = Path(url.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise ImageError(f"image file {path} does not exist", param="messages")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise ImageError(f"image file {path} is larger than {MAX_IMAGE_BYTES >> 20} MiB", param="messages")
    return check_image(path.read_bytes(), path.name)


def _fetch(url: str) -> Image:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=20) as r:  # noqa: S310 (asked for explicitly)
            data = r.read(MAX_IMAGE_BYTES + 1)
    except OSError as e:
        raise ImageError(f"could not fetch image {url}: {e}", param="messages") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"image {url} is larger than {MAX_IMAGE_BYTES >> 20} MiB", param="messages")
    return check_image(data, url)


def check_image(data: bytes, source: str) -> Image:
    """Refuse what is not a whole image of a known format and a sane size (before libmtmd sees it)."""
    from PIL import Image as PILImage, UnidentifiedImageError

    try:
        img = PILImage.open(io.BytesIO(data))
    except PILImage.DecompressionBombError as e:  # far beyond MAX_SIDE: Pillow refuses to even open it
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        raise ImageError(f"{source} is too large ({pixels.group(1) if pixels else 'too many'} pixels); the largest "
                         f"accepted side is {MAX_SIDE} pixels, scale it down", param="messages") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise ImageError(f"{source} is not an image (PNG, JPEG, WebP, GIF or BMP)", param="messages") from None
    if img.format not in FORMATS:
        raise ImageError(f"{source} is a {img.format} image; send PNG, JPEG, WebP, GIF or BMP", param="messages")
    w, h = img.size
    if w > MAX_SIDE or h > MAX_SIDE:
        raise ImageError(f"{source} is too large ({w}x{h} pixels); the largest accepted side is {MAX_SIDE}, "
                         "scale it down",
                         param="messages")
    if w < 1 or h < 1:
        raise ImageError(f"{source} has no pixels", param="messages")
    try:
        img.load()  # decodes: a truncated file fails here
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{source} is damaged or truncated ({e})", param="messages") from None
    return Image(data, w, h, source)


def split_images(messages: Any, marker: str, **read: bool) -> tuple[list[dict], list[Image]]:
    """Messages with each image part replaced by `marker` (content flattened to text), and the images.

    Text parts join without separators, as llama-cpp-python's Qwen2.5-VL handler joins them.
    """
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    out, images = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] must be an object", param="messages")
        content = m.get("content")
        if isinstance(content, list):
            text = ""
            for part in content:
                if not isinstance(part, dict):
                    raise RequestError(f"messages[{i}].content parts must be objects", param="messages")
                kind = part.get("type") or ("image" if "image" in part else "text" if "text" in part else None)
                if kind in ("image_url", "image"):
                    ref = part.get("image_url", part.get("image"))
                    ref = ref.get("url") if isinstance(ref, dict) else ref
                    images.append(read_image(ref, **read))
                    text += marker
                elif kind == "text" and isinstance(part.get("text"), str):
                    text += part["text"]
                else:
                    raise RequestError(f"messages[{i}] has a content part of type {kind!r}; use text and "
                                       "image_url parts", param="messages")
            m = {**m, "content": text}
        out.append(m)
    return out, images


# text model architecture -> (the projector its vision tower must have, the family's name)
VISION_MODELS: dict[str, tuple[str, str]] = {
    "qwen2vl": ("qwen2.5vl_merger", "Qwen2.5-VL"),
    "qwen3vl": ("qwen3vl_merger", "Qwen3-VL"),
    "qwen3vlmoe": ("qwen3vl_merger", "Qwen3-VL-MoE"),
    "qwen35": ("qwen3vl_merger", "Qwen3.5"),
    "qwen35moe": ("qwen3vl_merger", "Qwen3.5-MoE"),
}


def _check_pair(model: Any, info: Any, mmproj: Any, proj: Any) -> None:
    """Refuse a vision tower made for another model: its output width and deepstack layers must
    match what the text model takes (libmtmd would otherwise fail or read past its embeddings)."""
    md, arch = info.metadata, info.architecture
    width, dim = md.get(f"{arch}.embedding_length"), proj.metadata.get("clip.vision.projection_dim")
    if width is not None and dim is not None and int(width) != int(dim):
        raise ModelFileError(f"{mmproj} gives {dim}-wide image embeddings but {model} takes {width}: they are not "
                             "from the same checkpoint; convert both from one (edge-qwen convert, then --mmproj)")
    layers = proj.metadata.get("clip.vision.is_deepstack_layers")
    deepstack = sum(bool(x) for x in layers) if isinstance(layers, list) else 0
    expected = int(md.get(f"{arch}.n_deepstack_layers") or 0)
    if deepstack != expected:
        raise ModelFileError(f"{mmproj} has {deepstack} deepstack layers but {model} expects {expected}: they are "
                             "not from the same checkpoint; convert both from one (edge-qwen convert, then --mmproj)")


class VisionChat:
    """A vision-language text model GGUF (Qwen2.5-VL, Qwen3-VL, Qwen3.5) with its mmproj GGUF,
    answering chats with images."""

    def __init__(self, model: str | os.PathLike, mmproj: str | os.PathLike, *, n_ctx: int = 4096,
                 n_threads: int | None = None, verbose: bool = False):
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        from .gguf_file import check_gguf

        info = check_gguf(model, architectures=None)
        if info.architecture not in VISION_MODELS:
            raise ModelFileError(f"{model} is a {info.architecture} model; images need a vision-language model "
                                 f"({', '.join(f'{n} ({a})' for a, (_p, n) in VISION_MODELS.items())}) with its "
                                 "--mmproj file")
        projector, family = VISION_MODELS[info.architecture]
        proj = check_gguf(mmproj, architectures=("clip",))
        if proj.metadata.get("clip.projector_type") != projector:
            raise ModelFileError(f"{mmproj} is not a {family} vision tower (projector "
                                 f"{proj.metadata.get('clip.projector_type')!r}, {family} needs {projector!r})")
        _check_pair(model, info, mmproj, proj)
        self._mtmd = mtmd
        if not verbose:  # libmtmd logs every image it encodes; keep the CLI and server output clean
            global _QUIET
            if _QUIET is None:
                _QUIET = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
            mtmd.mtmd_log_set(_QUIET, None)
            mtmd.mtmd_helper_log_set(_QUIET, None)
        from .device import guard_cpu_kernels

        guard_cpu_kernels()
        self.llama = llama_cpp.Llama(str(model), n_ctx=n_ctx, n_threads=n_threads or min(4, os.cpu_count() or 1),
                                     verbose=verbose)
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = llama_cpp.llama_supports_gpu_offload()
        params.print_timings = verbose
        params.n_threads = self.llama.n_threads
        self.ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), self.llama.model, params)
        if not self.ctx:
            self.llama.close()
            raise ModelFileError(f"libmtmd could not load {mmproj} for {model}; are they from the same checkpoint?")
        self.model_path = Path(model)
        self.model_name = self.model_path.name.removesuffix(".gguf")
        self.chat_template = self.llama.metadata.get("tokenizer.chat_template")
        self.marker = mtmd.mtmd_default_marker().decode()

    def prefill(self, messages: Any, *, allow_files: bool = False, allow_http: bool = False) -> dict[str, int]:
        """Render `messages`, evaluate text and images into the context; returns token counts.

        `positions` is where the reply starts (Qwen2.5-VL's images take fewer rope positions
        than tokens); `image_tokens` the tokens the images became.
        """
        import llama_cpp

        from .chat_template import render_chat

        msgs, images = split_images(messages, self.marker, allow_files=allow_files, allow_http=allow_http)
        text = render_chat(self.chat_template, msgs)
        mtmd = self._mtmd
        bitmaps = []
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            for img in images:
                buf = (ctypes.c_uint8 * len(img.data)).from_buffer(bytearray(img.data))
                bm = mtmd.mtmd_helper_bitmap_init_from_buf(self.ctx, buf, len(img.data), False)
                if not bm:
                    raise ImageError(f"{img.source} could not be decoded by libmtmd", param="messages")
                bitmaps.append(bm)
            raw = text.encode()
            inp = mtmd.mtmd_input_text()
            inp.text, inp.text_len, inp.add_special, inp.parse_special = raw, len(raw), True, True
            arr = (mtmd.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            if mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(inp), arr, len(bitmaps)) != 0:
                raise ImageError("the images do not match the image places in the prompt", param="messages")
            n_tokens = mtmd.mtmd_helper_get_n_tokens(chunks)
            if n_tokens >= self.llama.n_ctx():
                raise RequestError(f"the prompt with its images is {n_tokens} tokens, more than the context window "
                                   f"n_ctx={self.llama.n_ctx()}; send smaller or fewer images", param="messages")
            self.llama.reset()
            self.llama._ctx.kv_cache_clear()
            image_tokens, last = self._eval(chunks)
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            for bm in bitmaps:
                mtmd.mtmd_bitmap_free(bm)
        self._last = last
        return {"tokens": int(n_tokens), "positions": self.llama.n_tokens + 1, "image_tokens": int(image_tokens),
                "images": len(images)}

    def _eval(self, chunks: Any) -> tuple[int, int]:
        """Evaluate the chunks but the prompt's last text token; (image tokens, that last token).

        Images go through libmtmd (their rope positions); text through llama-cpp-python's eval,
        so its token record is right and the reply starts from the real last prompt token.
        """
        import llama_cpp

        mtmd = self._mtmd
        n = mtmd.mtmd_input_chunks_size(chunks)
        image_tokens, last = 0, -1
        for i in range(n):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                count = ctypes.c_size_t()
                ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                tokens = [int(ptr[j]) for j in range(count.value)]
                if i == n - 1:
                    tokens, last = tokens[:-1], tokens[-1]
                if tokens:
                    self.llama.eval(tokens)
            else:
                image_tokens += mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                n_past = llama_cpp.llama_pos(0)
                if mtmd.mtmd_helper_eval_chunk_single(self.ctx, self.llama._ctx.ctx, chunk, self.llama.n_tokens, 0,
                                                      self.llama.n_batch, False, ctypes.byref(n_past)) != 0:
                    raise EdgeQwenError("libmtmd failed to evaluate an image")
                self.llama.n_tokens = n_past.value
        if last < 0:
            raise RequestError("the prompt must end with text (the chat template's assistant turn)", param="messages")
        return image_tokens, last

    def chat(self, messages: Any, *, max_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.9,
             seed: int | None = None, stream: bool = False, allow_files: bool = False,
             allow_http: bool = False) -> dict | Iterator[dict]:
        """OpenAI-shaped chat.completion (or chunks with `stream`) for messages with image parts."""
        counts = self.prefill(messages, allow_files=allow_files, allow_http=allow_http)
        # llama-cpp-python resumes after its recorded tokens (the image cells hold no token ids,
        # so the record is compared with itself) and evaluates the last prompt token first
        prompt = self.llama.input_ids[: self.llama.n_tokens].tolist() + [self._last]
        gen = self.llama.create_completion(prompt=prompt, max_tokens=max_tokens, temperature=temperature,
                                           top_p=top_p, top_k=0, min_p=0.0, repeat_penalty=1.0, seed=seed,
                                           stop=["<|im_end|>", "<|endoftext|>"], stream=stream)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        usage = lambda n: {"prompt_tokens": counts["tokens"], "completion_tokens": n,  # noqa: E731
                           "total_tokens": counts["tokens"] + n,
                           "prompt_tokens_details": {"image_tokens": counts["image_tokens"]}}
        if not stream:
            c = gen["choices"][0]
            return {"id": cid, "object": "chat.completion", "created": created, "model": self.model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": c["text"]},
                                 "finish_reason": c["finish_reason"]}],
                    "usage": usage(gen["usage"]["completion_tokens"])}
        return self._stream(gen, cid, created, usage)

    def _stream(self, gen, cid, created, usage) -> Iterator[dict]:
        def chunk(delta, finish=None, **extra):
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}

        yield chunk({"role": "assistant", "content": ""})
        n = 0
        for c in gen:
            ch = c["choices"][0]
            if ch["text"]:
                n += 1
                yield chunk({"content": ch["text"]})
            if ch.get("finish_reason"):
                yield chunk({}, ch["finish_reason"], usage=usage(n))

    def close(self) -> None:
        """Free the vision tower and the model."""
        if self.ctx:
            self._mtmd.mtmd_free(self.ctx)
            self.ctx = None
        self.llama.close()

    def __enter__(self) -> VisionChat:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def image_messages(prompt: str, images: list[str], system: str | None = None) -> list[dict]:
    """OpenAI-shaped messages for one prompt about `images` (paths or URLs), images first as Qwen shows them."""
    parts: list[dict] = [{"type": "image_url", "image_url": {"url": str(i)}} for i in images]
    parts.append({"type": "text", "text": prompt})
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": parts}]


class VisionServed:
    """A VisionChat as the HTTP server serves a model (`create_app({"qwen2.5-vl": VisionServed(vc)})`).

    Takes the server's chat arguments; image parts come as OpenAI `image_url` parts (data:
    URLs only: a server never reads its own files, and fetches http(s) only with `allow_http`).
    JSON formats, tools, stop strings and thinking are refused with images for now (400).
    """

    parallel = 1

    def __init__(self, vision: VisionChat, allow_http: bool = False):
        self.vision, self.allow_http = vision, allow_http
        self.model_name, self.model_path = vision.model_name, vision.model_path
        self.chat_template = vision.chat_template

    def chat(self, messages: Any, *, stream: bool = False, cancel: Any = None, temperature: float = 0.7,
             top_p: float = 0.9, max_tokens: int | None = None, default_max_tokens: int = 1024,
             seed: int | None = None, stop: Any = None, response_format: Any = None, tools: Any = None,
             enable_thinking: bool | None = None, **_scheduling: Any) -> dict | Iterator[dict]:
        """OpenAI-shaped reply, as EdgeQwen.chat gives it (cancel is honoured between chunks)."""
        for name, value in (("stop", stop), ("tools", tools), ("enable_thinking", enable_thinking)):
            if value:
                raise RequestError(f"{name} is not supported by the vision model yet; leave it out", param=name)
        if response_format not in (None, {"type": "text"}):
            raise RequestError("response_format is not supported by the vision model yet", param="response_format")
        out = self.vision.chat(messages, max_tokens=max_tokens or default_max_tokens, temperature=temperature,
                               top_p=top_p, seed=seed, stream=stream, allow_http=self.allow_http)
        if not stream:
            return out
        return self._cancellable(out, cancel)

    @staticmethod
    def _cancellable(chunks: Iterator[dict], cancel: Any) -> Iterator[dict]:
        for c in chunks:
            if cancel is not None and cancel.is_set():
                yield {**c, "choices": [{"index": 0, "delta": {}, "finish_reason": "cancelled"}],
                       "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
                return
            yield c

    def close(self) -> None:
        self.vision.close()
