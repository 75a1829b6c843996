"""Record llama.cpp's output for the tiny Qwen3-VL / Qwen3-VL-MoE / Qwen3.5 checkpoints (tests/family_vl.py).

    python tests/make_llamacpp_reference_vl.py --llama-cpp DIR [--mtmd-cli BIN] [--work DIR] [--archs ...]

DIR is the `vendor/llama.cpp` folder of llama-cpp-python 0.3.36's sdist (fetched from PyPI when
left out, as tests/make_llamacpp_reference.py does). Two records go to
tests/data/llamacpp_reference_vl.json:

- "files": for each architecture, part (text model, --mmproj) and outtype, the digest (tensor
  types, shapes, sha256; hyper-parameter keys) of the file llama.cpp's convert_hf_to_gguf.py
  writes, run from DIR so it uses its own gguf-py; edge-qwen converts the same checkpoint and
  any difference is printed. Qwen3.5's text model is converted by llama.cpp only (with
  --no-mtp: the tiny checkpoint has no MTP block); edge-qwen's side is the `family` work.
- "image_tokens": with BIN, llama.cpp's `llama-mtmd-cli` (built from the same tree:
  `cmake --build build --target llama-mtmd-cli`) run on llama.cpp's f16 text model and mmproj of
  each checkpoint, one image of each size in IMAGE_SIZES; the image-token count is the sum of
  the "n_tokens_batch = N" lines it logs (with -v) while decoding the image.

Needs torch and transformers (the test extra).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from family_models import digest_diff, gguf_digest  # noqa: E402
from family_vl import VL_ARCHS, make_vl_checkpoint  # noqa: E402
from make_llamacpp_reference import VERSION, _llama_cpp_dir, _run  # noqa: E402

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
REFERENCE = HERE / "data" / "llamacpp_reference_vl.json"
# (width, height) of the test images: a small one llama.cpp scales up to its minimum, a wide one, a larger one
IMAGE_SIZES = ((84, 56), (200, 120), (640, 480))


def make_image(path: Path, size: tuple[int, int], seed: int = 1) -> Path:
    """A random RGB PNG of `size` (the tests make the same images)."""
    import numpy as np
    from PIL import Image

    rs = np.random.RandomState(seed)
    w, h = size
    Image.fromarray((rs.random_sample((h, w, 3)) * 255).astype(np.uint8)).save(path, "PNG")
    return path


def mtmd_image_tokens(cli: Path, model: Path, mmproj: Path, image: Path) -> int:
    """Image tokens llama-mtmd-cli decodes for `image` (sum of the "n_tokens_batch = N" lines it logs with -v)."""
    proc = subprocess.run([str(cli), "-m", str(model), "--mmproj", str(mmproj), "--image", str(image), "-p", "Describe",
                           "-n", "1", "--temp", "0", "-t", "2", "-c", "4096", "-v"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"llama-mtmd-cli failed on {image}:\n{proc.stderr[-3000:]}")
    counts = [int(n) for n in re.findall(r"decoding image batch \d+/\d+, n_tokens_batch = (\d+)", proc.stderr)]
    if not counts:
        raise SystemExit(f"llama-mtmd-cli logged no image batch for {image}:\n{proc.stderr[-3000:]}")
    return sum(counts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, help="vendor/llama.cpp of the llama-cpp-python sdist")
    ap.add_argument("--mtmd-cli", type=Path, help="llama-mtmd-cli built from that tree")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    ap.add_argument("--archs", default=",".join(VL_ARCHS))
    ap.add_argument("--outtypes", default=",".join(OUTTYPES))
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="llamacpp-ref-vl-"))
    work.mkdir(parents=True, exist_ok=True)
    llama = args.llama_cpp or _llama_cpp_dir(work)
    converter = llama / "convert_hf_to_gguf.py"
    reference = json.loads(REFERENCE.read_text()) if REFERENCE.is_file() else {}
    reference["llama_cpp_python"] = VERSION
    reference.setdefault("files", {})
    reference.setdefault("image_tokens", {})
    failures = 0
    for arch in args.archs.split(","):
        ckpt = make_vl_checkpoint(work / f"ckpt-{arch}", arch)
        for part, flag in (("model", ["--no-mtp"] if arch == "qwen35" else []), ("mmproj", ["--mmproj"])):
            for outtype in args.outtypes.split(","):
                key = f"{arch}{'-mmproj' if part == 'mmproj' else ''}-{outtype}"
                ref_out = work / f"ref-{key}.gguf"
                ref_t, ref_mb = _run([sys.executable, str(converter), str(ckpt), "--outtype", outtype,
                                      "--outfile", str(ref_out), *flag], cwd=llama)
                ref_digest = gguf_digest(ref_out)
                reference["files"][key] = ref_digest
                line = f"{key:26s} llama.cpp {ref_t:5.1f} s {ref_mb:5d} MiB | {len(ref_digest['tensors'])} tensors"
                if arch != "qwen35" or part == "mmproj":
                    our_out = work / f"ours-{key}.gguf"
                    code = ("import sys; from edge_qwen.convert.writer import convert; "
                            f"convert(sys.argv[1], sys.argv[2], outtype={outtype!r}, force=True, quiet=True, "
                            f"mmproj={part == 'mmproj'})")
                    our_t, our_mb = _run([sys.executable, "-W", "ignore", "-c", code, str(ckpt), str(our_out)])
                    diff = digest_diff(gguf_digest(our_out), ref_digest)
                    line += (f" | edge-qwen {our_t:5.1f} s {our_mb:5d} MiB, "
                             f"{'identical' if not diff else f'{len(diff)} DIFFERENCES'}")
                    failures += bool(diff)
                    our_out.unlink()
                else:
                    diff = []
                print(line, flush=True)
                for d in diff:
                    print("   ", d)
                if outtype != "f16":
                    ref_out.unlink()
        if args.mtmd_cli:
            model, mmproj = work / f"ref-{arch}-f16.gguf", work / f"ref-{arch}-mmproj-f16.gguf"
            counts = {}
            for size in IMAGE_SIZES:
                image = make_image(work / f"image-{size[0]}x{size[1]}.png", size)
                counts[f"{size[0]}x{size[1]}"] = mtmd_image_tokens(args.mtmd_cli, model, mmproj, image)
            reference["image_tokens"][arch] = counts
            print(f"{arch}: llama-mtmd-cli image tokens {counts}", flush=True)
        REFERENCE.parent.mkdir(exist_ok=True)  # after each architecture: a long run keeps what it did
        REFERENCE.write_text(json.dumps(reference, indent=1, sort_keys=True) + "\n")
    print(f"wrote {REFERENCE}; {failures} file(s) differ")


if __name__ == "__main__":
    main()
