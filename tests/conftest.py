import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random TINY Citrus-V saved in the official checkpoint layout, with its tokenizer."""
    from fixtures import tiny_model, tiny_tokenizer

    from citrus_edge.modelling.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("tiny-checkpoint")
    tokenizer = root / "tokenizer.json"
    tiny_tokenizer().save(str(tokenizer))
    save_checkpoint(tiny_model(), root / "tiny", tokenizer_json=tokenizer)
    return root / "tiny"


@pytest.fixture(scope="session")
def small_phantom_set(tmp_path_factory) -> Path:
    """The manifest of a 10-image phantom set (seed 3)."""
    from citrus_edge.calib_data.phantom_set import write_phantom_set

    return write_phantom_set(tmp_path_factory.mktemp("phantoms") / "set", n=10, seed=3)


@pytest.fixture(scope="session")
def tiny_fp32_bundle(tiny_checkpoint, small_phantom_set, tmp_path_factory) -> Path:
    """A CPU fp32 bundle of the TINY checkpoint, built through the library."""
    from citrus_edge.cli.bundle_build import BuildConfig, build

    out = tmp_path_factory.mktemp("tiny-bundle") / "bundle"
    cfg = BuildConfig(
        target="cpu",
        model_dir=tiny_checkpoint,
        recipe="fp32",
        eval_data=small_phantom_set,
        eval_limit=3,
    )
    build(cfg, out)
    return out
