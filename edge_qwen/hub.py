"""Pulling Hugging Face checkpoints into the model store, and finding them again offline.

`pull` wraps huggingface_hub's `snapshot_download`, limited to the files conversion needs,
into the store's own HF cache (`edge_qwen.store.hf_cache_dir()`); `snapshot_path` finds a
pulled repo without touching the network. huggingface_hub is imported only inside functions.
"""

from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError, DiskSpaceError, EdgeQwenError, ModelNotFoundError, OutputWriteError
from .store import hf_cache_dir

# What conversion needs from a checkpoint repo of any supported family; nothing else is fetched
# (no *.bin, onnx, gguf...). Vision models (Qwen2.5-VL) need the image preprocessor's settings
# for `convert --mmproj`; newer repos keep the chat template apart, in chat_template.jinja/.json.
ALLOW_PATTERNS = [
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
    "*.safetensors", "model.safetensors.index.json",
    "LICENSE*", "README.md",
]
# Conversion reads the repo's top folder only; "*" also matches "/" in huggingface_hub's patterns,
# so sub-folders (onnx/, original/, other pipelines' weights) are excluded explicitly.
IGNORE_PATTERNS = ["*/*"]
QWEN2_ARCHITECTURE = "Qwen2ForCausalLM"
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def _repo_folder(repo_id: str) -> Path:
    # huggingface_hub's cache layout: models--{org}--{name}
    return hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def _is_in_store(repo_id: str) -> bool:
    return _repo_folder(repo_id).is_dir()


def _check_repo_id(repo_id: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", repo_id or "") or ".." in repo_id:
        raise EdgeQwenError(
            f"{repo_id!r} is not a Hugging Face repo id; give it as ORG/NAME, e.g. Qwen/Qwen2.5-0.5B-Instruct",
            param="repo_id",
        )


def is_pulled(repo_id: str) -> bool:
    """Whether the store's HF cache (or the user's own HF cache) has a folder for `repo_id`; no network."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", repo_id or "") or ".." in repo_id:
        return False
    return _repo_folder(repo_id).is_dir() or (user_hf_cache() / ("models--" + repo_id.replace("/", "--"))).is_dir()


def snapshot_path(repo_id: str, revision: str | None = None) -> Path:
    """The local folder of a pulled repo, found offline in the store's HF cache.

    `revision` is a branch, tag or commit hash (default: main). Raises ModelNotFoundError
    saying to run `edge-qwen pull REPO` when the repo (or that revision) was never pulled.
    """
    _check_repo_id(repo_id)
    rev = revision or "main"
    folder = _repo_folder(repo_id)
    if not folder.is_dir():  # downloaded before by transformers / huggingface-cli: use it where it is
        found = find_in_user_cache(repo_id, revision)
        if found is not None:
            return found
    hint = f"run `edge-qwen pull {repo_id}" + (f" --revision {revision}`" if revision else "`")
    if _COMMIT_RE.fullmatch(rev):
        commit = rev
    else:
        ref = folder / "refs" / rev
        if not ref.is_file():
            raise ModelNotFoundError(
                f"{repo_id} (revision {rev}) is not in the model store ({hf_cache_dir()}); {hint} first"
            )
        commit = ref.read_text(encoding="utf-8").strip()
    snap = folder / "snapshots" / commit
    missing = "it has no config.json" if not (snap / "config.json").is_file() else _missing_files(repo_id, commit)
    if missing:
        raise ModelNotFoundError(
            f"{repo_id} (revision {rev}, commit {commit[:12]}) is only partly in the model store ({missing}); "
            f"{hint} to complete it"
        )
    return snap


def _missing_files(repo_id: str, commit: str) -> str:
    """'' if the snapshot holds every allowed file of the commit's listing, else what is missing.

    huggingface_hub keeps the commit's file listing beside the snapshot; its offline
    `snapshot_download` compares the two, so an interrupted pull is never taken for a complete one.
    """
    from huggingface_hub import errors as hf
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, revision=commit, cache_dir=str(hf_cache_dir()),
                          allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS, local_files_only=True)
    except hf.IncompleteSnapshotError as e:
        return _missing_summary(e)
    except hf.LocalEntryNotFoundError:
        return "its snapshot folder is missing"
    return ""


@dataclass
class PullResult:
    """What `pull` did: the snapshot it left in the store and what it had to download for it."""

    repo_id: str
    revision: str
    commit: str
    path: Path
    files: list[str]  # every file of the snapshot (relative paths)
    fetched: list[str]  # the files this call downloaded (the rest were already in the store)
    bytes_fetched: int
    total_bytes: int
    architecture: str | None
    offline: bool
    warnings: list[str] = field(default_factory=list)
    mmproj: Path | None = None  # a GGUF repo's vision tower, pulled with the model (pull_gguf)


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _offline() -> bool:
    v = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return v.strip().upper() in ("1", "ON", "YES", "TRUE")


def _tqdm_class(quiet: bool):
    """A tqdm class for huggingface_hub's bars, silent under the same rule as edge_qwen.progress."""
    import sys

    from tqdm.auto import tqdm

    disable = quiet or not sys.stderr.isatty()

    class _Bar(tqdm):
        # huggingface_hub leaves its byte bars open; pull() closes them before printing its report.
        opened: list[tqdm] = []

        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            kwargs["disable"] = disable
            kwargs.setdefault("file", sys.stderr)
            super().__init__(*args, **kwargs)
            _Bar.opened.append(self)

    return _Bar


def _snapshot_files(snap: Path) -> list[Path]:
    return sorted(p for p in snap.rglob("*") if p.is_file())


def _cache_state(folder: Path) -> tuple[set[str], set[Path]]:
    """Blob names and snapshot files present before a pull, to tell what the pull fetched."""
    blobs = {p.name for p in (folder / "blobs").glob("*")} if (folder / "blobs").is_dir() else set()
    files = {p for p in (folder / "snapshots").rglob("*") if p.is_file()} if (folder / "snapshots").is_dir() else set()
    return blobs, files


def read_architecture(snap: Path) -> str | None:
    """The first entry of config.json's `architectures`, or None if it has none."""
    cfg = snap / "config.json"
    try:
        archs = json.loads(cfg.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return None
    return archs[0] if archs and isinstance(archs[0], str) else None


def _transport_errors() -> tuple[type[Exception], ...]:
    # Network failures that outlast huggingface_hub's own retries surface as its HTTP client's
    # exceptions (httpx2 in huggingface_hub 2.x, httpx before), which are not OSError.
    import importlib

    errs = []
    for name in ("httpx2", "httpx"):
        try:
            errs.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errs)


def _missing_summary(e: Exception) -> str:
    # huggingface_hub's IncompleteSnapshotError message names the missing files; keep that part.
    m = re.search(r"(\d+ file\(s\) are missing \(.*?\))\.(\s|$)", str(e), re.S)
    return m.group(1) if m else "some files are missing"


# OSError numbers that mean the store cannot be written (not a network failure).
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                errno.ENOTDIR, errno.EMFILE, errno.ENAMETOOLONG}


def _translate(e: Exception, repo_id: str, revision: str, offline: bool) -> EdgeQwenError:
    """huggingface_hub's exceptions -> one-line errors that say what to do."""
    from huggingface_hub import errors as hf

    if isinstance(e, OSError) and e.errno in _DISK_ERRNOS and not isinstance(e, hf.HfHubHTTPError):
        from .files import os_problem

        what, todo = os_problem(e)
        where = e.filename if isinstance(e.filename, str) and e.filename else hf_cache_dir()
        cls = DiskSpaceError if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else OutputWriteError
        return cls(f"cannot write {where} while pulling {repo_id}: {what}; {todo} (or set EDGE_QWEN_HOME to "
                   "a folder on another disk); run the pull again to resume it")
    where = _endpoint()
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, hf.GatedRepoError):
        return EdgeQwenError(
            f"{repo_id} is a gated repo on {where} (HTTP {status}): accept its conditions on its Hub page, "
            "then set HF_TOKEN (or pass --token) to a token of that account", code="unauthorized")
    if isinstance(e, hf.RevisionNotFoundError):
        return ModelNotFoundError(
            f"revision {revision!r} does not exist in {repo_id} on {where}; give a branch, tag or commit "
            "hash that exists (or leave out --revision for main)")
    if isinstance(e, hf.RepositoryNotFoundError):
        if status == 401:
            return EdgeQwenError(
                f"{repo_id} on {where} needs authentication or does not exist (HTTP 401): for a private or "
                "gated repo set HF_TOKEN (or pass --token); otherwise check the repo id", code="unauthorized")
        return ModelNotFoundError(f"{repo_id} does not exist on {where} (HTTP {status or 404}); check the repo id, "
                                  "e.g. Qwen/Qwen2.5-0.5B-Instruct (`edge-qwen models --known` lists them)")
    if isinstance(e, hf.HfHubHTTPError) and status in (401, 403):
        return EdgeQwenError(f"{where} refused access to {repo_id} (HTTP {status}): set HF_TOKEN (or pass --token) "
                             "to a token allowed to read it", code="unauthorized")
    if isinstance(e, hf.LocalEntryNotFoundError) or isinstance(e, _transport_errors()) or offline:
        partial = isinstance(e, hf.IncompleteSnapshotError)
        state = f"is only partly in the model store ({_missing_summary(e)})" if partial else "is not in the model store"
        if offline:
            return ModelNotFoundError(
                f"{repo_id} (revision {revision}) {state} and the network is off (HF_HUB_OFFLINE=1); "
                f"unset HF_HUB_OFFLINE to download it")
        missing = f" ({_missing_summary(e)})" if partial else ""
        return EdgeQwenError(
            f"cannot reach the Hub at {where} to pull {repo_id}{missing}: check your connection, set HF_ENDPOINT "
            "to a reachable mirror, or work offline (HF_HUB_OFFLINE=1) with what is in the store", code="offline")
    if isinstance(e, hf.HfHubHTTPError):
        first_line = (str(e).strip().splitlines() or [""])[0]
        return EdgeQwenError(f"{where} answered HTTP {status} while pulling {repo_id}; run the pull again later "
                             f"to resume it ({first_line})", code="hub_error")
    first_line = (str(e).strip().splitlines() or [""])[0]
    return EdgeQwenError(f"pulling {repo_id} failed ({type(e).__name__}: {first_line}); "
                         "run the pull again to resume it", code="hub_error")


def _check_pull_space(repo_id: str, revision: str, token: str | None, blobs_present: set[str]) -> None:
    """Refuse a pull whose missing files do not fit the store's disk, before downloading any.

    The sizes come from the repo's file listing (one small request; `snapshot_download` makes
    the same). If the listing cannot be had, nothing is checked here: the download that
    follows reports the network problem, and a disk that fills up is still one clear error.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    from .files import check_free_space

    try:
        entries = [f for f in HfApi(endpoint=_endpoint(), token=token).list_repo_tree(
            repo_id, revision=revision, recursive=False) if getattr(f, "size", None) is not None]
    except Exception:  # noqa: BLE001 -- best effort: snapshot_download reports the real error next
        return
    wanted = filter_repo_objects(entries, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS,
                                 key=lambda f: f.path)
    need = 0
    for f in wanted:
        blob = f.lfs.sha256 if getattr(f, "lfs", None) else getattr(f, "blob_id", None)
        if blob not in blobs_present:
            need += int(f.size)
    if need:
        check_free_space(hf_cache_dir() / "blobs", need, advice="free some space, or set EDGE_QWEN_HOME to a "
                         "folder on a disk with room")


def _check_force(force: bool, offline: bool, repo_id: str) -> None:
    if force and offline:
        raise EdgeQwenError(f"--force downloads {repo_id} again, which needs the network; unset HF_HUB_OFFLINE "
                            "(HF_HUB_OFFLINE=1 is set)", code="offline")


def pull(repo_id: str, revision: str | None = None, token: str | None = None, quiet: bool = False,
         force: bool = False) -> PullResult:
    """Download a Hugging Face checkpoint repo into the model store (resuming what is already there).

    Only the files conversion needs are fetched (`ALLOW_PATTERNS`). Honours HF_ENDPOINT,
    HF_TOKEN (or `token`) and HF_HUB_OFFLINE (offline: the cached snapshot is used if complete).
    Files already in the store are kept as they are unless `force`, which downloads every file
    again (how a damaged or truncated file is replaced). Warns (in `PullResult.warnings`) when
    config.json's architecture is not one edge-qwen converts.
    """
    local = Path(repo_id).expanduser()
    if local.is_dir() and (local / "config.json").is_file():
        raise EdgeQwenError(f"{repo_id} is a checkpoint folder on this machine, not a Hub repo to pull; "
                            f"convert it directly: edge-qwen convert {repo_id}", param="repo_id")
    _check_repo_id(repo_id)
    rev = revision or "main"
    _check_force(force, _offline(), repo_id)
    cached = None if force or _is_in_store(repo_id) else find_in_user_cache(repo_id, revision)
    if cached is not None:  # already downloaded by transformers or huggingface-cli: not fetched again
        files = [f.relative_to(cached).as_posix() for f in _snapshot_files(cached)]
        return PullResult(repo_id=repo_id, revision=rev, commit=cached.name, path=cached, files=files, fetched=[],
                          bytes_fetched=0, total_bytes=sum((cached / f).stat().st_size for f in files),
                          architecture=read_architecture(cached), offline=_offline(),
                          warnings=[f"{repo_id} was found in your Hugging Face cache ({user_hf_cache()}); "
                                    "used from there, nothing downloaded"])
    offline = _offline()
    import huggingface_hub
    from huggingface_hub import constants

    folder = _repo_folder(repo_id)
    blobs_before, files_before = _cache_state(folder) if not force else (set(), set())
    try:
        hf_cache_dir().mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _translate(e, repo_id, rev, offline) from None
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; follow the environment as it is now,
    # and put the library's setting back afterwards for whoever else uses it in this process.
    was_offline, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, offline
    bar = _tqdm_class(quiet)
    try:
        if not offline:
            _check_pull_space(repo_id, rev, token or os.environ.get("HF_TOKEN") or None, blobs_before)
        path = huggingface_hub.snapshot_download(
            repo_id, revision=rev, cache_dir=str(hf_cache_dir()), allow_patterns=ALLOW_PATTERNS,
            ignore_patterns=IGNORE_PATTERNS,
            token=token or os.environ.get("HF_TOKEN") or None, local_files_only=offline,
            force_download=force, endpoint=_endpoint(), tqdm_class=bar, max_workers=4)
    except (OSError, ValueError, *_transport_errors()) as e:  # huggingface_hub's errors are OSError/ValueError
        raise _translate(e, repo_id, rev, offline) from None
    finally:
        constants.HF_HUB_OFFLINE = was_offline
        for b in bar.opened:
            b.close()
    snap = Path(path)
    files, fetched, nbytes, total = [], [], 0, 0
    for f in _snapshot_files(snap):
        size = f.stat().st_size
        rel = f.relative_to(snap).as_posix()
        files.append(rel)
        total += size
        new = (f.resolve().name not in blobs_before) if f.is_symlink() else (f not in files_before)
        if new:
            fetched.append(rel)
            nbytes += size
    if not files:
        raise CheckpointError(f"{repo_id} (revision {rev}) has none of the files conversion needs "
                              f"({', '.join(ALLOW_PATTERNS)}) in its top folder; "
                              "is it a model repo with safetensors weights?")
    arch = read_architecture(snap)
    warnings = []
    from .convert.archs import supported_architectures

    if arch not in supported_architectures():
        warnings.append(f"{repo_id}: config.json's architecture is {arch or 'missing'}, not one edge-qwen converts "
                        f"({', '.join(supported_architectures())})")
    return PullResult(repo_id=repo_id, revision=rev, commit=snap.name, path=snap, files=files, fetched=fetched,
                      bytes_fetched=nbytes, total_bytes=total, architecture=arch, offline=offline, warnings=warnings)


@dataclass
class StoredCheckpoint:
    """A pulled checkpoint snapshot in the store's HF cache."""

    repo_id: str
    revisions: list[str]  # branch/tag names pointing at this commit (empty: pulled by hash)
    commit: str
    path: Path
    size: int
    n_files: int
    architecture: str | None
    missing: str = ""  # what an interrupted pull left out ("" when complete)


@dataclass
class StoredGGUF:
    """A GGUF file in the store's models folder, as check_gguf sees it."""

    name: str
    path: Path
    size: int
    architecture: str | None
    file_type: str | None  # llama.cpp's name, e.g. Q4_K_M
    error: str | None = None  # why check_gguf refused it, if it did


def list_checkpoints() -> list[StoredCheckpoint]:
    """Every snapshot in the store's HF cache (read from disk only, no network)."""
    out = []
    root = hf_cache_dir()
    for folder in sorted(root.glob("models--*")) if root.is_dir() else []:
        repo_id = folder.name[len("models--"):].replace("--", "/", 1)
        refs: dict[str, list[str]] = {}
        for ref in sorted((folder / "refs").rglob("*")) if (folder / "refs").is_dir() else []:
            if ref.is_file():
                name = ref.relative_to(folder / "refs").as_posix()
                refs.setdefault(ref.read_text(encoding="utf-8").strip(), []).append(name)
        for snap in sorted((folder / "snapshots").glob("*")) if (folder / "snapshots").is_dir() else []:
            files = _snapshot_files(snap)
            out.append(StoredCheckpoint(repo_id=repo_id, revisions=refs.get(snap.name, []), commit=snap.name,
                                        path=snap, size=sum(f.stat().st_size for f in files),
                                        n_files=len(files), architecture=read_architecture(snap),
                                        missing=_missing_files(repo_id, snap.name)))
    return out


def _file_type_name(ft: int | None) -> str | None:
    if ft is None:
        return None
    import gguf

    try:
        return gguf.LlamaFileType(ft).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"type {ft}"


def list_ggufs() -> list[StoredGGUF]:
    """Every *.gguf in the store's models folder, checked with check_gguf (damaged ones say why)."""
    from .errors import ModelFileError
    from .gguf_file import check_gguf
    from .store import models_dir

    out = []
    for p in sorted(models_dir().glob("*.gguf")):
        try:
            info = check_gguf(p, architectures=None)
        except ModelFileError as e:
            out.append(StoredGGUF(p.stem, p, p.stat().st_size, None, None, error=e.message))
            continue
        out.append(StoredGGUF(p.stem, p, info.size, info.architecture, _file_type_name(info.file_type)))
    return out


def store_summary() -> dict:
    """The whole store as plain data: home, checkpoints, GGUF files and the default model's state."""
    from .errors import ModelFileError
    from .store import DEFAULT_MODEL_NAME, default_model_path, home, models_dir

    try:
        default = {"name": DEFAULT_MODEL_NAME, "assembled": True, "path": str(default_model_path(assemble=False))}
    except ModelFileError:
        default = {"name": DEFAULT_MODEL_NAME, "assembled": False,
                   "path": str(models_dir() / f"{DEFAULT_MODEL_NAME}.gguf")}
    return {
        "home": str(home()),
        "default_model": default,
        "checkpoints": [{"repo": c.repo_id, "revisions": c.revisions, "commit": c.commit, "path": str(c.path),
                         "size": c.size, "files": c.n_files, "architecture": c.architecture,
                         "complete": not c.missing, "missing": c.missing}
                        for c in list_checkpoints()],
        "gguf": [{"name": g.name, "path": str(g.path), "size": g.size, "architecture": g.architecture,
                  "file_type": g.file_type, "error": g.error} for g in list_ggufs()],
    }


# An official GGUF repo's file for one quantization: NAME-q4_k_m.gguf, or its split parts
# NAME-q4_k_m-00001-of-00003.gguf (llama.cpp's gguf-split names; llama.cpp loads the first and
# finds the rest beside it).
_SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.I)


def gguf_files_for_quant(names: list[str], quant: str, repo_id: str) -> list[str]:
    """The file(s) of `quant` among a GGUF repo's file names: one file, or all its split parts in order.

    EdgeQwenError naming the quantizations the repo has when there is none, or when the choice
    is ambiguous or a split set is incomplete.
    """
    ggufs = [n for n in names if n.lower().endswith(".gguf") and "/" not in n and "mmproj" not in n.lower()]
    q = quant.lower().replace("-", "_")

    def quant_of(name: str) -> str:
        stem = _SPLIT_RE.sub("", name) if _SPLIT_RE.search(name) else name[:-5]
        return stem.rsplit("-", 1)[-1].lower().replace("-", "_") if "-" in stem else stem.lower()

    found = sorted(n for n in ggufs if quant_of(n) == q)
    if not found:
        have = sorted({quant_of(n) for n in ggufs})
        raise ModelNotFoundError(f"{repo_id} has no {quant} GGUF file; it has "
                                 f"{', '.join(have) if have else 'no GGUF files'}; pick one with --quant",
                                 param="quant")
    splits = [n for n in found if _SPLIT_RE.search(n)]
    if splits:
        total = int(_SPLIT_RE.search(splits[0]).group(2))
        parts = sorted(splits, key=lambda n: int(_SPLIT_RE.search(n).group(1)))
        if [int(_SPLIT_RE.search(n).group(1)) for n in parts] != list(range(1, total + 1)):
            raise EdgeQwenError(f"{repo_id}: the split {quant} files are incomplete ({', '.join(parts)}); "
                                f"expected {total} parts", param="quant")
        return parts
    if len(found) > 1:
        raise EdgeQwenError(f"{repo_id} has several {quant} GGUF files ({', '.join(found)}); pull one by its "
                            "exact name with --quant", param="quant")
    return found


def _quant_of(name: str) -> str:
    stem = _SPLIT_RE.sub("", name) if _SPLIT_RE.search(name) else name[:-5]
    return stem.rsplit("-", 1)[-1].lower().replace("-", "_") if "-" in stem else stem.lower()


# the mmproj taken when the repo has none of the model's own quantization (llama.cpp's -hf prefers f16 too)
_MMPROJ_PREFERENCE = ("f16", "bf16", "q8_0", "f32")


def mmproj_for_quant(names: list[str], quant: str) -> str | None:
    """The vision tower (mmproj-*.gguf) of a GGUF repo to keep with `quant`'s model file, or None.

    The mmproj of the same quantization if the repo has one, else f16, bf16, q8_0, f32, else the first.
    """
    found = sorted(n for n in names if n.lower().endswith(".gguf") and "/" not in n and "mmproj" in n.lower())
    if not found:
        return None
    for q in (quant.lower().replace("-", "_"), *_MMPROJ_PREFERENCE):
        hit = [n for n in found if _quant_of(n) == q]
        if hit:
            return hit[0]
    return found[0]


def _user_snapshot(repo_id: str, revision: str) -> Path | None:
    """The snapshot folder of `repo_id` at `revision` in the user's own HF cache (not the store's), or None."""
    cache = user_hf_cache()
    if not cache.is_dir() or cache.resolve() == hf_cache_dir().resolve():
        return None
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    ref = folder / "refs" / revision
    commit = revision if _COMMIT_RE.fullmatch(revision) else (ref.read_text().strip() if ref.is_file() else "")
    snap = folder / "snapshots" / commit
    return snap if commit and snap.is_dir() else None


def pull_gguf(repo_id: str, quant: str, revision: str | None = None, token: str | None = None,
              quiet: bool = False, force: bool = False) -> PullResult:
    """Download just one quantization of an official GGUF repo (`Qwen/Qwen2.5-7B-Instruct-GGUF`,
    `q4_k_m`), all of its split parts if it is split; `path` is the file to load (the first part).

    Offline, the files already in the store are used. Like llama.cpp's `-hf repo:quant`.
    `force` downloads the files again even if the store has them. A repo with a vision tower
    (`mmproj-*.gguf`) gives its mmproj too, into the same snapshot (`PullResult.mmproj`). Files
    already in the user's own Hugging Face cache (HF_HUB_CACHE / HF_HOME, where huggingface-cli
    and llama.cpp's -hf put them) are used from there, not downloaded again.
    """
    _check_repo_id(repo_id)
    rev = revision or "main"
    offline = _offline()
    _check_force(force, offline, repo_id)
    import huggingface_hub
    from huggingface_hub import HfApi, constants

    folder = _repo_folder(repo_id)
    blobs_before, _files_before = _cache_state(folder) if not force else (set(), set())
    was_offline, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, offline
    bar = _tqdm_class(quiet)
    tok = token or os.environ.get("HF_TOKEN") or None
    user_snap = None if force or _is_in_store(repo_id) else _user_snapshot(repo_id, rev)
    from_user_cache = False
    try:
        if offline:
            ref = folder / "refs" / rev
            commit = rev if _COMMIT_RE.fullmatch(rev) else (ref.read_text().strip() if ref.is_file() else "")
            snap_dir = folder / "snapshots" / commit
            if not commit or not snap_dir.is_dir():
                snap_dir = user_snap  # type: ignore[assignment]
            if snap_dir is None:
                raise ModelNotFoundError(f"{repo_id} (revision {rev}) is not in the model store nor in your Hugging "
                                         f"Face cache ({user_hf_cache()}) and the network is off (HF_HUB_OFFLINE=1); "
                                         "unset HF_HUB_OFFLINE to download it")
            names = [f.name for f in snap_dir.iterdir()]
        else:
            names = [f.path for f in HfApi(endpoint=_endpoint(), token=tok).list_repo_tree(repo_id, revision=rev)]
        wanted = gguf_files_for_quant(names, quant, repo_id)
        mmproj = mmproj_for_quant(names, quant)
        wanted += [mmproj] if mmproj else []
        if user_snap is not None and all((user_snap / n).is_file() for n in wanted):
            path, from_user_cache = str(user_snap), True  # downloaded before by huggingface-cli or llama.cpp -hf
        else:
            path = huggingface_hub.snapshot_download(
                repo_id, revision=rev, cache_dir=str(hf_cache_dir()), allow_patterns=wanted, token=tok,
                local_files_only=offline, force_download=force, endpoint=_endpoint(), tqdm_class=bar, max_workers=4)
    except (OSError, ValueError, *_transport_errors()) as e:
        raise _translate(e, repo_id, rev, offline) from None
    finally:
        constants.HF_HUB_OFFLINE = was_offline
        for b in bar.opened:
            b.close()
    snap = Path(path)
    fetched, nbytes, total = [], 0, 0
    for name in wanted:
        f = snap / name
        size = f.stat().st_size
        total += size
        if not from_user_cache and f.resolve().name not in blobs_before:
            fetched.append(name)
            nbytes += size
    from .errors import ModelFileError
    from .gguf_file import check_gguf, read_header

    try:  # a file the store had, damaged since (a plain pull keeps it): say which pull replaces it
        info = check_gguf(snap / wanted[0])
        for name in wanted[1:]:
            read_header(snap / name)
    except ModelFileError as e:
        raise ModelFileError(f"{e.message} (pulled from {repo_id}: `edge-qwen pull {repo_id} --quant {quant} "
                             "--force` downloads it again)") from None
    warnings = [f"{repo_id} {quant} was found in your Hugging Face cache ({user_hf_cache()}); used from there, "
                "nothing downloaded"] if from_user_cache else []
    return PullResult(repo_id=repo_id, revision=rev, commit=snap.name, path=snap / wanted[0], files=wanted,
                      fetched=fetched, bytes_fetched=nbytes, total_bytes=total, architecture=info.architecture,
                      offline=offline, warnings=warnings, mmproj=snap / mmproj if mmproj else None)


def user_hf_cache() -> Path:
    """The user's own Hugging Face cache (HF_HUB_CACHE, or HF_HOME/hub, or ~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def find_in_user_cache(repo_id: str, revision: str | None = None) -> Path | None:
    """A complete snapshot of `repo_id` already in the user's HF cache (downloaded by transformers,
    huggingface-cli, ...), or None. No network."""
    from huggingface_hub import errors as hf
    from huggingface_hub import snapshot_download

    cache = user_hf_cache()
    if cache.resolve() == hf_cache_dir().resolve() or not (cache / ("models--" + repo_id.replace("/", "--"))).is_dir():
        return None
    try:
        snap = Path(snapshot_download(repo_id, revision=revision or "main", cache_dir=str(cache),
                                      allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS,
                                      local_files_only=True))
    except (hf.LocalEntryNotFoundError, hf.IncompleteSnapshotError, OSError, ValueError):
        return None
    return snap if (snap / "config.json").is_file() else None


def snapshot_path_any(repo_id: str, revision: str | None = None) -> Path:
    """`snapshot_path` in the store, else a complete snapshot in the user's HF cache."""
    try:
        return snapshot_path(repo_id, revision)
    except ModelNotFoundError:
        found = find_in_user_cache(repo_id, revision)
        if found is None:
            raise
        return found
