"""Compile every kernel for Hopper (sm_90) without a GPU; prints one JSON line of results.

Run in a fresh process without TRITON_INTERPRET (triton's own library is bound to the
interpreter once imported under it): ``python kernels_compile_check.py``.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # today's default, without its warning
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from resultity_kernels import _decode_attention as dec
from resultity_kernels import _kv_cache_write as kvw
from resultity_kernels import _prefill_attention as pre
from resultity_kernels import _rms_norm as rms
from resultity_kernels import _rotary as rot
from resultity_kernels import _sampling as smp


def compile_ptx(lazy, pointer_types, constexprs, **options) -> str:
    signature = {}
    for name in inspect.signature(lazy.fn).parameters:
        if name.isupper() and name not in constexprs:
            raise KeyError(f"{lazy.fn.__name__}: no value for constexpr {name}")
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types.get(name, "*i32")
        else:
            signature[name] = "fp32" if name.endswith(("scale", "eps")) else "i32"
    lazy.bind_triton()  # binds `tl` in the kernel's module
    src = ASTSource(fn=JITFunction(lazy.fn), signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


def cases():
    for dtype in ("bf16", "fp16"):
        for d, prefix in ((128, True), (64, False)):
            names = ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "k_cache_ptr", "v_cache_ptr")
            ptrs = dict.fromkeys(names, "*" + dtype)
            consts = {"GROUP": 4, "PAGE": 16, "HAS_PREFIX": prefix, "SKIP_SINGLE": prefix,
                      "BLOCK_M": 128,
                      "BLOCK_N": 64, "BLOCK_D": d}
            yield (f"prefill-{dtype}-d{d}-prefix{prefix}", pre._prefill_kernel, ptrs, consts,
                   {"num_warps": 8 if d == 128 else 4, "num_stages": 2})
    for split in (True, False):
        ptrs = {"q_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16",
                "o_ptr": "*fp32" if split else "*bf16", "lse_ptr": "*fp32"}
        consts = {"GROUP": 4, "GROUP_PAD": 16, "PAGE": 16, "WRITE_LSE": split, "BLOCK_N": 64,
                  "BLOCK_D": 128}
        yield f"decode-split{split}", dec._decode_split_kernel, ptrs, consts, {"num_warps": 4}
    yield ("decode-merge", dec._decode_merge_kernel,
           {"part_ptr": "*fp32", "lse_ptr": "*fp32", "o_ptr": "*bf16"},
           {"SPLIT_PAD": 4, "BLOCK_D": 128}, {})
    yield ("kv-write", kvw._write_kv_kernel,
           {"k_ptr": "*bf16", "v_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16",
            "slot_ptr": "*i64"}, {"BLOCK_SIZE": 16, "BLOCK_H": 8, "BLOCK_D": 128}, {})
    for logits in ("*fp32", "*bf16"):
        ptrs = {"logits_ptr": logits, "temp_ptr": "*fp32", "top_k_ptr": "*i32",
                "top_p_ptr": "*fp32", "min_p_ptr": "*fp32", "seed_ptr": "*i64",
                "step_ptr": "*i64", "out_ptr": "*i64", "thr_ptr": "*fp32"}
        yield (f"sample-{logits[1:]}", smp._sample_kernel, ptrs,
               {"BLOCK": 2048, "MAX_ITERS": 64}, {"num_warps": 8})


def more_cases():
    for residual in (True, False):
        ptrs = dict.fromkeys(("x_ptr", "res_ptr", "w_ptr", "out_ptr", "res_out_ptr"), "*bf16")
        yield (f"rms-norm-residual{residual}", rms._rms_norm_kernel, ptrs,
               {"HAS_RESIDUAL": residual, "BLOCK": 4096}, {"num_warps": 16})
    yield ("rotary", rot._rotary_kernel,
           {"x_ptr": "*bf16", "pos_ptr": "*i64", "inv_freq_ptr": "*fp32"},
           {"BLOCK_H": 32, "BLOCK_HALF": 64}, {"num_warps": 4})


def main() -> int:
    results = {}
    for name, lazy, ptrs, consts, options in [*cases(), *more_cases()]:
        try:
            ptx = compile_ptx(lazy, ptrs, consts, **options)
            results[name] = {"ok": True, "wgmma": "wgmma" in ptx}
        except Exception as exc:  # report every failure, not only the first
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
