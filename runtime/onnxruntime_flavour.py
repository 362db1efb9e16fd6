"""Check that exactly one ONNX Runtime build is installed, and that asked-for providers exist.

`onnxruntime` (CPU) and `onnxruntime-gpu` install the same `onnxruntime` module; with both present
one silently breaks the other. Jetson users install NVIDIA's build, which also calls itself
`onnxruntime-gpu`. ONNX Runtime falls back to the CPU silently when a GPU provider cannot load,
so sessions are checked with `get_providers()` after creation.
"""

from __future__ import annotations

from importlib import metadata

FLAVOURS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino")


class OnnxRuntimeSetupError(RuntimeError):
    """ONNX Runtime is missing, installed twice, or lacks a requested execution provider."""


def installed_flavours() -> list[str]:
    """Names of the ONNX Runtime distributions installed in this environment."""
    found = []
    for name in FLAVOURS:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def check_onnxruntime() -> str:
    """Return the one installed flavour, or raise with the command that fixes the environment."""
    found = installed_flavours()
    if not found:
        raise OnnxRuntimeSetupError(
            "ONNX Runtime is not installed. Install one flavour: "
            "pip install 'citrus-edge[cpu]' (CPU) or 'citrus-edge[gpu]' (CUDA); "
            "on Jetson install NVIDIA's onnxruntime-gpu wheel for your JetPack."
        )
    if len(found) > 1:
        raise OnnxRuntimeSetupError(
            f"several ONNX Runtime builds are installed ({', '.join(found)}); they overwrite each "
            f"other's files. Keep one: pip uninstall -y {' '.join(found)} && pip install "
            "onnxruntime-gpu (or onnxruntime for CPU only)."
        )
    try:
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise OnnxRuntimeSetupError(f"{found[0]} is installed but does not import: {e}") from e
    return found[0]


def check_providers(requested: list[str]) -> None:
    """Raise unless every requested execution provider is available in this build."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    missing = [p for p in requested if p not in available]
    if missing:
        raise OnnxRuntimeSetupError(
            f"execution provider(s) {missing} are not available in {check_onnxruntime()} "
            f"(available: {available}); install the build that has them or choose another."
        )


def check_session_providers(session, requested: list[str], what: str) -> None:
    """ONNX Runtime drops providers it cannot load without an error: refuse that here."""
    active = session.get_providers()
    dropped = [p for p in requested if p not in active]
    if dropped:
        raise OnnxRuntimeSetupError(
            f"{what}: ONNX Runtime could not load {dropped} (active: {active}); "
            "check the CUDA/cuDNN/TensorRT libraries, or ask for CPUExecutionProvider."
        )
