"""The decode loop and what it drives: sampling, stop strings, UTF-8-safe pieces, and the
JSON-schema constraint (llguidance masks, schema support checks, final validation)."""
