"""Sampling parameters and the batched torch sampler.

Processing order for one row of logits (all in float32):

1. ``logit_bias`` is added to the raw logits; a bias of -100 (or less) bans the token outright
   (its logit becomes -inf), so a ban holds whatever the model's logit scale is.
2. Logprobs are taken here, from ``log_softmax`` of the biased logits: the model's own
   distribution after ``logit_bias`` and before penalties, temperature and truncation. This is
   vLLM's default (raw logprobs) and what OpenAI reports; it does not depend on temperature.
3. Penalties, over tokens already seen: ``repetition_penalty`` (Hugging Face semantics: a seen
   token's positive logit is divided by it, a negative one multiplied, over the prompt and the
   output when the prompt is given), then ``frequency_penalty`` (subtracted once per occurrence
   in the output) and ``presence_penalty`` (subtracted once if the token occurs in the output).
4. ``temperature == 0`` picks the argmax (ties go to the lowest id). Otherwise the logits are
   divided by the temperature, then truncated in this order: top-k (ties with the k-th value are
   kept), top-p (the smallest set of most likely tokens whose mass reaches ``top_p``, computed on
   the top-k-restricted distribution; a token is kept when the mass strictly above it is below
   ``top_p``, so tied tokens are kept or dropped together), min-p (tokens whose probability is
   below ``min_p`` times the largest probability are dropped).
5. One uniform draw per sampled row from that row's own ``torch.Generator`` selects a token by
   inverse CDF (float64) over the remaining probabilities. Generators live on the CPU, so a
   seeded request gives the same tokens on any device and in any batch.

Importing this module does not import torch (torch is imported where tensors are made), so a
process without torch can build and validate SamplingParams.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import types
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from resultity_runtime._errors import RuntimeEngineError

if TYPE_CHECKING:
    import torch

__all__ = [
    "MAX_LOGPROBS",
    "InvalidSamplingParamsError",
    "Sampler",
    "SamplerOutput",
    "SamplingParams",
    "TokenLogprobs",
    "make_generator",
]

MAX_LOGPROBS = 20
_BAN = -100.0


class InvalidSamplingParamsError(RuntimeEngineError, ValueError):
    """A sampling parameter is out of range or of the wrong type; ``field`` names it."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(field: str, value: object, lo: float, hi: float, *, lo_open: bool = False) -> None:
    if not _is_number(value) or not math.isfinite(float(value)):  # type: ignore[arg-type]
        raise InvalidSamplingParamsError(field, f"must be a finite number, got {value!r}")
    v = float(value)  # type: ignore[arg-type]
    if v < lo or v > hi or (lo_open and v == lo):
        left = "(" if lo_open else "["
        raise InvalidSamplingParamsError(field, f"must be in {left}{lo}, {hi}], got {value!r}")


def _int_at_least(field: str, value: object, lo: int) -> None:
    if not _is_int(value) or value < lo:  # type: ignore[operator]
        raise InvalidSamplingParamsError(field, f"must be an integer >= {lo}, got {value!r}")


def _freeze_bias(value: Mapping[int, float]) -> Mapping[int, float]:
    if not isinstance(value, Mapping):
        raise InvalidSamplingParamsError("logit_bias", "must be a mapping of token id to bias")
    return types.MappingProxyType(dict(value))


def _freeze_stop(value: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@attrs.frozen
class SamplingParams:
    """How to sample one request; construction raises InvalidSamplingParamsError (a ValueError)
    naming the first bad field.

    ``top_k`` 0 or -1 disables top-k; ``logprobs`` None returns no logprobs, 0 only the chosen
    token's, N (at most 20) also the N most likely alternatives. ``seed`` fixes the request's
    random stream: the same seed and prompt give the same tokens alone or batched.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = attrs.field(factory=dict, converter=_freeze_bias, hash=False)
    seed: int | None = None
    stop: tuple[str, ...] = attrs.field(default=(), converter=_freeze_stop)
    stop_token_ids: tuple[int, ...] = attrs.field(default=(), converter=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __attrs_post_init__(self) -> None:
        _int_at_least("max_tokens", self.max_tokens, 1)
        _number("temperature", self.temperature, 0.0, math.inf)
        _number("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _int_at_least("top_k", self.top_k, -1)
        _number("min_p", self.min_p, 0.0, 1.0)
        _number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _number("repetition_penalty", self.repetition_penalty, 0.0, math.inf, lo_open=True)
        for token, bias in self.logit_bias.items():
            if not _is_int(token) or token < 0:
                raise InvalidSamplingParamsError(
                    "logit_bias", f"keys must be token ids >= 0, got {token!r}"
                )
            _number(f"logit_bias[{token}]", bias, -100.0, 100.0)
        if self.seed is not None and not _is_int(self.seed):
            raise InvalidSamplingParamsError("seed", f"must be an integer, got {self.seed!r}")
        for i, s in enumerate(self.stop):
            if not isinstance(s, str) or not s:
                raise InvalidSamplingParamsError(f"stop[{i}]", "must be a non-empty string")
        for i, t in enumerate(self.stop_token_ids):
            _int_at_least(f"stop_token_ids[{i}]", t, 0)
        if self.logprobs is not None:
            _int_at_least("logprobs", self.logprobs, 0)
            if self.logprobs > MAX_LOGPROBS:
                raise InvalidSamplingParamsError(
                    "logprobs", f"must be at most {MAX_LOGPROBS}, got {self.logprobs}"
                )
        _int_at_least("n", self.n, 1)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidSamplingParamsError(name, "must be a boolean")

    @property
    def greedy(self) -> bool:
        """True when the request decodes greedily (temperature 0)."""
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        """True when any penalty changes the logits."""
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )


def make_generator(seed: int | None, index: int = 0) -> torch.Generator:
    """Return a fresh CPU generator for one sequence of a request.

    ``seed`` None draws the seed from the OS (``secrets``). ``index`` distinguishes the ``n``
    sequences of one request: index 0 uses ``seed`` itself, index i > 0 a seed derived from
    (seed, i) by SHA-256, so sibling sequences differ but stay reproducible.
    """
    import torch

    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed_value(seed, index))
    return gen


def seed_value(seed: int | None, index: int = 0) -> int:
    """Return the 64-bit seed of sequence ``index`` of a request seeded with ``seed``: what
    ``make_generator`` seeds its generator with (random from the OS when ``seed`` is None)."""
    if seed is None:
        return secrets.randbits(64)
    if index == 0:
        return seed % (1 << 64)
    digest = hashlib.sha256(f"resultity-seed:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


@attrs.frozen
class TokenLogprobs:
    """Logprobs of one sampled position.

    ``logprob`` is the chosen token's, ``rank`` its 1-based rank (1 + the number of tokens with
    a strictly larger logprob), ``top`` the requested alternatives as (token_id, logprob) in
    descending order (ties in ascending id order); empty when ``logprobs`` was 0.
    """

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...]


@attrs.frozen
class SamplerOutput:
    """The result of one sampling step over M rows.

    ``token_ids``: int64 [M] on the logits' device; ``token_id_list``: the same as Python ints;
    ``logprobs``: one entry per row, None where the row asked for none.
    """

    token_ids: torch.Tensor
    token_id_list: list[int]
    logprobs: list[TokenLogprobs | None]


class Sampler:
    """Samples the next token for a batch of rows that may each have different parameters.

    Rows whose generator is None share the sampler's own generator, seeded from ``seed`` (or
    from the OS when None); give every request its own generator (``make_generator``) for
    reproducible streams.

    ``kernel``: a fused sampling function with the signature of ``resultity_kernels.sample``
    (the Triton kernel on CUDA). When it is set and ``sample`` gets ``streams``, rows that
    sample (temperature > 0) draw through it after logit bias and penalties: the token then
    depends only on the row's (seed, step), its logits and parameters, not on generators, and
    differs from the torch path's draw for the same seed (both sample the same
    distribution).
    """

    def __init__(self, seed: int | None = None, *, kernel: Any = None) -> None:
        self._shared = make_generator(seed)
        self.kernel = kernel

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        output_ids: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator | None] | None = None,
        prompt_ids: Sequence[Sequence[int] | None] | None = None,
        *,
        streams: Sequence[tuple[int, int]] | None = None,
    ) -> SamplerOutput:
        """Sample one token per row of ``logits`` ([M, V], any float dtype, any device).

        ``params``, ``output_ids`` (tokens generated so far) and, when given, ``generators``,
        ``prompt_ids`` (used only by ``repetition_penalty``) and ``streams`` (the (seed, step)
        of each row, for the ``kernel`` path) have one entry per row.
        ``logits`` is not modified. Returns a SamplerOutput. Raises InvalidSamplingParamsError
        when a ``logit_bias`` id is outside the vocabulary or bans every token, ValueError on
        mismatched lengths.
        """
        import torch

        m = logits.shape[0]
        if len(params) != m or len(output_ids) != m:
            raise ValueError(f"expected {m} params and output histories")
        if generators is not None and len(generators) != m:
            raise ValueError(f"expected {m} generators")
        if prompt_ids is not None and len(prompt_ids) != m:
            raise ValueError(f"expected {m} prompt histories")
        if streams is not None and len(streams) != m:
            raise ValueError(f"expected {m} streams")
        device = logits.device
        # copy only when something below writes into the logits
        needs_copy = any(p.logit_bias or p.uses_penalties for p in params)
        x = logits.to(torch.float32, copy=needs_copy)  # [M, V]

        if _apply_logit_bias(x, params) and bool(torch.isneginf(x.amax(dim=-1)).any()):
            raise InvalidSamplingParamsError("logit_bias", "bans every token of the vocabulary")

        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw_logprobs = None
        if lp_rows:
            raw_logprobs = torch.log_softmax(x if len(lp_rows) == m else x[lp_rows], dim=-1)

        _apply_penalties(x, params, output_ids, prompt_ids)

        greedy_rows = [i for i, p in enumerate(params) if p.greedy]
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if len(greedy_rows) == m:
            sampled = x.argmax(dim=-1)
        else:
            y = x if len(random_rows) == m else x[random_rows]
            rows = [params[i] for i in random_rows]
            if self.kernel is not None and streams is not None:
                chosen = self._kernel_draw(y, rows, [streams[i] for i in random_rows])
            else:
                gens = [
                    (generators[i] if generators is not None else None) or self._shared
                    for i in random_rows
                ]
                chosen = _draw(_truncated_probs(y, rows), gens)
            if len(random_rows) == m:
                sampled = chosen
            else:
                sampled = torch.empty(m, dtype=torch.int64, device=device)
                sampled[random_rows] = chosen
                sampled[greedy_rows] = x[greedy_rows].argmax(dim=-1)

        token_list: list[int] = sampled.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * m
        if raw_logprobs is not None:
            entries = _collect_logprobs(
                raw_logprobs,
                [token_list[i] for i in lp_rows],
                [params[i].logprobs or 0 for i in lp_rows],
            )
            for row, entry in zip(lp_rows, entries, strict=True):
                logprobs[row] = entry
        return SamplerOutput(token_ids=sampled, token_id_list=token_list, logprobs=logprobs)


    def _kernel_draw(
        self, y: torch.Tensor, params: Sequence[SamplingParams],
        streams: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        import torch

        device = y.device
        v = y.shape[1]
        # the kernel takes int64 seeds: fold the 64-bit seed into 63 bits
        seeds = torch.tensor([seed & ((1 << 63) - 1) for seed, _ in streams],
                             dtype=torch.int64, device=device)
        steps = torch.tensor([step for _, step in streams], dtype=torch.int64, device=device)
        chosen: torch.Tensor = self.kernel(
            y.contiguous(),
            _column([p.temperature for p in params], device).squeeze(1),
            torch.tensor([p.top_k if 0 < p.top_k < v else 0 for p in params],
                         dtype=torch.int32, device=device),
            _column([p.top_p for p in params], device).squeeze(1),
            _column([p.min_p for p in params], device).squeeze(1),
            seeds=seeds, steps=steps,
        )
        return chosen


def _apply_logit_bias(x: torch.Tensor, params: Sequence[SamplingParams]) -> bool:
    """Add each row's bias in place; return whether any token was banned."""
    import torch

    v = x.shape[1]
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for i, p in enumerate(params):
        for token, bias in p.logit_bias.items():
            if token >= v:
                raise InvalidSamplingParamsError(
                    "logit_bias", f"token id {token} is outside the vocabulary of {v}"
                )
            rows.append(i)
            cols.append(token)
            vals.append(-math.inf if bias <= _BAN else float(bias))
    if not rows:
        return False
    r = torch.tensor(rows, device=x.device)
    c = torch.tensor(cols, device=x.device)
    x[r, c] += torch.tensor(vals, dtype=torch.float32, device=x.device)
    return any(b == -math.inf for b in vals)


def _apply_penalties(
    x: torch.Tensor,
    params: Sequence[SamplingParams],
    output_ids: Sequence[Sequence[int]],
    prompt_ids: Sequence[Sequence[int] | None] | None,
) -> None:
    """Apply repetition, frequency and presence penalties in place.

    Only the logits of tokens already seen change, so the work is O(history), not O(V).
    """
    import torch

    v = x.shape[1]
    rows: list[int] = []
    cols: list[int] = []
    counts: list[float] = []
    reps: list[float] = []
    freqs: list[float] = []
    press: list[float] = []
    for i, p in enumerate(params):
        if not p.uses_penalties:
            continue
        seen = Counter(t for t in output_ids[i] if 0 <= t < v)
        if p.repetition_penalty != 1.0 and prompt_ids is not None:
            for t in prompt_ids[i] or ():
                if 0 <= t < v and t not in seen:
                    seen[t] = 0
        for token, count in seen.items():
            rows.append(i)
            cols.append(token)
            counts.append(float(count))
            reps.append(p.repetition_penalty)
            freqs.append(p.frequency_penalty)
            press.append(p.presence_penalty)
    if not rows:
        return
    device = x.device
    r = torch.tensor(rows, device=device)
    c = torch.tensor(cols, device=device)
    vals = x[r, c]  # [E]
    rep = torch.tensor(reps, dtype=torch.float32, device=device)
    vals = torch.where(vals > 0, vals / rep, vals * rep)
    cnt = torch.tensor(counts, dtype=torch.float32, device=device)
    vals = vals - torch.tensor(freqs, dtype=torch.float32, device=device) * cnt
    vals = vals - torch.tensor(press, dtype=torch.float32, device=device) * (cnt > 0)
    x[r, c] = vals


def _column(values: Sequence[Any], device: torch.device) -> torch.Tensor:
    import torch

    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


_TOP_P_CANDIDATES = 128


def _top_p_threshold(y: torch.Tensor, ps: torch.Tensor, candidates: int) -> torch.Tensor:
    """Return [R, 1] logit thresholds of top-p (keep y >= threshold); -inf keeps everything.

    Looks at the ``candidates`` largest logits first and sorts a whole row only when its
    nucleus is wider than that.
    """
    import torch

    v = y.shape[1]
    k = min(v, candidates)
    vals = y.topk(k, dim=-1).values if k < v else y.sort(dim=-1, descending=True).values
    probs = torch.exp(vals - torch.logsumexp(y, dim=-1, keepdim=True))  # [R, k]
    mass_above = probs.cumsum(dim=-1) - probs
    keep = mass_above < ps
    keep[:, 0] = True
    n_keep = keep.sum(dim=-1, keepdim=True)  # kept positions form a prefix
    threshold = vals.gather(1, n_keep - 1)
    off = ps >= 1.0
    threshold = threshold.masked_fill(off, -math.inf)
    if k < v:
        wider = (keep[:, -1:] & ~off).squeeze(1)
        if bool(wider.any()):
            rows = wider.nonzero().squeeze(1)
            threshold[rows] = _top_p_threshold(y[rows], ps[rows], v)
    return threshold


def _truncated_probs(y: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Return float32 [R, V] probabilities after temperature, top-k, top-p and min-p.

    ``y`` is not modified.
    """
    import torch

    device = y.device
    v = y.shape[1]
    temps = [p.temperature for p in params]
    # division makes a new tensor, which the masks below may write into
    same = all(t == temps[0] for t in temps)
    y = y / temps[0] if same else y / _column(temps, device)

    ks = [p.top_k if 0 < p.top_k < v else v for p in params]
    if any(k < v for k in ks):
        top_vals = y.topk(max(ks), dim=-1).values  # [R, kmax] descending
        kth = top_vals.gather(1, torch.tensor(ks, device=device).unsqueeze(1) - 1)
        y.masked_fill_(y < kth, -math.inf)
    ps = [p.top_p for p in params]
    if any(p < 1.0 for p in ps):
        threshold = _top_p_threshold(y, _column(ps, device), _TOP_P_CANDIDATES)
        y.masked_fill_(y < threshold, -math.inf)
    min_ps = [p.min_p for p in params]
    if any(mp > 0.0 for mp in min_ps):
        log_min_p = torch.log(_column(min_ps, device))  # log(0) = -inf keeps everything
        y.masked_fill_(y < y.amax(dim=-1, keepdim=True) + log_min_p, -math.inf)
    return torch.softmax(y, dim=-1)


def _draw(probs: torch.Tensor, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """Inverse-CDF draw of one token per row; each row consumes exactly one uniform."""
    import torch

    u = torch.tensor(
        [float(torch.rand((), generator=g, dtype=torch.float64)) for g in gens],
        dtype=torch.float64,
        device=probs.device,
    )
    cdf = probs.to(torch.float64).cumsum(dim=-1)  # [R, V]
    total = cdf[:, -1]
    # Keep the target strictly below the total so the search never lands on the zero tail.
    target = torch.minimum(u * total, total * (1.0 - 1e-12)).unsqueeze(1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return idx.clamp_(max=probs.shape[1] - 1)


def _collect_logprobs(
    raw: torch.Tensor, chosen: Sequence[int], counts: Sequence[int]
) -> list[TokenLogprobs]:
    import torch

    device = raw.device
    idx = torch.tensor(chosen, dtype=torch.int64, device=device).unsqueeze(1)
    chosen_lp = raw.gather(1, idx)  # [R, 1]
    ranks = (raw > chosen_lp).sum(dim=-1) + 1
    kmax = max(counts)
    top_ids: list[list[int]] = [[] for _ in chosen]
    top_lps: list[list[float]] = [[] for _ in chosen]
    if kmax:
        vals, ids = raw.topk(kmax, dim=-1)  # [R, kmax]
        # order ties by ascending id: sort by id, then a stable sort by descending value
        ids, order = ids.sort(dim=-1)
        vals = vals.gather(1, order)
        vals, order = vals.sort(dim=-1, descending=True, stable=True)
        top_ids = ids.gather(1, order).tolist()
        top_lps = vals.tolist()
    lps = chosen_lp.squeeze(1).tolist()
    rank_list = ranks.tolist()
    return [
        TokenLogprobs(
            token_id=chosen[j],
            logprob=lps[j],
            rank=rank_list[j],
            top=tuple(zip(top_ids[j][: counts[j]], top_lps[j][: counts[j]], strict=True)),
        )
        for j in range(len(chosen))
    ]
