"""Hugging Face checkpoint → GGUF: reading checkpoints (one tensor-name table per
architecture), the tokenizer, the streaming GGUF writer, and rebuilding a checkpoint from a GGUF.

`convert(src, out, outtype=...)` is the function `edge-qwen convert` and
`convert/hf_to_gguf.py` call.
"""

from .writer import OUTTYPES, convert, default_f16_gguf, inspect_gguf, resolve_source

__all__ = ["OUTTYPES", "convert", "default_f16_gguf", "inspect_gguf", "resolve_source"]
