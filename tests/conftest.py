"""Test-wide settings: one torch thread (tests also start kernels and DDP workers), a private cache."""
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _private_runs(tmp_path_factory, monkeypatch):
    """Runs trained by tests go to a temporary run cache, never the user's."""
    monkeypatch.setenv("OCCLAB_RUNS", str(tmp_path_factory.getbasetemp() / "runs"))
