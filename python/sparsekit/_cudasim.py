"""CPU execution of the CUDA kernels under ``cuda/`` (tests only; no GPU needed).

Mirrors ``cupy.RawModule(code=..., options=..., name_expressions=...).get_function(name)(grid, block,
args, shared_mem=...)``: the same ``.cu`` source is compiled with g++ (C++20) against
``cuda/sim/cudasim.h``, which runs every CUDA thread as a fiber (see ``cuda/README.md``).

Arguments are checked against the kernel's real parameter types (deduced by the C++ compiler from the
kernel's function pointer): an ``np.int64`` for an ``int`` or a float64 tensor for ``float*`` raises
``TypeError`` instead of silently producing garbage, as it would on a GPU.

Importing this module needs no compiler; compiling does (``RuntimeError`` says so).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["RaceError", "SimFunction", "SimPointer", "SimRawModule", "race_check_env", "tsan_loaded"]

_VERSION = "1"  # bump to invalidate cached builds when the generated code changes
_SIM_DIR = Path(__file__).resolve().parent / "cuda" / "sim"
_HEADER = _SIM_DIR / "cudasim.h"
_SCHEDULES = {"forward": 0, "reverse": 1, "random": 2}
_MAX_SHARED = 228 * 1024
# CUDA headers the shim replaces (blanked so line numbers stay right).
_STRIPPED_INCLUDES = {
    "cuda_fp16.h", "cuda_bf16.h", "cuda_runtime.h", "cuda.h", "device_launch_parameters.h", "mma.h",
    "cuda_runtime_api.h", "assert.h", "cassert", "device_functions.h", "sm_30_intrinsics.h", "math_constants.h",
}  # fmt: skip


class SimPointer:
    """An explicit raw address for a pointer parameter (escape hatch; nothing is checked)."""

    __slots__ = ("addr",)

    def __init__(self, addr: int) -> None:
        self.addr = int(addr)

    def __repr__(self) -> str:
        return f"SimPointer(0x{self.addr:x})"


# ------------------------------------------------------------------------------------------------
# Compiler, cache
# ------------------------------------------------------------------------------------------------
def _compiler() -> str:
    cxx = os.environ.get("SPARSEKIT_SIM_CXX", "g++")
    path = shutil.which(cxx)
    if path is None:
        raise RuntimeError(
            f"sparsekit CPU CUDA shim: C++ compiler {cxx!r} not found; it needs g++ >= 12 with C++20 "
            "(e.g. `apt install g++`, or set SPARSEKIT_SIM_CXX)"
        )
    return path


@functools.lru_cache(maxsize=None)
def _compiler_version(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout


def _cache_dir() -> Path:
    env = os.environ.get("SPARSEKIT_SIM_CACHE")
    d = Path(env) if env else Path.home() / ".cache" / "sparsekit" / "cudasim"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _default_threads() -> int:
    env = os.environ.get("SPARSEKIT_SIM_THREADS")
    if env:
        return max(1, int(env))
    return max(1, min(os.cpu_count() or 1, 8))


# ------------------------------------------------------------------------------------------------
# Source preparation: inline quoted includes (so the rewrite below also reaches headers), blank the
# CUDA headers the shim provides, rewrite `extern __shared__ T name[];` (g++ rejects it).
# ------------------------------------------------------------------------------------------------
_INCLUDE_RE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]')
_LINE_RE = re.compile(r'^\s*#\s*line\s+(\d+)(?:\s+"([^"]*)")?')
_PRAGMA_ONCE_RE = re.compile(r"^\s*#\s*pragma\s+once\b")


def _inline_includes(text: str, fname: str, base: Path | None, dirs: list[Path], seen: set[str]) -> str:
    out: list[str] = []
    cur_file, cur_line = fname, 1
    for raw in text.splitlines():
        m = _LINE_RE.match(raw)
        if m:
            out.append(raw)
            cur_line = int(m.group(1))
            if m.group(2) is not None:
                cur_file = m.group(2)
            continue
        if _PRAGMA_ONCE_RE.match(raw):
            out.append("")
            cur_line += 1
            continue
        m = _INCLUDE_RE.match(raw)
        if m:
            kind, name = m.groups()
            if Path(name).name in _STRIPPED_INCLUDES or name in _STRIPPED_INCLUDES:
                out.append("")
                cur_line += 1
                continue
            if kind == '"':
                cands = ([base] if base is not None else []) + dirs
                found = next((d / name for d in cands if (d / name).is_file()), None)
                if found is None:
                    raise RuntimeError(f"{cur_file}:{cur_line}: cannot find include \"{name}\" (searched: {cands})")
                key = str(found.resolve())
                if key not in seen:
                    body = found.read_text()
                    if re.search(r"^\s*#\s*pragma\s+once\b", body, re.M):
                        seen.add(key)
                    out.append(f'#line 1 "{found.name}"')
                    out.append(_inline_includes(body, found.name, found.parent, dirs, seen))
                out.append(f'#line {cur_line + 1} "{cur_file}"')
                cur_line += 1
                continue
        out.append(raw)
        cur_line += 1
    return "\n".join(out)


def _strip_comments(src: str) -> str:
    """Comments and string literals replaced by spaces (same length, newlines kept)."""

    def blank(m: re.Match[str]) -> str:
        s = m.group(0)
        if s.startswith('"') or s.startswith("'"):
            return s[0] + re.sub(r"[^\n]", " ", s[1:-1]) + s[-1]
        return re.sub(r"[^\n]", " ", s)

    return re.sub(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', blank, src, flags=re.S)


_EXTERN_SHARED_RE = re.compile(r"\bextern\s+__shared__\s+([^;\[\]]*?)\s*\b(\w+)\s*\[\s*\]\s*;")


def _rewrite_extern_shared(src: str) -> str:
    clean = _strip_comments(src)
    pieces: list[str] = []
    last = 0
    for m in _EXTERN_SHARED_RE.finditer(clean):
        ty = re.sub(r"__align__\s*\(\s*\w+\s*\)|alignas\s*\(\s*\w+\s*\)", " ", m.group(1))
        ty = " ".join(ty.split())
        name = m.group(2)
        depth = clean.count("{", 0, m.start()) - clean.count("}", 0, m.start())
        newlines = "\n" * src.count("\n", m.start(), m.end())  # keep line numbers
        if depth > 0:  # function scope: a plain pointer into the block's dynamic shared buffer
            rep = f"{ty}* {name} = CUDASIM_DYN_SMEM({ty});{newlines}"
        else:  # namespace scope: a macro (a global pointer would be initialised outside any block)
            rep = f"\n#undef {name}\n#define {name} CUDASIM_DYN_SMEM({ty})\n{newlines}"
        pieces.append(src[last : m.start()])
        pieces.append(rep)
        last = m.end()
    pieces.append(src[last:])
    return "".join(pieces)


def _find_kernels(src: str) -> dict[str, bool]:
    """Non-template __global__ functions -> whether they have extern "C" linkage."""
    clean = _strip_comments(src)
    # spans of `extern "C" { ... }` blocks (string contents are blanked, so match on the quotes)
    blocks: list[tuple[int, int]] = []
    for m in re.finditer(r'\bextern\s+"\s"\s*\{', clean):
        depth, i = 1, m.end()
        while i < len(clean) and depth:
            depth += {"{": 1, "}": -1}.get(clean[i], 0)
            i += 1
        blocks.append((m.start(), i))
    kernels: dict[str, bool] = {}
    for m in re.finditer(r"\b__global__\b", clean):
        paren = clean.find("(", m.end())
        # skip over __launch_bounds__(...) etc.
        head_end = paren
        while True:
            head = clean[m.end() : head_end]
            if re.search(r"__launch_bounds__\s*$", head) or re.search(r"__align__\s*$", head):
                close = clean.find(")", head_end)
                head_end = clean.find("(", close)
                continue
            break
        head = clean[m.end() : head_end]
        names = re.findall(r"\b([A-Za-z_]\w*)\s*$", head)
        if not names:
            continue
        name = names[0]
        start = max(clean.rfind(";", 0, m.start()), clean.rfind("}", 0, m.start()), clean.rfind("{", 0, m.start()))
        prefix = clean[start + 1 : m.start()]
        if re.search(r"\btemplate\b", prefix) or re.search(r"\btemplate\b", head):
            continue
        is_c = bool(re.search(r'\bextern\s+"\s"', prefix)) or any(a <= m.start() < b for a, b in blocks)
        kernels[name] = kernels.get(name, False) or is_c
    return kernels


def _parse_options(options: tuple[str, ...]) -> tuple[list[str], list[Path]]:
    defines: list[str] = []
    incs: list[Path] = []
    it = iter(options)
    for opt in it:
        if opt in ("-I", "--include-path", "-D", "--define-macro"):
            val = next(it, "")
            (incs.append(Path(val)) if opt in ("-I", "--include-path") else defines.append(val))
        elif opt.startswith("-I"):
            incs.append(Path(opt[2:]))
        elif opt.startswith("--include-path="):
            incs.append(Path(opt.split("=", 1)[1]))
        elif opt.startswith("-D"):
            defines.append(opt[2:])
        elif opt.startswith("--define-macro="):
            defines.append(opt.split("=", 1)[1])
        # everything else (-std, -arch, --use_fast_math, -lineinfo, -Xptxas ...) is NVRTC-only
    return defines, incs


_build_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}


def _build(cpp: str, key: str, cxx: str, extra: list[str]) -> ctypes.CDLL:
    with _build_lock:
        if key in _loaded:
            return _loaded[key]
        cache = _cache_dir()
        so = cache / f"{key}.so"
        if not so.exists():
            src = cache / f"{key}.cpp"
            fd, tmp_src = tempfile.mkstemp(suffix=".cpp", prefix=f"{key}-", dir=cache)
            with os.fdopen(fd, "w") as f:
                f.write(cpp)
            os.replace(tmp_src, src)
            fd, tmp_so = tempfile.mkstemp(suffix=".so", prefix=f"tmp-{key}-", dir=cache)
            os.close(fd)
            cmd = [cxx, "-std=c++20", "-O2", "-fPIC", "-shared", "-pthread", "-fno-strict-aliasing",
                   "-ffp-contract=off", "-fvisibility=hidden", "-Wno-attributes", *extra,
                   "-I", str(_SIM_DIR), str(src), "-o", tmp_so]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                os.unlink(tmp_so)
                raise RuntimeError(f"cudasim: g++ failed to compile the kernel source:\n{proc.stderr[-8000:]}")
            os.replace(tmp_so, so)  # atomic: a concurrent process sees either nothing or a whole .so
        lib = ctypes.CDLL(str(so))
        _loaded[key] = lib
        return lib


# ------------------------------------------------------------------------------------------------
# Race check: ThreadSanitizer over the fibers (cudasim.h, CUDASIM_RACE_CHECK). TSan's runtime must be
# in the process from its start (it cannot be dlopen'ed), hence LD_PRELOAD and race_check_env().
# ------------------------------------------------------------------------------------------------
# Reports go to a file ($TMPDIR/sparsekit-tsan-<pid>.log) read after each launch, which raises RaceError;
# exitcode=0 because a race the program caught as RaceError must not turn its exit status into TSan's 66.
TSAN_OPTIONS = "report_signal_unsafe=0 halt_on_error=0 exitcode=0 history_size=4 ignore_noninstrumented_modules=1"
_RACE_FLAGS = ["-DCUDASIM_RACE_CHECK", "-fsanitize=thread", "-g", "-O1"]


def tsan_loaded() -> bool:
    """Whether ThreadSanitizer's runtime is loaded in this process (needed by ``race_check=True``)."""
    return hasattr(ctypes.CDLL(None), "__tsan_create_fiber")


def race_check_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` (default ``os.environ``) for a Python process that can run race-checked launches:
    g++'s ThreadSanitizer runtime preloaded and ``TSAN_OPTIONS`` set.

    Example: ``subprocess.run([sys.executable, "-m", "pytest", ...], env=race_check_env())``."""
    out = dict(os.environ if env is None else env)
    cxx = _compiler()
    lib = subprocess.run([cxx, "-print-file-name=libtsan.so"], capture_output=True, text=True, check=False).stdout.strip()
    if not lib or not Path(lib).exists():
        raise RuntimeError(f"cudasim race check: {cxx} has no ThreadSanitizer runtime (libtsan.so); install it (Debian: libtsan2)")
    out["LD_PRELOAD"] = " ".join(x for x in (str(Path(lib).resolve()), out.get("LD_PRELOAD", "")) if x)
    out["TSAN_OPTIONS"] = " ".join(x for x in (TSAN_OPTIONS, out.get("TSAN_OPTIONS", "")) if x)
    return out


class _Reports:
    """TSan's report stream, redirected to a file that each race-checked launch reads from its offset."""

    lock = threading.Lock()
    _file: Any = None

    @classmethod
    def fd(cls) -> int:
        if cls._file is None:
            # Named and kept: if TSan itself aborts the process, its last words are there.
            path = Path(tempfile.gettempdir()) / f"sparsekit-tsan-{os.getpid()}.log"
            cls._file = open(path, "w+b")  # noqa: SIM115 (lives as long as the process)
            set_fd = getattr(ctypes.CDLL(None), "__sanitizer_set_report_fd")
            set_fd.argtypes = [ctypes.c_void_p]
            set_fd(cls._file.fileno())
        return int(cls._file.fileno())

    @staticmethod
    def read_from(fd: int, offset: int) -> str:
        size = os.fstat(fd).st_size
        return os.pread(fd, size - offset, offset).decode(errors="replace") if size > offset else ""


_UNSYMBOLIZED_RE = re.compile(r"\(([^()\s]+\.so)\+(0x[0-9a-f]+)\)")


def _addr2line(so: Path, offset: str) -> list[str]:
    """file:line of an address in ``so``, innermost inlined frame first (TSan's symbolizer misses modules
    that ctypes loads after its first report)."""
    tool = shutil.which("addr2line")
    if tool is None:
        return []
    r = subprocess.run([tool, "-i", "-e", str(so), offset], capture_output=True, text=True, check=False)
    return [ln.split(" (discriminator")[0] for ln in r.stdout.split() if ":" in ln and not ln.startswith("?")]


_ACCESS_RE = re.compile(r"^\s*(Previous )?((?:[Aa]tomic )?(?:[Rr]ead|[Ww]rite)) of size (\d+) at \S+ by (thread T\d+|main thread)")
_FRAME_RE = re.compile(r"^\s*#\d+ .*?(\S+:\d+)")
_THREAD_RE = re.compile(r"^\s*Thread (T\d+) '([^']*)'")


def describe_race(kernel: str, report: str, so: Path | None = None) -> str:
    """One line naming the kernel, the two accesses (source lines) and their CUDA threads, then the report.
    ``so``: the kernel module, to symbolize frames TSan left as ``<null>``."""
    lines = report.splitlines()
    names = {m.group(1): m.group(2) for m in map(_THREAD_RE.match, lines) if m}
    accesses = []
    for i, ln in enumerate(lines):
        m = _ACCESS_RE.match(ln)
        if not m:
            continue
        block = lines[i + 1 : next((j for j in range(i + 1, len(lines)) if not lines[j].strip()), len(lines))]
        frames = []
        for ln in block:
            f = _FRAME_RE.match(ln)
            u = _UNSYMBOLIZED_RE.search(ln) if "<null>" in ln else None
            if u and so is not None and Path(u.group(1)).name == so.name:
                frames += _addr2line(so, u.group(2))
            elif f:
                frames.append(f.group(1))
        # The kernel's own line (the first frame in a .cu/.cuh file), else the innermost frame.
        src = next((f for f in frames if re.search(r"\.cuh?:\d+$", f)), frames[0] if frames else "an unknown line")
        if re.search(r"\.cuh?:\d+$", src):
            src = Path(src).name  # the name the source's #line gives (the compiler prefixes its cwd)
        tid = m.group(4).split()[-1]
        accesses.append(f"{m.group(2).lower()} of {m.group(3)} bytes at {src} by {names.get(tid, m.group(4))}")
        if len(accesses) == 2:
            break
    where = next((ln.strip() for ln in lines if ln.strip().startswith("Location is")), "")
    head = f"data race in kernel {kernel}: " + "; previous ".join(accesses or ["(report not parsed)"])
    return head + (f" ({where.rstrip(':')})" if where else "") + "\n\nThreadSanitizer report:\n" + report[-6000:]


# ------------------------------------------------------------------------------------------------
# Argument checking
# ------------------------------------------------------------------------------------------------
_NP = {
    "b": np.bool_, "i8": np.int8, "u8": np.uint8, "i16": np.int16, "u16": np.uint16, "i32": np.int32,
    "u32": np.uint32, "i64": np.int64, "u64": np.uint64, "f16": np.float16, "f32": np.float32, "f64": np.float64,
}  # fmt: skip
_CT: dict[str, Any] = {
    "b": ctypes.c_bool, "i8": ctypes.c_int8, "u8": ctypes.c_uint8, "i16": ctypes.c_int16, "u16": ctypes.c_uint16,
    "i32": ctypes.c_int32, "u32": ctypes.c_uint32, "i64": ctypes.c_int64, "u64": ctypes.c_uint64,
    "f16": ctypes.c_uint16, "bf16": ctypes.c_uint16, "f32": ctypes.c_float, "f64": ctypes.c_double,
}  # fmt: skip
# element code -> dtype names accepted for a pointer to it (torch and numpy spell them the same)
_PTR_OK = {
    "b": {"bool", "uint8"}, "u8": {"uint8", "bool"}, "i8": {"int8"},
    "i16": {"int16", "uint16"}, "u16": {"uint16", "int16"},  # torch has little uint16 support: same bits
    "i32": {"int32"}, "u32": {"uint32"}, "i64": {"int64"}, "u64": {"uint64"},
    "f16": {"float16", "int16", "uint16"}, "bf16": {"bfloat16", "int16", "uint16"},
    "f32": {"float32"}, "f64": {"float64"},
}  # fmt: skip
_INT_RANGE = {
    "i8": (-(2**7), 2**7 - 1), "u8": (0, 2**8 - 1), "i16": (-(2**15), 2**15 - 1), "u16": (0, 2**16 - 1),
    "i32": (-(2**31), 2**31 - 1), "u32": (0, 2**32 - 1), "i64": (-(2**63), 2**63 - 1), "u64": (0, 2**64 - 1),
}  # fmt: skip
_FLOAT_MAX = {"f16": 65504.0, "bf16": 3.3895313892515355e38, "f32": 3.4028234663852886e38}


class _Param:
    __slots__ = ("code", "const", "kind", "name", "size")

    def __init__(self, line: str) -> None:
        kind, code, const, size, name = line.split(" ", 4)
        self.kind, self.code, self.const, self.size, self.name = kind, code, const == "1", int(size), name


def _dtype_name(x: Any) -> str:
    return str(x.dtype).replace("torch.", "")


def _is_torch_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _convert(i: int, n: int, p: _Param, v: Any, keep: list[Any], where: str) -> Any:
    """Check one argument against its parameter; return a ctypes object holding the value."""
    what = f"{where}: args[{i}] (parameter {i + 1} of {n}, type '{p.name}')"
    if p.kind == "p":
        if isinstance(v, SimPointer):
            return ctypes.c_void_p(v.addr)
        elem = p.code.split("x")[0] if p.code not in ("x", "void") else p.code
        ok = _PTR_OK.get(elem)
        if _is_torch_tensor(v):
            if v.device.type != "cpu":
                raise TypeError(f"{what}: got a {v.device.type} tensor; the CPU shim needs CPU tensors")
            if not v.is_contiguous():
                raise ValueError(f"{what}: tensor is not contiguous")
            addr = v.data_ptr()
        elif isinstance(v, np.ndarray):
            if not v.flags.c_contiguous:
                raise ValueError(f"{what}: array is not C-contiguous")
            if not p.const and not v.flags.writeable:
                raise ValueError(f"{what}: array is read-only but the parameter is not const")
            addr = v.ctypes.data
        else:
            raise TypeError(
                f"{what}: expected a CPU torch tensor or numpy array (or SimPointer), got {type(v).__name__}"
            )
        if p.code != "void":
            if ok is None:
                raise TypeError(f"{what}: pointer to this type can only be passed as SimPointer(addr)")
            if _dtype_name(v) not in ok:
                raise TypeError(f"{what}: expected element dtype {' or '.join(sorted(ok))}, got {_dtype_name(v)}")
        keep.append(v)
        return ctypes.c_void_p(addr)
    if p.kind == "x":  # struct or vector type by value: raw bytes of the right size
        if isinstance(v, (bytes, bytearray)) or isinstance(v, ctypes.Structure | ctypes.Array):
            b = bytes(v)
            if len(b) != p.size:
                raise TypeError(f"{what}: expected {p.size} bytes, got {len(b)}")
            buf = ctypes.create_string_buffer(b, max(p.size, 1))
            return buf
        raise TypeError(f"{what}: pass a by-value struct as bytes or a ctypes object of {p.size} bytes")
    code = p.code
    if isinstance(v, np.generic):
        want = _NP.get(code)
        if want is None or v.dtype != np.dtype(want):
            exp = f"numpy.{np.dtype(want).name}" if want is not None else "a Python number"
            raise TypeError(f"{what}: expected {exp} or a Python {'float' if code[0] in 'fb' else 'int'}, got numpy.{v.dtype}")
        val: Any = v.item()
    elif _is_torch_tensor(v) or isinstance(v, np.ndarray):
        raise TypeError(f"{what}: expected a scalar, got an array/tensor")
    else:
        val = v
    if code == "b":
        if not isinstance(val, (bool, np.bool_)):
            raise TypeError(f"{what}: expected bool, got {type(v).__name__}")
        return ctypes.c_bool(bool(val))
    if code in _INT_RANGE:
        if isinstance(val, bool) or not isinstance(val, int):
            raise TypeError(f"{what}: expected an int, got {type(v).__name__}")
        lo, hi = _INT_RANGE[code]
        if not lo <= val <= hi:
            raise TypeError(f"{what}: value {val} does not fit in {p.name} [{lo}, {hi}]")
        return _CT[code](val)
    if code in ("f16", "bf16", "f32", "f64"):
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            raise TypeError(f"{what}: expected a float, got {type(v).__name__}")
        fv = float(val)
        lim = _FLOAT_MAX.get(code)
        if lim is not None and np.isfinite(fv) and abs(fv) > lim:
            raise TypeError(f"{what}: value {fv} overflows {p.name}")
        if code == "f16":
            return ctypes.c_uint16(int(np.array(fv, dtype=np.float16).view(np.uint16)))
        if code == "bf16":
            u = int(np.array(fv, dtype=np.float32).view(np.uint32))
            if np.isnan(fv):
                bits = (u >> 16) | 0x40
            else:
                bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
            return ctypes.c_uint16(bits)
        return _CT[code](fv)
    raise TypeError(f"{what}: unsupported parameter type")


def _dims(x: Any, what: str) -> tuple[int, int, int]:
    t = (x,) if isinstance(x, (int, np.integer)) else tuple(x)
    if not 1 <= len(t) <= 3 or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in t):
        raise ValueError(f"{what} must be an int or a tuple of 1-3 ints, got {x!r}")
    t3 = tuple(int(d) for d in t) + (1,) * (3 - len(t))
    if any(d <= 0 for d in t3):
        raise ValueError(f"{what} dimensions must be > 0, got {x!r}")
    return t3  # type: ignore[return-value]


class SimFunction:
    """One kernel of a :class:`SimRawModule`; call it like a ``cupy.RawKernel``."""

    def __init__(self, module: SimRawModule, name: str, index: int, lib: ctypes.CDLL) -> None:
        self._module = module
        self.name = name
        self._launch = getattr(lib, f"cudasim_launch_{index}")
        self._launch.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_longlong),
                                 ctypes.c_char_p, ctypes.c_int]  # fmt: skip
        self._launch.restype = ctypes.c_int
        sig = getattr(lib, f"cudasim_signature_{index}")
        sig.restype = ctypes.c_char_p
        self.params = [_Param(ln) for ln in sig().decode().splitlines() if ln]

    @property
    def signature(self) -> str:
        return f"{self.name}({', '.join(p.name for p in self.params)})"

    def __call__(self, grid: Any, block: Any, args: Any, shared_mem: int = 0) -> None:
        g = _dims(grid, "grid")
        b = _dims(block, "block")
        if b[0] * b[1] * b[2] > 1024 or b[0] > 1024 or b[1] > 1024 or b[2] > 64:
            raise ValueError(f"block {block!r}: at most 1024 threads (x, y <= 1024, z <= 64)")
        if g[0] >= 2**31 or g[1] > 65535 or g[2] > 65535:
            raise ValueError(f"grid {grid!r} exceeds CUDA limits (2^31-1, 65535, 65535)")
        if not isinstance(shared_mem, (int, np.integer)) or not 0 <= shared_mem <= _MAX_SHARED:
            raise ValueError(f"shared_mem must be an int in [0, {_MAX_SHARED}] bytes, got {shared_mem!r}")
        if not isinstance(args, (tuple, list)):
            raise TypeError(f"args must be a tuple of kernel arguments, got {type(args).__name__}")
        n = len(self.params)
        if len(args) != n:
            raise TypeError(f"kernel {self.signature} takes {n} arguments, got {len(args)}")
        keep: list[Any] = []
        cvals = [_convert(i, n, p, a, keep, f"kernel {self.name}") for i, (p, a) in enumerate(zip(self.params, args))]
        argv = (ctypes.c_void_p * max(n, 1))(*[ctypes.addressof(c) for c in cvals])
        m = self._module
        cfg = (ctypes.c_longlong * 10)(*g, *b, int(shared_mem), _SCHEDULES[m.schedule], m.seed & (2**63 - 1), m.threads)
        err = ctypes.create_string_buffer(2048)
        if m.race_check:
            with _Reports.lock:  # one race-checked launch at a time, so each report belongs to its launch
                fd = _Reports.fd()
                start = os.fstat(fd).st_size
                rc = self._launch(argv, cfg, err, len(err))
                report = _Reports.read_from(fd, start)
            if "ThreadSanitizer" in report:
                raise RaceError(describe_race(self.name, report, m.so_path))
        else:
            rc = self._launch(argv, cfg, err, len(err))  # ctypes releases the GIL during the call
        if rc != 0:
            raise RuntimeError(err.value.decode(errors="replace") or f"cudasim: kernel {self.name} failed")


class RaceError(RuntimeError):
    """A data race found by the shim's race-check mode (names the kernel, the two source lines, the threads)."""


class SimRawModule:
    """CPU stand-in for ``cupy.RawModule``; see the module docstring."""

    def __init__(
        self,
        code: str,
        options: tuple[str, ...] = (),
        name_expressions: tuple[str, ...] = (),
        *,
        schedule: str = "forward",
        seed: int = 0,
        threads: int | None = None,
        include_dirs: tuple[str, ...] = (),
        race_check: bool = False,
    ) -> None:
        self.race_check = bool(race_check) or os.environ.get("SPARSEKIT_SIM_RACE_CHECK") == "1"
        if self.race_check and not tsan_loaded():
            raise RuntimeError(
                "cudasim race check needs ThreadSanitizer's runtime loaded when the process starts: run Python "
                "with the environment of sparsekit.testing.race_check_env(), i.e. LD_PRELOAD=$(g++ "
                f"-print-file-name=libtsan.so) TSAN_OPTIONS='{TSAN_OPTIONS}'"
            )
        if schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(_SCHEDULES)}, got {schedule!r}")
        self.schedule = schedule
        self.seed = int(seed)
        self.threads = int(threads) if threads is not None else _default_threads()
        if self.threads < 1:
            raise ValueError("threads must be >= 1")
        self.options = tuple(options)
        self.name_expressions = tuple(name_expressions)
        defines, incs = _parse_options(self.options)
        incs += [Path(d) for d in include_dirs]
        m = re.match(r'\s*#\s*line\s+\d+\s+"([^"]*)"', code)
        fname = m.group(1) if m else "kernel.cu"
        src = _inline_includes(code, fname, None, incs, set())
        src = _rewrite_extern_shared(src)
        self._kernels = _find_kernels(src)
        names = [k for k in self._kernels] + [e for e in self.name_expressions if e not in self._kernels]
        self._index = {nm: i for i, nm in enumerate(names)}
        stack_kb = os.environ.get("SPARSEKIT_SIM_STACK_KB")
        extra = [f"-D{d}" for d in defines]
        if stack_kb:
            extra.append(f"-DCUDASIM_STACK_SIZE={int(stack_kb) * 1024}")
        if self.race_check:
            extra += _RACE_FLAGS
        launchers = ['\n#line 1 "<cudasim launchers>"']
        for nm, i in self._index.items():
            launchers.append(
                f'extern "C" __attribute__((visibility("default"))) int cudasim_launch_{i}'
                f"(void** a, const long long* c, char* e, int n) {{ return ::cudasim::launch(&{nm}, a, c, e, n); }}\n"
                f'extern "C" __attribute__((visibility("default"))) const char* cudasim_signature_{i}()'
                f" {{ return ::cudasim::signature(&{nm}); }}"
            )
        cpp = '#include "cudasim.h"\n' + ("" if m else '#line 1 "kernel.cu"\n') + src + "\n".join(launchers) + "\n"
        cxx = _compiler()
        h = hashlib.sha256()
        for part in (_VERSION, cpp, "\0".join(extra), _HEADER.read_bytes().decode(), _compiler_version(cxx), cxx):
            h.update(part.encode())
            h.update(b"\0")
        key = h.hexdigest()[:32]
        self._lib = _build(cpp, key, cxx, extra)
        self.so_path = _cache_dir() / f"{key}.so"
        self._funcs: dict[str, SimFunction] = {}

    def get_function(self, name: str) -> SimFunction:
        f = self._funcs.get(name)
        if f is not None:
            return f
        if name not in self._index:
            raise KeyError(
                f"no kernel {name!r} in the module: extern \"C\" kernels {sorted(k for k, c in self._kernels.items() if c)}"
                f", name_expressions {list(self.name_expressions)}"
            )
        if name in self._kernels and not self._kernels[name] and name not in self.name_expressions:
            raise KeyError(
                f"kernel {name!r} has C++ linkage: cupy's get_function would not find it; declare it "
                f'extern "C" or pass it in name_expressions'
            )
        f = SimFunction(self, name, self._index[name], self._lib)
        self._funcs[name] = f
        return f
