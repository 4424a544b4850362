"""Fused sampling kernel: kept set equals the sort-based reference, distribution, seeding."""

from __future__ import annotations

import math

import pytest
import torch
from kernels_testutil import randn

from resultity_kernels import sample, sampling_probs_ref

# (temperature, top_k, top_p, min_p) per row; every truncation alone and combined
_ROWS = [
    (0.0, 0, 1.0, 0.0),
    (1.0, 0, 1.0, 0.0),
    (0.7, 5, 1.0, 0.0),
    (1.3, 0, 0.8, 0.0),
    (1.0, 10, 0.9, 0.0),
    (1.0, 0, 1.0, 0.1),
    (0.5, 7, 0.6, 0.05),
    (1.0, 1, 1.0, 0.0),
    (2.0, 1000, 0.95, 0.0),
    (0.9, 3, 0.3, 0.2),
]


def _params(rows, device):
    t, k, p, mp = zip(*rows, strict=True)
    return (torch.tensor(t, device=device), torch.tensor(k, dtype=torch.int32, device=device),
            torch.tensor(p, device=device), torch.tensor(mp, device=device))


def _logits(m, v, device, dtype, seed, *, ties=False):
    gen = torch.Generator().manual_seed(seed)
    x = randn(m, v, device=torch.device("cpu"), dtype=torch.float32, gen=gen, scale=2.0)
    if ties:
        x = torch.round(x * 2) / 2  # many equal logits: ties must be kept or dropped together
    return x.to(device=device, dtype=dtype)


@pytest.mark.parametrize("vocab", [1, 17, 100, 300])
@pytest.mark.parametrize("ties", [False, True])
def test_kept_set_is_the_reference_support(target, vocab, ties):
    device, dtype, _ = target
    x = _logits(len(_ROWS), vocab, device, dtype, vocab, ties=ties)
    params = _params(_ROWS, device)
    thr = torch.full((len(_ROWS),), float("nan"), device=device)
    ids = torch.full((len(_ROWS),), -1, dtype=torch.int64, device=device)
    ids = sample(x, *params, seeds=torch.arange(len(_ROWS), device=device), thresholds=thr)
    ref = sampling_probs_ref(x, *params)
    kept = x.float() >= thr[:, None]
    for i, row in enumerate(_ROWS):
        if row[0] == 0.0:
            assert int(ids[i]) == int(x[i].float().argmax()), f"greedy row {i}"
        else:
            assert torch.equal(kept[i], ref[i] > 0), f"row {i} {row}"
    assert bool((ref[torch.arange(len(_ROWS), device=device), ids] > 0).all())


def _chi_square_critical(df: int, z: float) -> float:
    # Wilson-Hilferty: chi2_df quantile ~ df * (1 - 2/(9 df) + z sqrt(2/(9 df)))^3
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def _draws(target, row, trials, vocab, seed):
    device, dtype, _ = target
    x = _logits(1, vocab, device, dtype, seed).expand(trials, vocab).contiguous()
    t, k, p, mp = row
    ids = sample(x, t, k, p, mp, seeds=torch.arange(trials, device=device) * 7919 + seed)
    return ids.cpu(), sampling_probs_ref(x[:1], t, k, p, mp)[0].cpu().double()


def test_draws_stay_inside_the_reference_set(target):
    for n, row in enumerate([(0.8, 6, 0.9, 0.0), (1.0, 0, 0.7, 0.05)]):
        ids, probs = _draws(target, row, 32, 24, seed=n)
        assert bool((probs[ids] > 0).all()), row
        assert len(set(ids.tolist())) > 1, "a non-greedy row must not always give one token"


@pytest.mark.slow
@pytest.mark.parametrize("row", [(1.0, 0, 1.0, 0.0), (0.8, 12, 0.9, 0.03)])
def test_draws_follow_the_reference_distribution(target, row):
    """Pearson chi-square goodness of fit; a correct sampler fails it with probability 1e-3."""
    trials = 400 if target[0].type == "cpu" else 20000
    ids, probs = _draws(target, row, trials, 16, seed=3)
    assert bool((probs[ids] > 0).all())
    observed = torch.bincount(ids, minlength=probs.numel()).double()
    expected = probs * trials
    order = torch.argsort(expected, descending=True)
    # pool the least likely tokens so that every bin expects at least 5 draws
    bins_o, bins_e, acc_o, acc_e = [], [], 0.0, 0.0
    for i in order.tolist():
        if expected[i] == 0:
            continue
        acc_o += float(observed[i])
        acc_e += float(expected[i])
        if acc_e >= 5.0:
            bins_o.append(acc_o)
            bins_e.append(acc_e)
            acc_o = acc_e = 0.0
    if acc_e > 0:
        bins_o[-1] += acc_o
        bins_e[-1] += acc_e
    stat = sum((o - e) ** 2 / e for o, e in zip(bins_o, bins_e, strict=True))
    df = len(bins_e) - 1
    assert df >= 3
    assert stat < _chi_square_critical(df, z=3.0902), f"chi2 {stat:.1f} with {df} df"


def test_seed_and_step_fix_the_token_alone_or_batched(target):
    device, dtype, _ = target
    m, vocab = 6, 50
    x = _logits(m, vocab, device, dtype, 11)
    seeds = torch.tensor([5, 5, 9, 2**40 + 3, 0, 77], device=device)
    steps = torch.tensor([0, 1, 0, 3, 2**33, 1], device=device)
    first = sample(x, 1.0, 0, 0.95, seeds=seeds, steps=steps)
    again = sample(x, 1.0, 0, 0.95, seeds=seeds, steps=steps)
    assert torch.equal(first, again)
    alone = sample(x[3:4], 1.0, 0, 0.95, seeds=seeds[3:4], steps=steps[3:4])
    assert int(alone[0]) == int(first[3])
    # another step or seed draws afresh: over 16 steps a flat row cannot repeat one token
    flat = torch.zeros(16, vocab, device=device, dtype=dtype) + 0.25
    draws = sample(flat, 1.0, seeds=torch.full((16,), 5, device=device),
                   steps=torch.arange(16, device=device))
    assert len(set(draws.tolist())) > 4


def test_sampling_rejects_bad_arguments():
    x = torch.randn(3, 10)
    with pytest.raises(ValueError, match="top_k"):
        sampling_probs_ref(x, 1.0, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="logits"):
        sampling_probs_ref(x.double(), 1.0)
    with pytest.raises(ValueError, match="logits"):
        sampling_probs_ref(x[0], 1.0)


def test_reference_matches_the_engine_sampler_semantics():
    from resultity_runtime._sampling import SamplingParams, _truncated_probs

    rows = [r for r in _ROWS if r[0] > 0]
    x = _logits(len(rows), 500, torch.device("cpu"), torch.float32, 5)
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=mp) for t, k, p, mp in rows]
    engine = _truncated_probs(x.clone(), params)
    ours = sampling_probs_ref(x, *_params(rows, torch.device("cpu")))
    assert torch.equal(engine > 0, ours > 0)
    assert torch.allclose(engine, ours, atol=1e-6)
