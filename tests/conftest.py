import os

# Two cores: keep every test single-threaded so parallel test workers do not fight (DESIGN.md section 8).
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """A 2 s random clip rendered through the CLI (shared, read-only)."""
    from visaudio.cli import main

    out = tmp_path_factory.mktemp("clips") / "seed5"
    assert main(["scene", "--seed", "5", "--duration", "2", "--out", str(out)]) == 0
    return out
