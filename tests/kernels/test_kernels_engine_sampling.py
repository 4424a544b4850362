"""The engine on the Triton backend: the fused sampling kernel draws, greedy equals torch's.

On CPU the kernels run in the interpreter (float32); with CUDA the engine runs on the GPU in
bfloat16 and the kernels compiled.
"""

from __future__ import annotations

import attrs
import pytest
import torch

from resultity_runtime import Engine, SamplingParams
from resultity_runtime._demo_corpus import demo_model_path
from resultity_runtime._sampling import Sampler

kernels = pytest.importorskip("resultity_kernels")
pytest.importorskip("resultity_runtime._triton_backend")

_DEVICES = [
    pytest.param(("cpu", "float32"), id="cpu-interpreter",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")),
    pytest.param(("cuda", "bfloat16"), id="cuda-bf16",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                            reason="no CUDA device")]),
]


def _engine(device: str, dtype: str, backend: str) -> Engine:
    return Engine.from_pretrained(demo_model_path(), device=device, dtype=dtype,
                                  backend=backend, kv_cache_bytes=4 << 20, max_num_seqs=4)


@pytest.fixture(params=_DEVICES, scope="module")
def placed(request: pytest.FixtureRequest) -> tuple[str, str]:
    device, dtype = request.param
    return device, dtype


def test_sampler_kernel_path_applies_bias_and_keys_by_seed_and_step() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 300, generator=gen).to(device)  # flat: many tokens stay likely
    sampler = Sampler(0, kernel=kernels.sample)
    params = [
        SamplingParams(temperature=0.9, top_k=40, top_p=0.8, seed=1),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, logit_bias={5: 100.0, 9: 100.0}, min_p=0.01, seed=2),
    ]
    streams = [(11, 0), (0, 0), (12, 4)]
    out = sampler.sample(logits, params, [(), (), ()], streams=streams).token_id_list
    assert out[1] == int(logits[1].argmax())
    assert out[2] in {5, 9}  # the bias leaves only these two in the min-p set
    # row 0 is exactly the kernel's draw for (seed 11, step 0) on the unmodified logits
    direct = kernels.sample(logits[:1].contiguous(), 0.9, 40, 0.8, 0.0,
                            seeds=torch.tensor([11], device=device),
                            steps=torch.tensor([0], device=device))
    assert out[0] == int(direct[0])
    # the draw follows the (seed, step) stream: over steps the row takes several tokens
    draws = {sampler.sample(logits[:1], params[:1], [()], streams=[(11, s)]).token_id_list[0]
             for s in range(12)}
    assert len(draws) > 1
    assert all(d in set(logits[0].topk(40).indices.tolist()) for d in draws)


@pytest.mark.slow
def test_triton_engine_samples_the_same_tokens_alone_and_batched(placed: tuple[str, str]) -> None:
    device, dtype = placed
    engine = _engine(device, dtype, "triton")
    assert engine.sampler.kernel is kernels.sample
    # the trained demo model is confident: a high temperature makes the seed matter
    params = SamplingParams(max_tokens=6, temperature=2.0, top_k=200, seed=7, ignore_eos=True)
    alone = engine.generate(["What is Resultity?"], params)[0].outputs[0].token_ids
    other = SamplingParams(max_tokens=4, temperature=1.2, seed=3, ignore_eos=True)
    batched = engine.generate(["What is Resultity?", "Tell me about nodes"], [params, other])
    assert batched[0].outputs[0].token_ids == alone
    reseeded = engine.generate(["What is Resultity?"] * 3,
                               [attrs.evolve(params, seed=s) for s in (8, 9, 10)])
    assert {o.outputs[0].token_ids for o in reseeded} != {alone}


@pytest.mark.slow
def test_triton_and_torch_backends_give_the_same_greedy_tokens(placed: tuple[str, str]) -> None:
    device, dtype = placed
    prompts = ["What is Resultity?", "How does a node get its configuration?"]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    got = [_engine(device, dtype, backend).generate(prompts, params)
           for backend in ("triton", "torch")]
    assert [o.outputs[0].token_ids for o in got[0]] == [o.outputs[0].token_ids for o in got[1]]
