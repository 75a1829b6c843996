"""The model store: where pulled checkpoints, the default model and converted files live.

The store is `EDGE_QWEN_HOME` (default: the user's cache folder, `~/.cache/edge-qwen`).
Layout:

    <home>/hf/                     huggingface_hub cache used by `pull`
    <home>/models/                 GGUF files made or assembled by edge-qwen
    <home>/checkpoints/<name>/     Hugging Face checkpoints rebuilt from a GGUF
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import ModelFileError, OutputWriteError
from .files import atomic_output, sha256_file



def _default_entry() -> dict:
    from .manifest import load_manifest

    m = load_manifest()
    return next(e for e in m["offline"] if e["name"] == m["default"])


_DEFAULT = _default_entry()
DEFAULT_MODEL_NAME: str = _DEFAULT["name"]
DEFAULT_MODEL_SHA256: str = _DEFAULT["sha256"]
DEFAULT_MODEL_SIZE: int = _DEFAULT["size"]
# (import name, file inside the package) for each part, in concatenation order
DEFAULT_MODEL_PARTS: list[tuple[str, str]] = [
    (p["package"].replace("-", "_"), p["file"].split("/", 1)[1]) for p in _DEFAULT["parts"]
]


def home() -> Path:
    """The store root: $EDGE_QWEN_HOME, else $XDG_CACHE_HOME/edge-qwen, else ~/.cache/edge-qwen."""
    env = os.environ.get("EDGE_QWEN_HOME")
    if env:
        root = Path(env).expanduser()
    else:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        root = Path(cache) / "edge-qwen"
    return root


def _store_folder(name: str) -> Path:
    d = home() / name
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from .files import os_problem

        what, _todo = os_problem(e)
        raise OutputWriteError(f"cannot create the model store folder {d}: {what}; set EDGE_QWEN_HOME to a "
                               "folder you can write to") from None
    return d


def models_dir() -> Path:
    """Folder for GGUF files in the store (created on demand)."""
    return _store_folder("models")


def checkpoints_dir() -> Path:
    """Folder for rebuilt Hugging Face checkpoints (created on demand)."""
    return _store_folder("checkpoints")


def hf_cache_dir() -> Path:
    """huggingface_hub cache folder used by `pull`."""
    return home() / "hf"


def _part_files() -> list[Path]:
    files = []
    for i, (pkg, rel) in enumerate(DEFAULT_MODEL_PARTS, start=1):
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise ModelFileError(
                f"the default model's part {i} (package {pkg.replace('_', '-')}) is not installed; "
                "install it with: pip install 'edge-qwen[model]'  (or pass a GGUF path / set EDGE_QWEN_MODEL)"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / rel
        if not path.is_file():
            raise ModelFileError(f"the default model's part file {path} is missing; reinstall 'edge-qwen[model]'")
        files.append(path)
    return files


def default_model_path(assemble: bool = True, quiet: bool = True) -> Path:
    """Path to the default GGUF model, assembling it from the installed parts once.

    The six parts are concatenated under a temporary name, the sha256 is checked, and only
    then is the file renamed into the store, so a broken assembly never looks complete.
    """
    target = models_dir() / f"{DEFAULT_MODEL_NAME}.gguf"
    if target.is_file() and target.stat().st_size == DEFAULT_MODEL_SIZE:
        return target
    if not assemble:
        raise ModelFileError(f"the default model is not assembled yet at {target}; run `edge-qwen demo`")
    parts = _part_files()
    from .progress import progress

    total = sum(p.stat().st_size for p in parts)
    with atomic_output(target, force=True, expected_size=total) as tmp:
        with open(tmp, "wb") as out, progress(total, "assembling default model", "B", quiet,
                                              unit_scale=True) as bar:
            for p in parts:
                with open(p, "rb") as f:
                    while block := f.read(1 << 22):
                        out.write(block)
                        bar.update(len(block))
        digest = sha256_file(tmp)
        if digest != DEFAULT_MODEL_SHA256:
            raise ModelFileError(
                f"the assembled default model has sha256 {digest}, expected {DEFAULT_MODEL_SHA256}; "
                "reinstall the parts: pip install --force-reinstall 'edge-qwen[model]'"
            )
    return target


def resolve_model(model: str | os.PathLike | None) -> Path:
    """Turn a CLI/API model argument into a GGUF path.

    None (or "default") means $EDGE_QWEN_MODEL if set, else the default model. A name that is
    not a path is looked up in the store's models folder (with or without `.gguf`), then among
    pulled GGUF repos (`ORG/NAME`, or `ORG/NAME:QUANT` when several quantizations are pulled).
    An error about the model $EDGE_QWEN_MODEL names says it came from there.
    """
    if model is None or str(model) in ("", "default"):
        env = os.environ.get("EDGE_QWEN_MODEL")
        if env and env != "default":
            from .errors import EdgeQwenError

            try:
                return resolve_model(env)
            except EdgeQwenError as e:
                e.message = f"EDGE_QWEN_MODEL={env}: {e.message} (unset EDGE_QWEN_MODEL for the default model)"
                e.args = (e.message,)
                raise
        return default_model_path()
    p = Path(model).expanduser()
    if p.exists():
        return p
    store = home() / "models"  # looked in, not created: a lookup writes nothing
    for cand in (store / str(model), store / f"{model}.gguf"):
        if cand.is_file():
            return cand
    pulled = pulled_gguf(str(model))
    if pulled is not None:
        return pulled
    from .errors import ModelNotFoundError
    from .files import missing_path_note

    # Say what is missing on disk first (a mistyped path is the likelier mistake), then the store.
    raise ModelNotFoundError(
        f"model {str(model)!r} is neither a file nor a model in the store: {missing_path_note(p)}, and {store} "
        "has no model of that name; give a GGUF path or run `edge-qwen list` to see the store"
    )


def pulled_gguf(name: str) -> Path | None:
    """The GGUF of a pulled repo named `ORG/NAME` or `ORG/NAME:QUANT` (`pull REPO --quant Q`), or None.

    A checkpoint repo (safetensors) is not runnable: ModelNotFoundError says to convert it. Several
    quantizations pulled and none chosen: ModelNotFoundError lists them.
    """
    import re

    repo, _, quant = name.partition(":")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        return None
    folder = hf_cache_dir() / f"models--{repo.replace('/', '--')}"
    snaps = folder / "snapshots"
    if not snaps.is_dir():
        return None
    ref = folder / "refs" / "main"
    commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else ""
    dirs = [d for d in snaps.iterdir() if d.is_dir()]
    if not dirs:
        return None
    snap = snaps / commit if commit and (snaps / commit).is_dir() else max(dirs, key=lambda d: d.stat().st_mtime)
    # later split parts load with the first; a vision tower (mmproj) travels with its model, it is not one
    ggufs = sorted(f for f in snap.glob("*.gguf") if not re.search(r"-0000[2-9]-of-|-000[1-9]\d-of-", f.name)
                   and not f.name.lower().startswith("mmproj"))
    if quant:
        ggufs = [f for f in ggufs if quant.lower() in f.name.lower()]
    from .errors import ModelNotFoundError

    if not ggufs:
        if (snap / "config.json").is_file() and not quant:
            raise ModelNotFoundError(f"{repo} is a pulled checkpoint, not a GGUF model; convert it first: "
                                     f"edge-qwen convert {repo} --type Q4_K_M")
        raise ModelNotFoundError(f"{name}: the store has no such GGUF; pull it with "
                                 f"edge-qwen pull {repo} --quant {quant or 'Q4_K_M'}")
    if len(ggufs) > 1:
        raise ModelNotFoundError(f"{repo} has several GGUF files in the store ({', '.join(f.name for f in ggufs)}); "
                                 f"name one as {repo}:QUANT, e.g. {repo}:q4_k_m")
    return ggufs[0]


_PROMPT_MARKS = set("?？!！。，,;；:：\"'“”‘’()（）")


def model_or_prompt(text: str) -> str:
    """How to read a single word a user gave where MODEL or PROMPT may stand: "model", "prompt" or "ambiguous".

    A model: an existing path, "default", a store name, a pulled repo, or a name ending in .gguf.
    A prompt: anything else with a space, punctuation of a sentence, or a character beyond ASCII
    (Chinese, say). What is left (one plain word that names nothing) could be either.
    """
    import re

    from .errors import EdgeQwenError

    if text == "default" or text.endswith(".gguf") or Path(text).expanduser().exists():
        return "model"
    store = home() / "models"
    if (store / text).is_file() or (store / f"{text}.gguf").is_file():
        return "model"
    try:
        if pulled_gguf(text) is not None:
            return "model"
    except EdgeQwenError:
        return "model"  # a pulled repo that needs a word more: resolving it says which
    if any(c.isspace() or c in _PROMPT_MARKS or ord(c) > 127 for c in text):
        return "prompt"
    if re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", text) or "\\" in text or text.startswith(("./", "../", "~", "/")):
        return "model"
    return "ambiguous"
