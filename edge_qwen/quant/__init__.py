"""Quantization: the table of llama.cpp types, `quantize` through llama.cpp's own quantizer,
importance matrices (collection and file format), and the provenance written into outputs."""
