"""Benchmarks as a library: the quantization trade-off sweep, the lockstep evaluator
(perplexity, KL divergence), the metrics as pure functions, task accuracy, and the reports."""
