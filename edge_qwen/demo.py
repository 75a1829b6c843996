"""The demo pipeline behind `edge-qwen demo` (library function, so apps and tests can call it)."""

from __future__ import annotations

from collections.abc import Callable


DEMO_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 5, "maximum": 99},
        "major": {"type": "string"},
        "courses": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4},
    },
    "required": ["name", "age", "major", "courses"],
    "additionalProperties": False,
}


def run_demo(quiet: bool = False, echo: Callable[[str], None] = print,
             write: Callable[[str], object] | None = None) -> dict:
    """Run the whole pipeline offline on the default model, reusing what earlier runs made.

    Steps: assemble the default GGUF; rebuild a Hugging Face checkpoint from it; convert that
    back to f16 GGUF with edge-qwen; quantize to Q4_K_M with an importance matrix from the
    shipped calibration text; chat (English and Chinese, streamed); answer in JSON that
    validates against a schema. `write` receives streamed text pieces (default: stdout).
    """
    import sys

    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    from .gguf_file import check_gguf
    from .store import default_model_path

    path = default_model_path(quiet=quiet)
    info = check_gguf(path)
    echo(f"default model: {path} ({info.size / 1e6:.1f} MB, {info.n_tensors} tensors, "
         f"{info.bits_per_weight:.2f} bits/weight)")
    result = {"default_model": str(path)}

    # Rebuild a Hugging Face checkpoint from it and convert that back with edge-qwen (once, reused).
    from .convert.writer import default_f16_gguf
    from .convert.rebuild import default_checkpoint

    ckpt = default_checkpoint(quiet=quiet)
    echo(f"checkpoint rebuilt from it: {ckpt} (f16 safetensors, config, tokenizer)")
    f16 = default_f16_gguf(quiet=quiet)
    f16_info = check_gguf(f16)
    echo(f"converted by edge-qwen: {f16} ({f16_info.size / 1e6:.1f} MB, {f16_info.n_tensors} tensors, "
         f"{f16_info.bits_per_weight:.2f} bits/weight)")
    result.update(checkpoint=str(ckpt), f16_gguf=str(f16))

    # Quantize with an importance matrix computed from the shipped calibration corpus (once, reused).
    from .quant.quantize import quantize
    from .store import models_dir

    # "-imat-" keeps it apart from the original Q4_K_M default model in the same folder.
    q4 = models_dir() / f"{f16.stem.removesuffix('-f16')}-imat-q4_k_m.gguf"
    if not q4.exists():  # force: an imatrix an interrupted demo left beside it is computed again, not refused
        quantize(f16, q4, "Q4_K_M", calibration="default", chunks=8, quiet=quiet, force=True)
    q4_info = check_gguf(q4)
    echo(f"quantized with an importance matrix: {q4} ({q4_info.size / 1e6:.1f} MB, "
         f"{q4_info.bits_per_weight:.2f} bits/weight)")
    result["q4_k_m_gguf"] = str(q4)

    # Chat on the quantized model: streamed, English and Chinese, then schema-valid JSON.
    import json

    from .runtime import EdgeQwen

    with EdgeQwen(q4, n_ctx=2048) as llm:
        answers = []
        for prompt in ("In one sentence, what is a GGUF file?", "用一句话介绍长城。"):
            echo(f"\n> {prompt}")
            parts = []
            for chunk in llm.chat([{"role": "user", "content": prompt}], temperature=0, max_tokens=80,
                                  stream=True):
                piece = chunk["choices"][0]["delta"].get("content") or ""
                parts.append(piece)
                write(piece)
            write("\n")
            answers.append("".join(parts))
        prompt = "Describe a university student named Li Lei as JSON."
        echo(f"\n> {prompt}  (response_format: json_schema)")
        r = llm.chat([{"role": "user", "content": prompt}], temperature=0, max_tokens=200,
                     response_format={"type": "json_schema",
                                      "json_schema": {"name": "student", "schema": DEMO_SCHEMA, "strict": True}})
        content = r["choices"][0]["message"]["content"]
        echo(content)
        student = json.loads(content)
        import jsonschema

        jsonschema.validate(student, DEMO_SCHEMA)
        echo(f"valid against the schema ({r['usage']['completion_tokens']} tokens, "
             f"finish_reason {r['choices'][0]['finish_reason']})")
    result.update(answers=answers, student=student)
    return result
