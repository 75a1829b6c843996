"""Everything that writes files, under the conditions of a real laptop (issue 10, "Conversion and files").

Every case runs the real `edge-qwen` command in a subprocess, as a user would: a read-only
output folder, a genuinely full file system (a small tmpfs, where this runs as root), a write
that hits the file-size limit half way (RLIMIT_FSIZE, everywhere), a run killed with SIGKILL,
weights holding NaN, and a mistyped relative path. Each must end in one `Error:` line naming
the path and the problem, and leave nothing behind but what was there before.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_qwen.gguf_file import check_gguf

CLI = [sys.executable, "-c", "from edge_qwen.cli import main; main()"]
TENSOR = "model.layers.1.mlp.up_proj.weight"  # (512, 256) in the tiny checkpoint


def run_cli(*args, cwd: Path | None = None, fsize: int | None = None, env: dict | None = None,
            timeout: int = 300) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess; `fsize` caps the size of any file it writes (ulimit -f)."""
    full = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    full.setdefault("HF_HUB_OFFLINE", "1")
    full.update(env or {})

    def limit() -> None:
        # Ignored SIGXFSZ: the write fails with EFBIG instead of killing the process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=full,
                          timeout=timeout, preexec_fn=limit if fsize is not None else None)


def one_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """The single `Error:` line of a failed run (no traceback, exit 1), checked to hold `needles`."""
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


@contextlib.contextmanager
def tmpfs(path: Path, size: str, readonly: bool = False):
    """A real small file system at `path` (root only); yields None where it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        yield None
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        yield None
        return
    try:
        if readonly:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture(scope="module")
def tiny_f16(tiny_checkpoint, tmp_path_factory) -> Path:
    from edge_qwen.convert.writer import convert

    return convert(tiny_checkpoint, tmp_path_factory.mktemp("f16") / "tiny-f16.gguf", quiet=True)


def _writers(d: Path, ckpt: Path, f16: Path) -> dict[str, tuple[list, dict]]:
    """Every command that writes, aimed at folder `d`: (arguments, environment)."""
    home = {"EDGE_QWEN_HOME": str(d / "home")}
    return {
        "convert": (["convert", ckpt, "-o", d / "m.gguf"], {}),
        "convert --type": (["convert", ckpt, "--type", "Q8_0", "-o", d / "q.gguf"], {}),
        "convert into the store": (["convert", ckpt], home),
        "quantize": (["quantize", f16, "--type", "Q8_0", "-o", d / "q.gguf"], {}),
        "imatrix": (["imatrix", f16, "-o", d / "m.imatrix.gguf", "--chunks", "1"], {}),
        "rebuild": (["rebuild", f16, d / "ckpt"], {}),
        "bench": (["bench", f16, "--quick", "--out", d / "bench"], {}),
        "pull": (["pull", "Qwen/Qwen2.5-0.5B-Instruct"], home),
        "demo": (["demo"], home),
    }


def test_read_only_folder_is_one_error_line_for_every_writer(tmp_path, tiny_checkpoint, tiny_f16):
    d = tmp_path / "ro"
    with tmpfs(d, "4m", readonly=True) as mounted:
        if mounted is None:
            if os.geteuid() == 0:
                pytest.skip("running as root without mount(8): a read-only folder cannot be made here")
            d.chmod(0o555)
            problem = "permission denied"
        else:
            problem = "read-only"
        try:
            for name, (args, env) in _writers(d, tiny_checkpoint, tiny_f16).items():
                t0 = time.monotonic()
                line = one_error(run_cli(*args, env=env), problem)
                assert str(d) in line, (name, line)  # the path is named
                assert time.monotonic() - t0 < 60, name  # refused before the slow work
            assert leftovers(d) == []
        finally:
            if mounted is None:
                d.chmod(0o755)


def test_full_disk_is_refused_before_the_work(tmp_path, tiny_checkpoint, tiny_f16):
    """A real 1 MB file system: every writer whose output size is known says so before starting."""
    d = tmp_path / "full"
    with tmpfs(d, "1m") as mounted:
        if mounted is None:
            pytest.skip("needs root to mount a small tmpfs (the file-size-limit test covers full writes everywhere)")
        writers = _writers(d, tiny_checkpoint, tiny_f16)
        for name in ("convert", "convert --type", "convert into the store", "quantize", "rebuild", "bench", "demo"):
            args, env = writers[name]
            line = one_error(run_cli(*args, env=env), "needs about", "free", str(d))
            assert "MB" in line, (name, line)
        assert [p for p in leftovers(d) if "partial" in p] == []
        assert not list(d.rglob("*.gguf"))


def test_disk_filling_up_during_quantize(tmp_path, tiny_f16):
    """llama.cpp's writer meets a really full disk half way: one line, not "failed: unknown"."""
    from edge_qwen.files import SPACE_MARGIN
    from edge_qwen.quant.types import quant_types

    probe = tmp_path / "probe.gguf"
    r = run_cli("quantize", tiny_f16, "--type", "Q4_K_M", "-o", probe, "-q")
    assert r.returncode == 0, r.stderr
    actual = probe.stat().st_size
    estimate = int(check_gguf(tiny_f16).n_params * quant_types("Q4_K_M")[0].bits_per_weight / 8) + SPACE_MARGIN
    # A file system that passes the (lower-bound) check but cannot hold the real file.
    pages = (estimate + actual) // 2 // 4096
    assert estimate < pages * 4096 < actual - 4096, (estimate, actual)
    d = tmp_path / "gap"
    with tmpfs(d, str(pages * 4096)) as mounted:
        if mounted is None:
            pytest.skip("needs root to mount a small tmpfs (the file-size-limit test covers full writes everywhere)")
        one_error(run_cli("quantize", tiny_f16, "--type", "Q4_K_M", "-o", d / "q.gguf"),
                  f"cannot write {d / 'q.gguf'}: no space left on the device")
        assert leftovers(d) == []


@pytest.mark.parametrize("name", ["convert", "convert --type", "quantize", "imatrix", "rebuild"])
def test_write_past_the_file_size_limit(name, tmp_path, tiny_checkpoint, tiny_f16):
    """Each writer hits a real EFBIG in the middle of its output (RLIMIT_FSIZE): one line, no partial file."""
    d = tmp_path / "out"
    d.mkdir()
    args, env = _writers(d, tiny_checkpoint, tiny_f16)[name]
    one_error(run_cli(*args, env=env, fsize=8192), "cannot write", "file-size limit")
    assert leftovers(d) == []


def test_pull_into_a_full_or_limited_store(tmp_path, tiny_checkpoint):
    """`pull` over real HTTP (the local Hub stand-in): a store too small is refused before downloading,
    a download cut by the file-size limit is one line, and the next pull completes it."""
    sys.path.insert(0, str(Path(__file__).parent))
    from hubstub import HubStub

    stub = HubStub().start()
    try:
        files = {p.name: p.read_bytes() for p in tiny_checkpoint.iterdir() if p.is_file()}
        stub.add_commit("acme/tiny-qwen2", files)
        online = {"HF_ENDPOINT": stub.endpoint, "HF_HUB_OFFLINE": "0"}
        small = tmp_path / "small"
        with tmpfs(small, "1m") as mounted:
            if mounted is not None:
                line = one_error(run_cli("pull", "acme/tiny-qwen2", env={**online, "EDGE_QWEN_HOME": str(small)}),
                                 "needs about", "EDGE_QWEN_HOME")
                assert "2.9 MB" in line
                assert not any(p.name == "model.safetensors" for p in small.rglob("*"))
        home = tmp_path / "home"
        env = {**online, "EDGE_QWEN_HOME": str(home)}
        one_error(run_cli("pull", "acme/tiny-qwen2", env=env, fsize=1 << 20),
                  "while pulling acme/tiny-qwen2", "file-size limit", "run the pull again")
        r = run_cli("pull", "acme/tiny-qwen2", env=env)
        assert r.returncode == 0, r.stderr
    finally:
        stub.stop()
    r = run_cli("convert", "acme/tiny-qwen2", "-o", tmp_path / "pulled.gguf", "-q", env={"EDGE_QWEN_HOME": str(home)})
    assert r.returncode == 0, r.stderr


# --- runs killed with SIGKILL ---------------------------------------------------------------

@pytest.fixture(scope="module")
def big_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint's tokenizer with wider layers (f16, ~90 MB): converting it to f32 takes
    long enough to catch the process in the middle of writing."""
    import numpy as np
    from safetensors.numpy import save_file

    from edge_qwen.convert.checkpoint import read_safetensors_header

    out = tmp_path_factory.mktemp("big") / "wide-qwen2"
    shutil.copytree(tiny_checkpoint, out)
    config = json.loads((out / "config.json").read_text())
    h, i = config["hidden_size"], config["intermediate_size"]
    wide = {h: 1024, i: 2816}
    config.update(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_hidden_layers=4)
    (out / "config.json").write_text(json.dumps(config))
    header, _ = read_safetensors_header(out / "model.safetensors")
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shape = tuple(wide.get(d, d) for d in info["shape"])
        if "embed_tokens" in name or "lm_head" in name:  # (vocab, hidden): the vocab may equal a width
            shape = (info["shape"][0], 1024)
        names = [name.replace("layers.1.", f"layers.{b}.") for b in (1, 2, 3)] if ".layers.1." in name else [name]
        for n in names:
            tensors[n] = np.full(shape, 0.01, dtype=np.float16)
    (out / "model.safetensors").unlink()
    save_file(tensors, str(out / "model.safetensors"))
    return out


def _start_convert(src: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(CLI + ["convert", str(src), "--outtype", "f32", "-o", str(out), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")


def _partial_being_written(proc: subprocess.Popen, out: Path) -> Path:
    """The run's partial file, once it holds more than 1 MiB, with the run paused (SIGSTOP) there.

    Pausing first and looking second removes the race with a fast machine, where the run could
    finish and rename its partial between the two looks. The caller resumes it (SIGCONT), or kills
    it; a signal sent to the paused run is delivered when it resumes."""
    partial = out.with_name(f".{out.name}.partial-{proc.pid}")
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the conversion never started writing"
        if partial.exists():
            os.kill(proc.pid, signal.SIGSTOP)
            while not _stopped(proc.pid):
                time.sleep(0.001)
            with contextlib.suppress(FileNotFoundError):
                if partial.stat().st_size > (1 << 20):
                    return partial
            assert partial.exists() or proc.poll() is None, "the conversion finished before it was caught"
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.002)


def test_partial_files_of_killed_runs_are_removed_by_the_next(tmp_path, big_checkpoint, tiny_checkpoint):
    d = tmp_path / "out"
    d.mkdir()
    procs = []
    try:
        live = _start_convert(big_checkpoint, d / "live.gguf")
        procs.append(live)
        live_partial = _partial_being_written(live, d / "live.gguf")  # a live writer, paused mid-file
        killed = _start_convert(big_checkpoint, d / "killed.gguf")
        procs.append(killed)
        killed_partial = _partial_being_written(killed, d / "killed.gguf")
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(30)
        assert killed_partial.exists() and not (d / "killed.gguf").exists()  # what SIGKILL leaves
        # A partial whose pid now belongs to a process started after the file was written (pid reuse).
        sleeper = subprocess.Popen(["sleep", "120"])
        procs.append(sleeper)
        reused = d / f".old.gguf.partial-{sleeper.pid}"
        reused.write_bytes(b"\0" * 4096)
        os.utime(reused, (time.time() - 3600,) * 2)

        r = run_cli("convert", tiny_checkpoint, "-o", d / "next.gguf", "-q")
        assert r.returncode == 0, r.stderr
        assert not killed_partial.exists() and not reused.exists()
        assert live_partial.exists()  # never a live process's file
        os.kill(live.pid, signal.SIGCONT)
        assert live.wait(300) == 0, live.stderr.read().decode()
        assert not live_partial.exists()
        assert check_gguf(d / "live.gguf").n_tensors > 0 and check_gguf(d / "next.gguf").n_tensors > 0
        assert leftovers(d) == ["live.gguf", "next.gguf"]
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
                p.wait(30)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_terminated_or_hung_up_run_removes_its_own_partial(sig, tmp_path, big_checkpoint):
    """`kill` and a closed terminal unwind like Ctrl-C: the partial file goes at once, no traceback."""
    d = tmp_path / "out"
    d.mkdir()
    proc = _start_convert(big_checkpoint, d / "m.gguf")
    try:
        _partial_being_written(proc, d / "m.gguf")
        os.kill(proc.pid, sig)
        os.kill(proc.pid, signal.SIGCONT)
        assert proc.wait(60) == 130
        err = proc.stderr.read().decode()
        assert "Traceback" not in err and err.strip() == "Interrupted.", err
        assert leftovers(d) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


# --- broken weights --------------------------------------------------------------------------

def _poisoned(src: Path, dst: Path, index: int, value: bytes) -> Path:
    """A copy of the bf16 checkpoint `src` with one value of TENSOR replaced by the bf16 bytes `value`."""
    from edge_qwen.convert.checkpoint import read_safetensors_header

    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    header, start = read_safetensors_header(f)
    info = header[TENSOR]
    assert info["dtype"] == "BF16"
    with open(f, "r+b") as fh:
        fh.seek(start + info["data_offsets"][0] + 2 * index)
        fh.write(value)
    return dst


@pytest.mark.parametrize("value,outtype,needle", [
    (b"\xc0\x7f", "f16", "holds 1 NaN and 0 infinite values (the first at row 300)"),
    (b"\x80\x7f", "bf16", "holds 0 NaN and 1 infinite values (the first at row 300)"),
    (b"\x80\xff", "q8_0", "holds 0 NaN and 1 infinite values (the first at row 300)"),
    (b"\xc3\x47", "f16", "has values up to 9.984e+04, beyond what F16 can hold"),  # 99840 in bf16
])
def test_broken_weights_are_refused_with_the_tensor_name(value, outtype, needle, tmp_path, tiny_checkpoint):
    src = _poisoned(tiny_checkpoint, tmp_path / "ckpt", 300 * 256 + 7, value)
    d = tmp_path / "out"
    d.mkdir()
    one_error(run_cli("convert", src, "--outtype", outtype, "-o", d / "m.gguf"), f"tensor '{TENSOR}'", needle)
    assert leftovers(d) == []


def test_weights_f16_cannot_hold_convert_to_bf16(tmp_path, tiny_checkpoint):
    src = _poisoned(tiny_checkpoint, tmp_path / "ckpt", 5, b"\xc3\x47")
    r = run_cli("convert", src, "--outtype", "bf16", "-o", tmp_path / "m.gguf", "-q")
    assert r.returncode == 0, r.stderr


def test_nan_found_in_a_later_chunk_of_a_streamed_tensor(tmp_path, tiny_checkpoint):
    """Checked chunk by chunk as the tensor streams: the row is counted across chunks."""
    from edge_qwen.convert.writer import convert
    from edge_qwen.errors import CheckpointError

    src = _poisoned(tiny_checkpoint, tmp_path / "ckpt", 450 * 256, b"\xc0\x7f")
    with pytest.raises(CheckpointError, match=rf"'{TENSOR}'.*1 NaN.*the first at row 450\)"):
        convert(src, tmp_path / "m.gguf", chunk_bytes=64 * 256 * 4, quiet=True)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial*"))


# --- mistyped paths --------------------------------------------------------------------------

def test_mistyped_relative_checkpoint_path_says_so_first(tmp_path):
    (tmp_path / "ckpt" / "qwen-small").mkdir(parents=True)
    env = {"EDGE_QWEN_HOME": str(tmp_path / "home")}
    line = one_error(run_cli("convert", "ckpt/qwen-smal", cwd=tmp_path, env=env),
                     "'ckpt/qwen-smal' is not a local folder", "did you mean 'qwen-small'?",
                     "edge-qwen pull ckpt/qwen-smal")
    assert line.index("not a local folder") < line.index("edge-qwen pull")
    one_error(run_cli("convert", "chkpt/qwen-small", cwd=tmp_path, env=env),
              f"is not a local folder ({tmp_path / 'chkpt'} does not exist)")
    assert not (tmp_path / "home" / "models").exists()
    (tmp_path / "ckpt" / "qwen-small" / "config.json").write_text("{}")
    one_error(run_cli("pull", "ckpt/qwen-small", cwd=tmp_path, env=env),
              "ckpt/qwen-small is a checkpoint folder on this machine", "edge-qwen convert ckpt/qwen-small")


def test_mistyped_model_paths_name_what_is_missing(tmp_path, tiny_f16):
    (tmp_path / "models").mkdir()
    shutil.copy(tiny_f16, tmp_path / "models" / "tiny-f16.gguf")
    env = {"EDGE_QWEN_HOME": str(tmp_path / "home")}
    typo = "models/tiny-f61.gguf"
    for args in (["quantize", typo], ["imatrix", typo], ["bench", typo, "--quick"], ["chat", typo, "hi"],
                 ["serve", typo], ["inspect", typo], ["rebuild", typo, "ckpt"]):
        one_error(run_cli(*args, cwd=tmp_path, env=env), "tiny-f61.gguf", "did you mean 'tiny-f16.gguf'?")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_quantize_of_a_gguf_with_nan_says_what_is_wrong(tmp_path, tiny_f16):
    """llama.cpp's row validation refuses it; the error says NaN/inf and what to do, not just "invalid data"."""
    from edge_qwen.gguf_file import read_header

    bad = tmp_path / "nan-f16.gguf"
    shutil.copy(tiny_f16, bad)
    _meta, tensors, start = read_header(bad)
    off = next(o for name, _s, _t, o in tensors if name == "blk.1.ffn_up.weight")
    with open(bad, "r+b") as f:
        f.seek(start + off + 2 * 1000)
        f.write(b"\x00\x7e")  # an f16 NaN
    r = run_cli("quantize", bad, "--type", "Q8_0", "-o", tmp_path / "q.gguf")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    # ggml prints its own line straight to stderr before ours (ggml_validate_row_data uses fprintf)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "'blk.1.ffn_up.weight'" in last and "NaN or infinite" in last, r.stderr
    assert not (tmp_path / "q.gguf").exists() and not list(tmp_path.glob(".*partial*"))


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux's /proc (a file whose read fails: EIO)")
def test_any_os_error_reaching_the_cli_is_one_line():
    """The CLI's boundary: an OSError no library call translated (here a real EIO) is one line too."""
    one_error(run_cli("inspect", "/proc/self/mem"), "input/output error", "(EIO)")


# --- replacing an existing folder (--force) ------------------------------------------------------

def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_rebuild_force_keeps_the_old_folder_until_the_new_one_is_in(tmp_path, tiny_f16, monkeypatch):
    """`rebuild --force` over an existing checkpoint: if the new folder cannot be renamed in, the old
    one is still there (it used to be deleted first); a successful run replaces it, leaving nothing else."""
    import errno

    from click.testing import CliRunner

    from edge_qwen.cli import main

    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "config.json").write_text('{"old": true}')
    (out / "model.safetensors").write_text("the old checkpoint")
    real_replace = os.replace

    def replace(src, dst, *a, **kw):
        if Path(dst) == out:
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    r = CliRunner().invoke(main, ["rebuild", str(tiny_f16), str(out), "--force", "-q"])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and len(r.output.strip().splitlines()) == 1, r.output
    assert f"cannot write {out}" in r.output and "input/output error" in r.output
    assert leftovers(tmp_path) == ["ckpt", "config.json", "model.safetensors"]
    assert (out / "model.safetensors").read_text() == "the old checkpoint"
    monkeypatch.setattr(os, "replace", real_replace)
    r = CliRunner().invoke(main, ["rebuild", str(tiny_f16), str(out), "--force", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    assert (out / "model.safetensors").stat().st_size > 1000
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_rebuild_force_replaces_only_a_checkpoint_folder(tmp_path, tiny_f16):
    """--force deletes the folder it replaces: never one of other files, never the source's own folder."""
    from click.testing import CliRunner

    from edge_qwen.cli import main

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.txt").write_text("mine")
    here = tmp_path / "models"
    here.mkdir()
    src = here / "m.gguf"
    shutil.copy(tiny_f16, src)
    (here / "config.json").write_text("{}")
    (here / "model.safetensors").write_bytes(b"x")
    for out, says in ((docs, f"{docs} is not a checkpoint folder"), (here, f"{src} is inside {here}")):
        r = CliRunner().invoke(main, ["rebuild", str(src), str(out), "--force", "-q"])
        assert r.exit_code == 1 and r.output.startswith("Error: ") and says in r.output, r.output
    assert leftovers(tmp_path) == sorted(["docs", "notes.txt", "models", "m.gguf", "config.json", "model.safetensors"])


def test_rebuild_force_killed_before_the_new_folder_is_in_loses_nothing(tmp_path, tiny_f16):
    """A real SIGKILL at the worst moment of `rebuild --force` (the new folder complete, about to be
    renamed over the old one): the old checkpoint survives, and the next run in that folder puts it
    back under its name and removes the unfinished new one."""
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "config.json").write_text('{"old": true}')
    (out / "model.safetensors").write_text("the old checkpoint")
    killer = f"""
import os, signal, sys
real = os.replace
def replace(src, dst, *a, **kw):
    if os.fspath(dst) == {str(out)!r}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *a, **kw)
os.replace = replace
from edge_qwen.cli import main
main(["rebuild", {str(tiny_f16)!r}, {str(out)!r}, "--force", "-q"])
"""
    r = subprocess.run([sys.executable, "-c", killer], capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert any(p.name.startswith(".ckpt.") for p in tmp_path.iterdir())  # what the kill left
    r = run_cli("rebuild", tiny_f16, tmp_path / "other", "-q")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "other"]
    assert json.loads((out / "config.json").read_text()) == {"old": True}
    assert (out / "model.safetensors").read_text() == "the old checkpoint"


def test_old_folder_moved_aside_by_a_killed_run_is_restored(tmp_path, tiny_f16):
    """A run killed between moving the old folder aside and renaming the new one in: the next run in
    that folder puts the old one back (nothing took its place) and removes the unfinished new one."""
    pid = _dead_pid()
    aside = tmp_path / f".ckpt.replaced-{pid}"
    aside.mkdir()
    (aside / "config.json").write_text('{"old": true}')
    unfinished = tmp_path / f".ckpt.partial-{pid}"
    unfinished.mkdir()
    (unfinished / "model.safetensors").write_bytes(b"\0" * 100)
    taken = tmp_path / f".taken.replaced-{pid}"  # moved aside, but a newer one is in its place: removed
    taken.mkdir()
    (tmp_path / "taken").mkdir()
    r = run_cli("rebuild", tiny_f16, tmp_path / "other", "-q")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "other", "taken"]
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text()) == {"old": True}


# --- broken checkpoints, through the real CLI ----------------------------------------------------

def _set_json(path: Path, **changes) -> None:
    obj = json.loads(path.read_text())
    obj.update(changes)
    path.write_text(json.dumps(obj))


def _cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


SHARD1 = "model-00001-of-00004.safetensors"
BROKEN = {  # what is done to a copy of a checkpoint -> what the one error line must say
    "truncated in the data": (lambda d: _cut(d / "model.safetensors", -4096),
                              ["model.safetensors is truncated: its tensors need", "download it again"]),
    "truncated in the header": (lambda d: _cut(d / "model.safetensors", 100),
                                ["model.safetensors is truncated or not a safetensors file"]),
    "cut to 5 bytes": (lambda d: _cut(d / "model.safetensors", 5), ["model.safetensors is truncated (5 bytes)"]),
    "a zip renamed": (lambda d: (d / "model.safetensors").write_bytes(b"PK\x03\x04" + bytes(4096)),
                      ["model.safetensors is truncated or not a safetensors file"]),
    "a git-lfs pointer": (lambda d: (d / "model.safetensors").write_bytes(
        b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n"), ["not a safetensors file"]),
    "a damaged header": (lambda d: (d / "model.safetensors").write_bytes(
        (lambda b: b[:8] + b"\xff" * 32 + b[40:])((d / "model.safetensors").read_bytes())),
        ["model.safetensors has a damaged header"]),
    "negative offsets": (lambda d: (d / "model.safetensors").write_bytes(
        (lambda h: len(h).to_bytes(8, "little") + h)(b'{"x":{"dtype":"F32","shape":[-1],"data_offsets":[0,-4]}}')),
        ["damaged entry for tensor 'x'"]),
    "a shard missing": (lambda d: (d / "model-00002-of-00004.safetensors").unlink(),
                        ["model-00002-of-00004.safetensors listed in model.safetensors.index.json is missing"]),
    "a shard truncated": (lambda d: _cut(d / SHARD1, -10), [f"{SHARD1} is truncated"]),
    "an index that is a list": (lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": [1]}'),
                                ["model.safetensors.index.json is damaged"]),
    "an index pointing outside": (lambda d: (d / "model.safetensors.index.json").write_text(
        '{"weight_map": {"x": "../elsewhere.safetensors"}}'), ["which is not a file beside it"]),
    "config.json not JSON": (lambda d: (d / "config.json").write_text("{oops"), ["config.json is not valid JSON"]),
    "config.json a folder": (lambda d: ((d / "config.json").unlink(), (d / "config.json").mkdir()),
                             ["has no config.json"]),
    "another architecture": (lambda d: _set_json(d / "config.json", architectures=["LlamaForCausalLM"],
                                                 model_type="llama"),
                             ["architecture LlamaForCausalLM is not supported", "Qwen2ForCausalLM",
                              "Qwen3ForCausalLM"]),
    "architectures not names": (lambda d: _set_json(d / "config.json", architectures=[{"x": 1}]),
                                ['"architectures" must be a list of class names']),
    "model_type of another family": (lambda d: _set_json(d / "config.json", model_type=["qwen2"]),
                                     ['model_type ["qwen2"] does not match architecture Qwen2ForCausalLM']),
    "tokenizer_config.json not JSON": (lambda d: (d / "tokenizer_config.json").write_text("{oops"),
                                       ["tokenizer_config.json is not valid JSON"]),
    "tokenizer.json of another shape": (lambda d: _set_json(d / "tokenizer.json", model=[1]),
                                        ["tokenizer.json is damaged"]),
    "a shard that cannot be read": (lambda d: ((d / "model.safetensors").unlink(),
                                               (d / "model.safetensors").symlink_to("/proc/self/mem")),
                                    ["cannot read", "model.safetensors: input/output error"]),
}


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory) -> Path:
    from conftest import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("sharded") / "tiny", max_shard_size="1MB")


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_checkpoint_is_one_error_line(kind, tmp_path, tiny_checkpoint, sharded_checkpoint):
    """Each way a checkpoint folder can be broken: exit 1, one `Error:` line naming the file and what to
    do, no traceback, nothing under the output name (and no partial file) left."""
    if kind == "a shard that cannot be read" and not Path("/proc/self/mem").exists():
        pytest.skip("needs Linux's /proc (a file whose read fails: EIO)")
    base = sharded_checkpoint if "shard" in kind and "cannot" not in kind or "index" in kind else tiny_checkpoint
    src = tmp_path / "ckpt"
    shutil.copytree(base, src)
    breaks, needles = BROKEN[kind]
    breaks(src)
    out = tmp_path / "out"
    out.mkdir()
    line = one_error(run_cli("convert", src, "-o", out / "m.gguf"), *needles)
    assert str(src) in line, line
    assert leftovers(out) == []


def test_pulled_checkpoint_errors_name_the_repo_to_pull_again(tmp_path, tiny_checkpoint):
    """A damaged file inside a Hugging Face cache snapshot: the error says which pull replaces it."""
    snap = tmp_path / "hf" / "models--acme--tiny-qwen2" / "snapshots" / ("ab" * 20)
    shutil.copytree(tiny_checkpoint, snap)
    _cut(snap / "model.safetensors", -100)
    one_error(run_cli("convert", snap, "-o", tmp_path / "m.gguf"),
              "model.safetensors is truncated", "`edge-qwen pull acme/tiny-qwen2 --force`")


def test_shard_cut_short_while_converting(tmp_path, tiny_checkpoint):
    """A file that shrinks after it was checked (another process, a failing disk): the read that runs
    past its end is a CheckpointError naming the file, not numpy's ValueError."""
    from edge_qwen.convert.checkpoint import open_checkpoint
    from edge_qwen.errors import CheckpointError

    src = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, src)
    ckpt = open_checkpoint(src)
    _cut(src / "model.safetensors", -4096)
    last = max(ckpt.tensors.values(), key=lambda t: t.offset)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is shorter than its header says"):
        list(last.chunks())


# --- side files of a run killed with SIGKILL ---------------------------------------------------

_KILLED_WHILE_WRITING = """
import os, pathlib, signal, sys
real = pathlib.Path.write_text
def write_then_die(self, *a, **kw):
    real(self, *a, **kw)  # the bytes are on disk, under whatever name the writer chose
    os.kill(os.getpid(), signal.SIGKILL)
pathlib.Path.write_text = write_then_die
exec(sys.argv[1])
"""

SIDE_WRITERS = {  # (code killed while writing, code of the next run writing into the same folder, folder)
    "source hash store": (
        "from edge_qwen.quant.provenance import source_sha256; source_sha256(sys.argv[2])",
        "from edge_qwen.quant.provenance import source_sha256; source_sha256(sys.argv[2])",
        "home/cache", ["sha256.json"]),
    "bench measurement files": (
        "from pathlib import Path; from edge_qwen.bench.sweep import QUICK, _measure_in_subprocess; "
        "_measure_in_subprocess(Path(sys.argv[2]), QUICK, Path(sys.argv[3]))",
        "from pathlib import Path; from edge_qwen.bench.sweep import _save_row; "
        "_save_row(Path(sys.argv[3]) / 'row-q8_0.json', {'type': 'Q8_0'})",
        "bench", ["row-q8_0.json"]),
}


@pytest.mark.parametrize("name", list(SIDE_WRITERS))
def test_side_files_of_a_killed_run_are_removed_by_the_next(name, tmp_path, tiny_f16):
    """Files written beside the outputs (the remembered source hashes, the bench's per-model
    measurement files) go through partial names: a run killed while writing one leaves a file the
    next run in that folder removes, never a stray file forever."""
    killed, following, folder, expected = SIDE_WRITERS[name]
    (tmp_path / "bench").mkdir()
    env = {**os.environ, "EDGE_QWEN_HOME": str(tmp_path / "home")}
    args = [str(tiny_f16), str(tmp_path / "bench")]
    r = subprocess.run([sys.executable, "-c", _KILLED_WHILE_WRITING, killed, *args], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert leftovers(tmp_path / folder) != []  # what the killed run left
    r = subprocess.run([sys.executable, "-c", "import sys; exec(sys.argv[1])", following, *args], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert leftovers(tmp_path / folder) == expected


def test_sqlite_journals_of_a_dead_run_go_with_its_partial_database(tmp_path):
    """An index built under a partial name has SQLite side files (-journal, -wal, -shm): they are the
    dead run's too, and go with it; a live process's stay."""
    from edge_qwen.files import remove_stale_partials

    dead, live = _dead_pid(), os.getpid()
    names = [f".docs.sqlite.partial-{dead}{s}" for s in ("", "-journal", "-wal", "-shm")]
    names += [f".docs.sqlite.partial-{live}-journal", "docs.sqlite", "docs.sqlite-journal"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    remove_stale_partials(tmp_path)
    assert leftovers(tmp_path) == sorted([f".docs.sqlite.partial-{live}-journal", "docs.sqlite", "docs.sqlite-journal"])


# --- every path option of every command: a folder for a file, a missing or unreadable file, an
# --- existing output --------------------------------------------------------------------------------

EIO_FILE = "/proc/self/mem"  # a file whose read fails (EIO); chmod cannot make one for root
PATH_CASES = [
    # (arguments, what the one line must say); {dir} a folder, {missing} a missing file, {eio} an
    # unreadable file, {f16} a good GGUF, {ckpt} a good checkpoint, {exists} an existing file
    (["quantize", "{f16}", "--type", "Q8_0", "-o", "{out}/q.gguf", "--calibration", "{dir}"],
     "calibration file {dir} is a folder, not a file"),
    (["imatrix", "{f16}", "-o", "{out}/i.gguf", "--calibration", "{dir}"], "calibration file {dir} is a folder"),
    (["convert", "{ckpt}", "--type", "Q8_0", "-o", "{out}/c.gguf", "--calibration", "{dir}"],
     "calibration file {dir} is a folder"),
    (["imatrix", "{f16}", "-o", "{out}/i.gguf", "--calibration", "{missing}"],
     "calibration file {missing} does not exist"),
    (["quantize", "{f16}", "--type", "Q8_0", "-o", "{out}/q.gguf", "--calibration", "{eio}"],
     "cannot read calibration file {eio}: input/output error"),
    (["convert", "{ckpt}", "--type", "Q8_0", "-o", "{out}/c.gguf", "--calibration", "{f16}"],
     "calibration file {f16} is not UTF-8 text"),
    (["imatrix", "{f16}", "-o", "{out}/i.gguf", "--calibration", "{zip}"],
     "calibration file {zip} is not text (it holds NUL bytes"),
    (["quantize", "{f16}", "--type", "Q8_0", "-o", "{out}/q.gguf", "--imatrix", "{dir}"], "imatrix file {dir} is a folder"),
    (["convert", "{ckpt}", "--type", "Q8_0", "-o", "{out}/c.gguf", "--imatrix", "{dir}"],
     "imatrix file {dir} is a folder"),
    (["convert", "{ckpt}", "--type", "Q8_0", "-o", "{out}/c.gguf", "--imatrix", "{missing}"],
     "imatrix file {missing} does not exist"),
    (["bench", "{f16}", "--quick", "--out", "{out}/b", "--imatrix", "{missing}"], "imatrix file {missing} does not exist"),
    (["bench", "{f16}", "--quick", "--out", "{out}/b", "--imatrix", "{dir}"], "imatrix file {dir} is a folder"),
    (["quantize", "{f16}", "--type", "Q8_0", "-o", "{out}/q.gguf", "--imatrix", "{eio}"], "cannot read imatrix file {eio}"),
    (["inspect", "{dir}"], "{dir} is a folder, not a GGUF file"),
    (["inspect", "{fifo}"], "{fifo} is not a regular file"),  # used to block forever
    (["imatrix", "{f16}", "-o", "{out}/i.gguf", "--calibration", "{fifo}"],
     "calibration file {fifo} is not a regular file"),
    (["chat", "--schema", "{fifo}", "-p", "hi"], "schema file (--schema) {fifo} is not a regular file"),
    (["inspect", "{eio}"], "cannot read {eio}: input/output error"),
    (["quantize", "{eio}", "-o", "{out}/q.gguf"], "cannot read {eio}: input/output error"),
    (["rebuild", "{dir}", "{out}/rb"], "{dir} is a folder, not a GGUF file"),
    (["bench", "{dir}", "--quick", "--out", "{out}/b"], "{dir} is a folder, not a GGUF file"),
    (["recommend", "{missing}", "--max-ram", "1GB"], "{missing} does not exist"),
    (["summarize", "{dir}"], "{dir} is a folder"),
    (["chat", "--schema", "{dir}", "-p", "hi"], "schema file (--schema) {dir} is a folder"),
    (["chat", "--schema", "{missing}", "-p", "hi"], "schema file (--schema) {missing} does not exist"),
    (["chat", "--mmproj", "{dir}", "--image", "x.png", "-p", "hi"], "vision tower (--mmproj) {dir} is a folder"),
    (["index", "add", "docs", "{missing}"], "{missing} does not exist"),
    (["index", "add", "docs", "{f16}", "--embed-model", "{dir}"], "embedding model (--embed-model) {dir} is a folder"),
    # outputs
    (["convert", "{ckpt}", "-o", "{dir}"], "{dir} is a folder; give a file name"),
    (["convert", "{ckpt}", "-o", "{exists}"], "{exists} already exists; pass --force"),
    (["convert", "{copy}", "-o", "{copy}/config.json", "--force"], "is a file of the checkpoint being converted"),
    (["convert", "{ckpt}", "--type", "Q8_0", "-o", "{exists}"], "{exists} already exists; pass --force"),
    (["quantize", "{f16}", "--type", "Q8_0", "-o", "{exists}"], "{exists} already exists; pass --force"),
    (["imatrix", "{f16}", "-o", "{exists}"], "{exists} already exists; pass --force"),
    (["imatrix", "{f16}", "-o", "{dir}"], "{dir} is a folder; give a file name"),
    (["imatrix", "{f16copy}", "-o", "{f16copy}", "--force"], "output {f16copy} is the model itself"),
    (["quantize", "{f16copy}", "-o", "{f16copy}", "--force"], "output {f16copy} is the input file"),
    (["rebuild", "{f16}", "{exists}"], "{exists} is a file; give a folder"),
    (["rebuild", "{f16}", "{full}"], "{full} already exists and is not empty; pass --force"),
    (["bench", "{f16}", "--quick", "--out", "{exists}"], "--out {exists} is a file; give a folder"),
    (["bench", "{f16}", "--quick", "--out", "{full}"], "--out {full} already exists and holds other files"),
]


def _unblock_readers_later(fifo: Path, request, after: float = 10.0) -> None:
    """A reader that opens `fifo` blocks until a writer comes: come after `after` s, so a command that
    (wrongly) reads the pipe gets EOF and fails its assertions instead of hanging the test run."""
    import errno
    import threading

    done = threading.Event()
    request.addfinalizer(done.set)

    def writer() -> None:
        if done.wait(after):
            return
        while not done.is_set():
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError as e:
                if e.errno not in (errno.ENXIO, errno.ENOENT):
                    return
            done.wait(0.05)

    threading.Thread(target=writer, daemon=True).start()


@pytest.mark.parametrize("args,says", PATH_CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in PATH_CASES])
def test_path_mistakes_are_one_line(args, says, tmp_path, tiny_checkpoint, tiny_f16, request):
    from click.testing import CliRunner

    from edge_qwen.cli import main

    if "{eio}" in " ".join(args) and not Path(EIO_FILE).exists():
        pytest.skip("needs Linux's /proc (a file whose read fails: EIO)")
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("keep")
    (tmp_path / "exists.gguf").write_bytes(b"keep me")
    (tmp_path / "archive.zip").write_bytes(b"PK\x03\x04" + bytes(64))  # valid UTF-8, but not text
    if "{copy}" in " ".join(args):  # cases that would damage their input: on a copy
        shutil.copytree(tiny_checkpoint, tmp_path / "copy")
    if "{fifo}" in " ".join(args):
        os.mkfifo(tmp_path / "pipe")
        _unblock_readers_later(tmp_path / "pipe", request)
    if "{f16copy}" in " ".join(args):
        shutil.copy(tiny_f16, tmp_path / "copy.gguf")
    names = {"fifo": tmp_path / "pipe", "zip": tmp_path / "archive.zip", "copy": tmp_path / "copy", "f16copy": tmp_path / "copy.gguf", "dir": tmp_path / "a-folder", "missing": tmp_path / "nope.txt", "eio": EIO_FILE, "f16": tiny_f16,
             "ckpt": tiny_checkpoint, "exists": tmp_path / "exists.gguf", "out": tmp_path / "out",
             "full": tmp_path / "full"}

    def files() -> list[str]:  # what is on disk, but the store (a lookup may make its folders)
        return sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")
                      if p.relative_to(tmp_path).parts[0] != "home")

    before = files()
    r = CliRunner().invoke(main, [a.format(**names) for a in args], env={"EDGE_QWEN_HOME": str(tmp_path / "home")})
    assert r.exit_code == 1, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception  # no traceback
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    assert says.format(**names) in lines[0], lines[0]
    assert files() == before  # nothing written, nothing removed
    assert (tmp_path / "exists.gguf").read_bytes() == b"keep me"


@pytest.mark.parametrize("results,says", [
    ({"rows": []}, "has no measured types"), ({"rows": [1]}, "has no measured types"),
    ({"rows": {"Q8_0": 1}}, "has no measured types"),
    ({"rows": [{"type": "Q8_0", "shape": {}}]}, "holds damaged results (KeyError"),
])
def test_recommend_on_damaged_results_is_one_line(results, says, tmp_path):
    from click.testing import CliRunner

    from edge_qwen.cli import main

    (tmp_path / "results.json").write_text(json.dumps(results))
    r = CliRunner().invoke(main, ["recommend", str(tmp_path), "--max-ram", "1GB"])
    assert r.exit_code == 1, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception  # no traceback
    assert r.output.startswith("Error: ") and len(r.output.strip().splitlines()) == 1, r.output
    assert says in r.output, r.output
