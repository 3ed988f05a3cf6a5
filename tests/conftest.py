"""Shared pytest fixtures (other test modules may append theirs here)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLES = REPO / "sample_graphs"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``<repo>/../shared/data`` (real CIFAR-10, pretrained ResNets); skips the test when absent.

    Tests using it should also carry ``@pytest.mark.shared``.
    """
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def r8_dir(tmp_path_factory) -> Path:
    """The sample ResNet8 decomposed on the sample calibration set (one module per CIFAR-10 class)."""
    from onnxmod.decompose import DecomposeSettings, decompose

    out = tmp_path_factory.mktemp("r8") / "r8.modules"
    decompose(SAMPLES / "resnet8_cifar10.onnx", SAMPLES / "cifar10_calib.npz", out,
              settings=DecomposeSettings(samples_per_class=60), quiet=True, device="cpu")
    return out


@pytest.fixture(scope="session")
def r8_composed(r8_dir, tmp_path_factory) -> Path:
    """All ten modules of :func:`r8_dir` composed back into one classifier."""
    from onnxmod import modelio
    from onnxmod.compose import compose, module_files

    out = tmp_path_factory.mktemp("r8c") / "r8_composed.onnx"
    modelio.save_model(compose(module_files(r8_dir)), out)
    return out
