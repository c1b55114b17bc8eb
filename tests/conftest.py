"""Test-wide settings: one torch thread (tests also start kernels and DDP workers), a private cache."""
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts on one torch thread, whatever the test before it set: tiny models gain nothing from
    threads, and on a shared 2-core machine a second busy process makes every multi-threaded op wait for a
    descheduled worker (an overfit test took 50 s instead of 1 s)."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _private_runs(tmp_path_factory, monkeypatch):
    """Runs trained by tests go to a temporary run cache, never the user's."""
    monkeypatch.setenv("OCCLAB_RUNS", str(tmp_path_factory.getbasetemp() / "runs"))


@pytest.fixture(scope="session")
def quickstart_report(tmp_path_factory):
    """The smoke reproduction of notebook 00 (Papermill, about 15 s), shared by the tests that read its report."""
    from occlab.reproduce import reproduce

    out = tmp_path_factory.mktemp("quickstart") / "reports"
    return reproduce("smoke", only=["00"], out_dir=out, progress=False)
