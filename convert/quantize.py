#!/usr/bin/env python
"""Quantize a GGUF model with llama.cpp's quantizer (same as `edge-qwen quantize`).

    python convert/quantize.py model-f16.gguf --type Q4_K_M
    python convert/quantize.py model-f16.gguf --type Q8_0,Q6_K,Q4_K_M -o models/
    python convert/quantize.py model-f16.gguf --type IQ3_XXS --calibration default
    python convert/quantize.py --list
"""

import sys

from edge_qwen.cli import main

if __name__ == "__main__":
    sys.exit(main(["quantize", *sys.argv[1:]]))
