"""The environment fingerprint of one rank: what it runs on and with, sent once with the run's
registration so the collector can show which ranks differ (a node with another driver, a rank with
determinism off, a dirty checkout on one host).

Cheap and side-effect free, because it runs inside ``init()`` on the training thread:

- torch is never imported here; it is read only when the training script has imported it already,
  and the same holds for the other frameworks (their versions come from ``sys.modules``).
- CUDA is never initialized: device names are read only once ``torch.cuda.is_initialized()``.
  Initializing it here would make fork-started DataLoader workers unable to use CUDA. The run
  fingerprints again at ``watch()`` when CUDA came up in between (see ``devices_pending``).
- git gets ``GIT_BUDGET`` seconds in all, with its output captured: nothing reaches the terminal.
- Each part is guarded: a part that fails is None, and ``fingerprint`` itself never raises.

Every value is JSON: str, int, float, bool, None, lists and dicts of them.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from ..__about__ import __version__

log = logging.getLogger("optiscope")

#: Seconds that all git commands together may take (a huge checkout's status is not worth more).
GIT_BUDGET = 2.0
#: Frameworks whose versions are reported when the training script has imported them.
FRAMEWORKS = ("torch", "lightning", "pytorch_lightning", "transformers", "accelerate", "deepspeed", "keras", "jax")
_TORCH_KEYS = ("torch", "cuda", "cudnn", "hip", "device_count", "devices", "num_threads", "determinism")
_DRIVER_RE = re.compile(r"NVRM version:.*?\s(\d+\.\d+(?:\.\d+)*)\s")


def fingerprint(earlier: dict[str, Any] | None = None) -> dict[str, Any]:
    """This process's environment; see the module docstring. Never raises. ``earlier``: a
    fingerprint taken before in this process, whose git part is reused (it cannot have changed
    meanwhile, and running git again would cost up to GIT_BUDGET on the caller's thread)."""
    # Each part is looked up when called, not bound at import: a test can break one of them.
    env: dict[str, Any] = {
        "python": _guard("python", platform.python_version),
        "implementation": _guard("implementation", platform.python_implementation),
        "platform": _guard("platform", platform.platform),
        "cpu": _guard("cpu", _cpu),
        "cpu_count": _guard("cpu_count", os.cpu_count),
        "packages": _guard("packages", _packages),
        "driver": _guard("driver", _driver),
        "git": earlier["git"] if earlier and "git" in earlier else _guard("git", _git),
        "seeds": _guard("seeds", _seeds),
    }
    env.update(_guard("torch", _torch_parts) or dict.fromkeys(_TORCH_KEYS))
    return env


def devices_pending(env: dict | None) -> bool:
    """True when ``env`` was taken before CUDA came up and CUDA is up now: the device names (and
    the device count) are worth a new fingerprint."""
    try:
        return env is not None and bool(env) and env.get("devices") is None and cuda_initialized()
    except Exception:
        return False


def cuda_initialized() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and bool(torch.cuda.is_initialized())


# -- the parts -----------------------------------------------------------------------------------
def _guard(key: str, part: Callable[[], Any]) -> Any:
    try:
        return part()
    except Exception:  # a fingerprint part is never worth an error: it is missing, that is all
        log.debug("optiscope: environment part %r failed", key, exc_info=True)
        return None


def _packages() -> dict[str, str | None]:
    out: dict[str, str | None] = {"optiscope": __version__}
    try:
        import numpy  # a dependency of the SDK core: cheap to import, and torch has imported it anyway

        out["numpy"] = str(numpy.__version__)
    except Exception:
        out["numpy"] = None
    for name in FRAMEWORKS:
        module = sys.modules.get(name)
        if module is not None:  # only what the script imported: never import a framework here
            version = getattr(module, "__version__", None)
            out[name] = None if version is None else str(version)
    return out


def _cpu() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _driver(path: str = "/proc/driver/nvidia/version") -> str | None:
    """The NVIDIA kernel driver's version, from the file the driver itself exposes (Linux): no
    library is loaded and no CUDA context is made."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            m = _DRIVER_RE.search(f.read())
    except OSError:
        return None
    return m.group(1) if m else None


def _git() -> dict[str, Any] | None:
    """HEAD's commit, the branch, and whether tracked files differ from it, in the working
    directory's checkout; None outside a checkout or without git."""
    deadline = time.monotonic() + GIT_BUDGET
    commit = _run_git(["rev-parse", "HEAD"], deadline)
    if not commit:
        return None
    branch = _run_git(["rev-parse", "--abbrev-ref", "HEAD"], deadline)
    status = _run_git(["status", "--porcelain", "--untracked-files=no"], deadline, strip=False)
    return {
        "commit": commit,
        "branch": branch if branch and branch != "HEAD" else None,
        "dirty": None if status is None else bool(status.strip()),
    }


def _run_git(args: list[str], deadline: float, strip: bool = True) -> str | None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return None
    # GIT_OPTIONAL_LOCKS=0: status must not take the index lock a user's own git command may want.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
    try:
        p = subprocess.run(
            ["git", *args], stdin=subprocess.DEVNULL, capture_output=True, timeout=remaining, env=env, check=False
        )
    except (OSError, subprocess.SubprocessError):  # no git on PATH, or it ran past the budget
        return None
    if p.returncode != 0:
        return None
    out = p.stdout.decode("utf-8", errors="replace")
    return out.strip() if strip else out


def _seeds() -> dict[str, Any]:
    # numpy's legacy global seed cannot be read back from its state, so it is not reported.
    out: dict[str, Any] = {"PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED")}
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch"] = int(torch.initial_seed())
    return out


def _torch_parts() -> dict[str, Any]:
    """What torch says, when the script imported it; the same keys, all None, when it did not."""
    torch = sys.modules.get("torch")
    if torch is None:
        return dict.fromkeys(_TORCH_KEYS)
    out: dict[str, Any] = {
        "torch": str(torch.__version__),
        "cuda": _guard("cuda", lambda: torch.version.cuda),
        "hip": _guard("hip", lambda: getattr(torch.version, "hip", None)),
        # cuDNN's version is read from the library torch links; it makes no CUDA context.
        "cudnn": _guard("cudnn", torch.backends.cudnn.version),
        "num_threads": _guard("num_threads", torch.get_num_threads),
        "determinism": _guard("determinism", lambda: _determinism(torch)),
    }
    out.update(_guard("devices", lambda: _devices(torch)) or {"device_count": None, "devices": None})
    return out


def _devices(torch) -> dict[str, Any]:
    """Device names once CUDA is up; before that None (unknown), since asking would bring it up."""
    if not torch.cuda.is_initialized():
        if not _cuda_built(torch):  # a CPU-only build: no devices to wait for, the list is known now
            return {"device_count": 0, "devices": []}
        # Not device_count() either: it falls back to the CUDA runtime when NVML cannot answer,
        # and that poisons fork just the same.
        return {"device_count": None, "devices": None}
    n = int(torch.cuda.device_count())
    return {"device_count": n, "devices": [str(torch.cuda.get_device_name(i)) for i in range(n)]}


def _cuda_built(torch) -> bool:
    return bool(torch.version.cuda or getattr(torch.version, "hip", None))


def _determinism(torch) -> dict[str, Any]:
    cudnn = torch.backends.cudnn
    return {
        "algorithms": bool(torch.are_deterministic_algorithms_enabled()),
        "warn_only": bool(torch.is_deterministic_algorithms_warn_only_enabled()),
        "cudnn_deterministic": bool(cudnn.deterministic),
        "cudnn_benchmark": bool(cudnn.benchmark),
        "float32_matmul_precision": str(torch.get_float32_matmul_precision()),
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }
