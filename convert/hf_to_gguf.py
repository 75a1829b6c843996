#!/usr/bin/env python
"""Convert a Hugging Face Qwen2 checkpoint to GGUF (same as `edge-qwen convert`).

    python convert/hf_to_gguf.py CHECKPOINT_DIR -o model-f16.gguf --outtype f16
"""

import sys

from edge_qwen.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
