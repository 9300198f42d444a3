"""Width-scan tasks (minintk.width_tasks): task files read and checked, the source task beside the target."""

import numpy as np
import pytest
import torch
from conftest import TINY_SCAN

from minintk.width_config import ScanConfig, WidthScanError
from minintk.width_tasks import load_task, tasks

pytestmark = pytest.mark.usefixtures("one_thread")

def test_task_files(tmp_path):
    X = np.random.default_rng(0).integers(0, 20, (10, 5))
    y = np.linspace(-1, 1, 10)
    np.savez(tmp_path / "half.npz", X=X, y=y)
    t = load_task(tmp_path / "half.npz")
    assert t.X.shape == (5, 5) and t.X_test.shape == (5, 5) and t.y.dtype == torch.float32
    np.savez(tmp_path / "split.npz", X=X, y=y, X_test=X[:3], y_test=y[:3])
    assert load_task(tmp_path / "split.npz").X.shape == (10, 5)
    np.savez(tmp_path / "float.npz", X=X.astype(float), y=y)
    with pytest.raises(WidthScanError, match="integer token ids"):
        load_task(tmp_path / "float.npz")
    np.savez(tmp_path / "short.npz", X=X, y=y[:4], X_test=X, y_test=y)
    with pytest.raises(WidthScanError, match="one target per sequence"):
        load_task(tmp_path / "short.npz")
    np.savez(tmp_path / "keys.npz", ids=X)
    with pytest.raises(WidthScanError, match="needs arrays 'X'"):
        load_task(tmp_path / "keys.npz")
    (tmp_path / "half.npy").touch()
    with pytest.raises(WidthScanError, match="unknown task format"):
        load_task(tmp_path / "half.npy")
    cfg = ScanConfig(**(TINY_SCAN | dict(data=str(tmp_path / "half.npz"))))
    target, source, vocab = tasks(cfg)
    assert vocab == 20 and source.X.shape[1] == 5 and int(source.X.max()) < 20
