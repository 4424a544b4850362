"""The package surface: public names import, and everything but the kernels works without triton."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import resultity_kernels

ROOT = Path(__file__).resolve().parents[2]


def test_public_names_import():
    for name in resultity_kernels.__all__:
        assert getattr(resultity_kernels, name) is not None, name
    for name in ("prefill_attention", "paged_decode_attention", "write_kv_cache", "sample"):
        assert callable(getattr(resultity_kernels, name + "_ref"))


def test_import_does_not_import_triton():
    # triton binds its library to interpreted or compiled mode when imported, so the package
    # must leave that import to the first kernel launch
    code = "import sys, resultity_kernels; print('triton' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"


def test_imports_and_references_work_without_triton():
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # an import of triton now raises ImportError
        sys.modules["triton.language"] = None
        import torch
        import resultity_kernels as rk
        assert not rk.HAS_TRITON
        q = torch.randn(5, 2, 16)
        cu = torch.tensor([0, 2, 5], dtype=torch.int32)
        out = rk.prefill_attention_ref(q, q, q, cu)
        assert out.shape == (5, 2, 16) and torch.isfinite(out).all()
        try:
            rk.prefill_attention(q, q, q, cu)
        except rk.KernelUnavailableError as exc:
            assert "triton" in str(exc)
        else:
            raise AssertionError("a kernel ran without triton")
        try:
            import resultity_runtime._triton_backend  # the engine falls back on ImportError
        except ImportError:
            pass
        else:
            raise AssertionError("the triton backend imported without triton")
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"
