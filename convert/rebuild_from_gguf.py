#!/usr/bin/env python
"""Rebuild a Hugging Face checkpoint folder from a qwen2 GGUF (same as `edge-qwen rebuild`).

    python convert/rebuild_from_gguf.py model.gguf OUT_DIR --dtype f16
"""

import sys

from edge_qwen.cli import main

if __name__ == "__main__":
    sys.exit(main(["rebuild", *sys.argv[1:]]))
