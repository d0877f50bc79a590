"""The fused CPU scan (C++ extension ``csrc/ivf_scan.cpp``): probed clusters -> per-query top-k.

Compiled at first use with ``torch.utils.cpp_extension.load`` (``-O3 -march=native``, or the target
named by ``SILVERTORCH_EXT_ARCH``, and ``-fopenmp`` when the compiler has it; needs a C++ compiler
and ``ninja``), cached per user in ``$SILVERTORCH_EXT_DIR`` (default ``~/.cache/silvertorch/ext``)
under a name that includes the torch version, the target, the CPU's flags and a hash of the source,
so a cache shared between different machines never runs code built for another CPU. The first build
takes ~30-60 s; later processes load the cached library.

When the extension cannot be built (no compiler, no ninja) or ``SILVERTORCH_NO_EXT=1`` is set,
:func:`available` is False and :func:`scan_ext` falls back to the torch path (``scan_fast`` plus a
selection), with a one-time warning. Nothing here raises because of a missing toolchain.

Kernel (see the .cpp header): (query, probe) pairs grouped by cluster, so each probed cluster is read
once for all its queries (every query's nearest cluster first, to set thresholds early); clusters are
pulled dynamically by ``torch.get_num_threads()`` workers of torch's OpenMP pool; 64-slot words whose
live & eligibility bits are all zero are skipped; 16-slot blocks are scored with AVX-512 VNNI (int8,
int32 accumulation) or AVX-512F FMA (f32 / bf16 / fp16 widened to f32 in registers), portable loops
when the compiler targets neither; each query keeps a running top-k of (score, slot) keys (a 2k+64
buffer compacted with ``nth_element``; the k-th best is the rejection threshold), so any k works
without a second selection pass and results do not depend on the thread count (ties -> smaller slot).

Scores equal :func:`silvertorch.index.scan.scan_reference`: int8 bitwise
(``float((double(acc) * qscale) * scale)``); float storage up to f32 summation order.
"""

from __future__ import annotations

import hashlib
import os
import platform
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

__all__ = ["available", "load_extension", "scan_ext", "simd_level", "supports", "unavailable_reason"]

_SRC = Path(__file__).with_name("csrc") / "ivf_scan.cpp"
_STATE: dict[str, object] = {}


def _cpu_tag() -> str:
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags += line
                    break
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def _build_dir(suffix: str) -> Path:
    root = os.environ.get("SILVERTORCH_EXT_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "silvertorch", "ext"
    )
    src_hash = hashlib.sha1(_SRC.read_bytes()).hexdigest()[:8]
    tv = torch.__version__.replace("+", "_").replace(".", "_")
    return Path(root) / f"ivf_scan_{suffix}_{tv}_{_arch()}_{_cpu_tag()}_{src_hash}"


def _arch() -> str:
    """``-march`` target: ``native`` unless ``SILVERTORCH_EXT_ARCH`` names another (e.g. x86-64-v2)."""
    arch = os.environ.get("SILVERTORCH_EXT_ARCH", "native")
    return arch if arch.replace("-", "").replace("_", "").isalnum() else "native"


def load_extension(verbose: bool = False) -> ModuleType | None:
    """The compiled module, building it on first use; ``None`` (with one warning) if unavailable."""
    if "mod" in _STATE:
        return _STATE["mod"]  # type: ignore[return-value]
    mod = None
    if os.environ.get("SILVERTORCH_NO_EXT", "") not in ("", "0"):
        _STATE["why"] = "disabled by SILVERTORCH_NO_EXT"
    else:
        try:
            from torch.utils.cpp_extension import load

            base = ["-O3", f"-march={_arch()}", "-std=c++17"]
            # with OpenMP first (torch's pool); a compiler without it gets the std::thread build
            for suffix, cflags, ldflags in (("omp", base + ["-fopenmp"], ["-fopenmp"]), ("thr", base, [])):
                build = _build_dir(suffix)
                build.mkdir(parents=True, exist_ok=True)
                try:
                    mod = load(
                        name=f"silvertorch_ivf_scan_{suffix}",
                        sources=[str(_SRC)],
                        extra_cflags=cflags,
                        extra_ldflags=ldflags,
                        build_directory=str(build),
                        verbose=verbose,
                    )
                    break
                except Exception as e:  # no compiler, no ninja, a compile error: try the next / torch
                    msg = str(e).strip()
                    _STATE["why"] = f"{type(e).__name__}: {msg.splitlines()[-1] if msg else ''}"
        except Exception as e:  # torch.utils.cpp_extension itself unusable
            _STATE["why"] = f"{type(e).__name__}: {e}"
            mod = None
    if mod is not None:
        _STATE.pop("why", None)
    else:
        warnings.warn(
            f"silvertorch: fused CPU scan extension unavailable ({_STATE['why']}); "
            "using the torch scan path", RuntimeWarning, stacklevel=2,
        )
    _STATE["mod"] = mod
    return mod


def available() -> bool:
    """Whether the extension is built (builds it on the first call)."""
    return load_extension() is not None


def unavailable_reason() -> str:
    """Why :func:`available` is False (empty when it is True)."""
    load_extension()
    return str(_STATE.get("why", ""))


def simd_level() -> str:
    """The SIMD path compiled in (``"avx512-vnni"``, ``"avx512 (int8 portable)"``, ``"portable"``)."""
    mod = load_extension()
    return mod.simd_level() if mod is not None else "unavailable"


def supports(vectors: Tensor, cluster_offsets: Tensor) -> bool:
    """Inputs the kernel takes: CPU tensors, int8/f32/bf16/fp16 storage, 64-aligned slot layout."""
    return (
        vectors.device.type == "cpu"
        and vectors.dtype in (torch.int8, torch.float32, torch.bfloat16, torch.float16)
        and vectors.dim() == 2
        and vectors.shape[0] % 64 == 0
        and vectors.shape[1] >= 1
        and bool((cluster_offsets % 64 == 0).all())
    )


def scan_ext(
    vectors: Tensor,
    scales: Tensor,
    cluster_offsets: Tensor,
    live_words: Tensor,
    q: Tensor,
    qscale: Tensor,
    probes: Tensor,
    k: Tensor | int,
    pair_words: Tensor | None = None,
    num_threads: int | None = None,
    arena_budget: int = 512 << 20,
) -> tuple[Tensor, Tensor]:
    """Best ``k[b]`` candidates of every query's probed clusters, fused scan + selection.

    Args:
        vectors: ``(S, d)`` int8 / f32 / bf16 / fp16 slot-ordered storage (``S % 64 == 0``).
        scales: ``(S,) f32`` per-slot scales; ``cluster_offsets (C+1,) int64`` 64-aligned;
            ``live_words (S/64,) int64``.
        q: ``(B, d)`` int8 queries for int8 storage, else float (bf16 queries are widened to f32).
        qscale: ``(B,) f32``; ``probes (B, P) int64`` (negative = no probe).
        k: int or ``(B,) int64`` per-row k (each >= 1).
        pair_words: optional ``(B, P, Wc) int64`` eligibility words per probed cluster.
        num_threads: default ``torch.get_num_threads()``.
        arena_budget: bytes for the batch's per-query top-k buffers (``B * (2k + 80) * 8``); above
            it the kernel runs query-major with one buffer per worker (for very large ``B * k``).
    Returns:
        ``scores (B, kmax) f32`` sorted descending and ``slots (B, kmax) int64``, row ``b`` holding
        its best ``min(k[b], candidates)``, padded with ``-inf`` / ``-1``.
    """
    B = q.shape[0]
    k_rows = torch.full((B,), int(k), dtype=torch.int64) if isinstance(k, int) else k.to(torch.int64).cpu()
    mod = load_extension()
    if mod is None or not supports(vectors, cluster_offsets):
        return _torch_fallback(vectors, scales, cluster_offsets, live_words, q, qscale, probes, k_rows, pair_words)
    int8 = vectors.dtype == torch.int8
    qq = q.contiguous() if int8 else q.float().contiguous()
    pw = pair_words.contiguous() if pair_words is not None else torch.empty(0, dtype=torch.int64)
    nt = torch.get_num_threads() if num_threads is None else int(num_threads)
    s, i = mod.ivf_scan_topk(
        vectors.contiguous(), scales.float().contiguous(), cluster_offsets.contiguous(),
        live_words.contiguous(), qq, qscale.float().contiguous(), probes.contiguous(),
        pw, k_rows.contiguous(), nt, int(arena_budget),
    )
    return s, i


def _torch_fallback(vectors: Tensor, scales: Tensor, cluster_offsets: Tensor, live_words: Tensor,
                    q: Tensor, qscale: Tensor, probes: Tensor, k_rows: Tensor,
                    pair_words: Tensor | None) -> tuple[Tensor, Tensor]:
    from .scan import scan_fast
    from .topk import select_topk

    dev = vectors.device
    cs, cslot = scan_fast(vectors, scales, cluster_offsets, live_words, q, qscale, probes,
                          k_rows.to(dev), pair_words)
    return select_topk(cs, k_rows.to(dev), cslot)
