"""Recurrent inference: a fixed-size per-layer cache and ``generate()`` (greedy and sampling).

A Mamba decodes with a constant-size state instead of a growing KV cache: per layer a conv state
(batch, d_inner, d_conv) holding the last d_conv conv inputs (newest last; the same layout as
mamba_ssm and transformers) and an SSM state (batch, d_inner, d_state) in float32. The prompt is
run once through the scan (prefill), then each new token is one O(1) recurrent step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import operator
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .model import padding_mask
from .ops import dispatch

STATE_UPDATE_OP = "selective_state_update"
PREFILL_OPS = ("causal_conv1d", "selective_scan")  # the ops a prompt runs through, with the model's backend


def check_prompt_backend(model: torch.nn.Module, device: torch.device | str) -> None:
    """BackendUnavailableError (naming the op and why) if the model's explicit backend cannot run a prompt's ops
    on ``device``: the prompt runs the model's own backend, which must run here, as in training."""
    backend = dispatch.requested_backend(model.layers[0].mixer.backend if len(model.layers) else None)
    if backend != "auto":
        for op in PREFILL_OPS:
            dispatch.resolve(op, torch.device(device), backend)


@dataclass
class MambaCache:
    """Per-layer recurrent state of a :class:`~openlm_mamba.model.MambaLM`; updated in place.

    ``conv_states[i]`` (batch, d_inner, d_conv) in the model's dtype, ``ssm_states[i]``
    (batch, d_inner, d_state) float32, ``seqlen_offset`` = tokens consumed so far,
    ``state_update`` = the resolved ``selective_state_update`` backend used per step, ``params`` =
    step-invariant per-layer tensors (e.g. A = -exp(A_log)) taken when the cache is allocated:
    allocate a new cache (or call :meth:`refresh`) after changing the model's weights.
    Pass it to ``model(input_ids, past_key_values=cache, use_cache=True)`` to continue decoding.
    """

    conv_states: list[torch.Tensor]
    ssm_states: list[torch.Tensor]
    state_update: Callable
    backend: str
    params: list[tuple[torch.Tensor, ...]]  # per layer, from MambaMixer.step_params() at allocation
    seqlen_offset: int = 0
    fused: tuple | None = None  # model_step_args(): the whole step / prefill as one C++ call, where it applies
    owner: Callable | None = dataclasses.field(default=None, repr=False, compare=False)  # weakref to the model
    # why the states cannot be trusted (a generate() call that raised part-way); reset() clears it
    broken: str | None = dataclasses.field(default=None, repr=False, compare=False)

    @classmethod
    def allocate(
        cls,
        model: torch.nn.Module,
        batch_size: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str | None = None,
    ) -> MambaCache:
        """Zeroed cache for ``batch_size`` sequences.

        ``backend`` (of the per-step ``selective_state_update``: "auto", "torch" or "triton") defaults to
        the model's backend, else $OPENLM_MAMBA_BACKEND, else auto; such a default that the step op lacks
        (e.g. "cuda", mamba_ssm's scan for the prompt) leaves the step to auto. A backend given here that
        cannot run the step (e.g. "cuda", or "triton" without a GPU) raises BackendUnavailableError.
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"MambaCache: batch_size must be a positive int, got {batch_size!r}")
        cfg = model.cfg
        weight = model.model.backbone.embedding.weight
        dtype = dtype or weight.dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"MambaCache: dtype (of the conv states) must be a floating-point dtype, got {dtype!r}")
        device = torch.device(device) if device is not None else weight.device
        check_prompt_backend(model, device)
        explicit = backend is not None
        if backend is None:
            backend = model.layers[0].mixer.backend if len(model.layers) else None
        wanted = dispatch.requested_backend(backend)
        step_backends = dispatch._REGISTRY.get(STATE_UPDATE_OP, {})
        if wanted != "auto" and wanted not in step_backends:
            if explicit:
                raise dispatch.BackendUnavailableError(
                    f"{STATE_UPDATE_OP}: backend {wanted!r} is not implemented for this op (available: "
                    f"{', '.join(sorted(step_backends))}); backend= picks the decoding step's backend (the prompt "
                    "runs the model's own backend, set with model.set_backend)"
                )
            backend = "auto"  # the model's / env's "cuda" (mamba_ssm kernels for the scan): the step has none
        name, fn = dispatch.resolve(STATE_UPDATE_OP, device, backend)
        conv = [torch.zeros(batch_size, cfg.d_inner, cfg.d_conv, dtype=dtype, device=device) for _ in model.layers]
        ssm = [
            torch.zeros(batch_size, cfg.d_inner, cfg.d_state, dtype=torch.float32, device=device) for _ in model.layers
        ]
        params = [layer.mixer.step_params() for layer in model.layers]
        fused = model_step_args(model, params) if name == "torch" and dtype == torch.float32 else None
        return cls(conv, ssm, fn, name, params, fused=fused, owner=weakref.ref(model))

    @property
    def batch_size(self) -> int:
        """The number of sequences the cache holds states for (0 for a model without layers)."""
        return self.ssm_states[0].shape[0] if self.ssm_states else 0

    def __len__(self) -> int:
        return len(self.ssm_states)

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(conv_state, ssm_state)`` of one layer (list-like, as OpenLM's per-layer past_key_values)."""
        return self.conv_states[layer], self.ssm_states[layer]

    def refresh(self, model: torch.nn.Module) -> None:
        """Re-read the step-invariant parameters from ``model`` (after its weights changed)."""
        self.params = [layer.mixer.step_params() for layer in model.layers]
        f32 = all(t.dtype == torch.float32 for t in self.conv_states)
        self.fused = model_step_args(model, self.params) if self.backend == "torch" and f32 else None
        self.owner = weakref.ref(model)

    def clone(self, repeat: int = 1) -> MambaCache:
        """An independent copy of the states (the step parameters are shared): a prefix read once, continued
        several ways. ``repeat``: each sequence repeated that many times in a row (batch * repeat sequences),
        e.g. one shared prompt for a batch of continuations."""
        if not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 1:
            raise ValueError(f"MambaCache.clone: repeat must be a positive int, got {repeat!r}")
        return self.select(torch.arange(self.batch_size).repeat_interleave(repeat))

    def select(self, rows: torch.Tensor | Sequence[int]) -> MambaCache:
        """A new cache of the sequences ``rows`` (indices into this batch, in any order, repeats allowed): copies
        of their states, the step parameters shared."""
        if not self.ssm_states:  # a model without layers: nothing to copy
            return dataclasses.replace(self, conv_states=[], ssm_states=[])
        index = torch.as_tensor(rows)
        if index.numel() and (index.is_floating_point() or index.is_complex() or index.dtype == torch.bool):
            raise ValueError(f"MambaCache.select: rows must be integer indices, got {index.dtype}")
        index = index.long()
        if index.dim() != 1 or (index.numel() and not 0 <= int(index.min()) <= int(index.max()) < self.batch_size):
            raise ValueError(
                f"MambaCache.select: rows must be a 1-D list of indices in [0, {self.batch_size}), got "
                f"{index.tolist() if index.numel() <= 8 else tuple(index.shape)}"
            )
        if not index.numel():
            raise ValueError("MambaCache.select: rows is empty")

        def take(t: torch.Tensor) -> torch.Tensor:
            return t.detach().index_select(0, index.to(t.device))

        return dataclasses.replace(
            self, conv_states=[take(t) for t in self.conv_states], ssm_states=[take(t) for t in self.ssm_states]
        )

    def reset(self) -> None:
        """Zero every state so the cache can be reused for new prompts of the same batch size.

        States that autograd recorded (decoding with autograd on) are replaced by new zeroed tensors, which
        also detaches the cache from that graph; the others are zeroed in place."""
        for states in (self.conv_states, self.ssm_states):
            for i, t in enumerate(states):
                if t.requires_grad:
                    states[i] = torch.zeros(t.shape, dtype=t.dtype, device=t.device)
                else:
                    t.zero_()
        self.seqlen_offset = 0
        self.broken = None

    def check(self, model: torch.nn.Module, batch_size: int) -> None:
        """Raise a clear error if this cache does not fit ``model`` and a batch of ``batch_size``."""
        if not isinstance(self, MambaCache):  # called as MambaCache.check(obj, ...)
            raise TypeError(
                "past_key_values must be a MambaCache (from model.allocate_cache or forward(use_cache=True)), "
                f"got {type(self).__name__}"
            )
        if self.broken:
            raise ValueError(
                f"past_key_values: {self.broken}; call cache.reset() and read the context again, or allocate a new one"
            )
        cfg = model.cfg
        # the model itself, or a wrapper of it (torch.compile's _orig_mod, DDP's / FSDP's module)
        owners = (model, getattr(model, "_orig_mod", None), getattr(model, "module", None))
        if self.owner is not None and not any(self.owner() is m for m in owners if m is not None):
            raise ValueError(
                "past_key_values: this cache was allocated by another model (it decodes with that model's "
                "weights); allocate one with this model's allocate_cache, or call cache.refresh(model)"
            )
        if len(self) != cfg.n_layer:
            raise ValueError(f"past_key_values: cache has {len(self)} layers, the model has {cfg.n_layer}")
        if self.batch_size != batch_size:
            raise ValueError(
                f"past_key_values: cache was allocated for batch {self.batch_size}, got batch {batch_size}"
            )
        want_conv, want_ssm = (cfg.d_inner, cfg.d_conv), (cfg.d_inner, cfg.d_state)
        if tuple(self.conv_states[0].shape[1:]) != want_conv or tuple(self.ssm_states[0].shape[1:]) != want_ssm:
            raise ValueError("past_key_values: cache state shapes do not match the model config")


def model_step_args(model: torch.nn.Module, params: list[tuple]) -> tuple | None:
    """Arguments of the fused C++ decoding step and prefill (``openlm_mamba_cpu::model_step`` /
    ``model_prefill``: every layer in one call, no Python between ops) after the states, or None
    where they do not apply: they cover CPU float32 models with RMSNorm and the C++ kernels built;
    the others take ``MambaMixer.step`` and the per-layer prefill."""
    from .model import RMSNorm
    from .ops.cpp import use_cpp

    backbone = model.model.backbone
    norms = [layer.norm for layer in backbone.layers] + [backbone.norm_f]
    tensors = [t for p in params for t in p if isinstance(t, torch.Tensor)] + [n.weight for n in norms]
    if (
        # one C++ call computes what the projections would only for plain ones (wrapped / hooked ones come as
        # modules in params, for the Python step to call)
        any(isinstance(t, torch.nn.Module) for p in params for t in p)
        or not all(type(n) is RMSNorm for n in norms)
        or len({n.eps for n in norms}) != 1
        or not all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)
        or not use_cpp(norms[-1].weight)
    ):
        return None
    weights, biases = [], []
    for layer, (in_w, in_b, conv_w, conv_b, x_w, _split, dt_w, A, D, dt_bias, out_w, out_b) in zip(
        backbone.layers, params
    ):
        weights += [layer.norm.weight.detach(), in_w.detach(), conv_w.detach(), x_w.detach(), dt_w.detach(), A, D]
        weights += [dt_bias, out_w.detach()]
        biases += [None if b is None else b.detach() for b in (in_b, conv_b, out_b)]
    return weights, biases, backbone.norm_f.weight.detach(), float(norms[0].eps), model.cfg.dt_rank_value


def _check_number(name: str, value, lo: float, hi: float, lo_open: bool, hi_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"generate: {name} must be a finite number, got {value!r}")
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"generate: {name} must be in {interval}, got {value!r}")
    return float(value)


def _as_index(value) -> int | None:
    """``value`` as a Python int if it is an integer scalar (int, numpy integer, 0-d or 1-element integer
    tensor; not bool), else None."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # Python / numpy bools are not token ids
        return None
    if isinstance(value, torch.Tensor) and (value.dtype == torch.bool or value.is_floating_point()):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _eos_tensor(eos_token_id, vocab: int, device) -> torch.Tensor | None:
    """EOS ids as a 1-D long tensor (None for none): an int-like scalar (int, numpy integer, 0-d tensor) or a
    list / tuple / 1-D tensor or array of them, as transformers accepts."""
    if eos_token_id is None:
        return None
    bad = ValueError(
        f"generate: eos_token_id must be an int (or a list / 1-D tensor of ints) in [0, {vocab}), got {eos_token_id!r}"
    )
    single = _as_index(eos_token_id) if not isinstance(eos_token_id, torch.Tensor) or eos_token_id.dim() == 0 else None
    if single is not None:
        items = [single]
    elif isinstance(eos_token_id, (str, bytes)) or getattr(eos_token_id, "ndim", 1) != 1:
        raise bad
    else:
        try:
            items = [_as_index(i) for i in eos_token_id]
        except TypeError:  # not iterable
            raise bad from None
    if any(i is None or not 0 <= i < vocab for i in items):
        raise bad
    return torch.tensor(items, dtype=torch.long, device=device) if items else None


class _Sampler:
    """Logits -> next token with transformers' processing order: repetition penalty, temperature, top-k, top-p.

    Bit-for-bit the choices of transformers' processors and ``torch.multinomial`` with the same
    generator, without their O(vocab log vocab) parts where that is exact: the penalty touches only
    the seen tokens, and with top-k on, top-p sorts the k survivors instead of the whole vocabulary
    (~1 ms a token at a 50k vocabulary on CPU).
    """

    def __init__(self, do_sample, temperature, top_k, top_p, repetition_penalty, vocab, generator):
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_k = top_k if 0 < top_k < vocab else 0
        self.top_p = top_p
        self.penalty = repetition_penalty
        self.vocab = vocab
        self.generator = generator
        self.history: torch.Tensor | None = None  # (batch, n) long: tokens in prompt + output

    def observe(self, tokens: torch.Tensor) -> None:
        """Record tokens (batch, n) for the repetition penalty."""
        if self.penalty == 1.0:
            return
        self.history = tokens if self.history is None else torch.cat([self.history, tokens], dim=1)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        scores = logits
        if self.history is not None:  # transformers' RepetitionPenaltyLogitsProcessor, on the seen tokens
            # on the padded width: a prompt may hold ids past the vocabulary (never sampled after the slice)
            seen = scores.gather(1, self.history)
            seen = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
            scores = scores.scatter(1, self.history, seen)
        scores = scores[:, : self.vocab]
        if not self.do_sample:
            return scores.argmax(dim=-1)
        if self.temperature != 1.0:
            scaled = scores / self.temperature
            if self.temperature < 1e-4:  # a row can overflow to inf (then NaN): it takes the max-subtracted form
                safe = (scores - scores.amax(dim=-1, keepdim=True)) / self.temperature
                scaled = torch.where(torch.isfinite(scaled).all(dim=-1, keepdim=True), scaled, safe)
            scores = scaled
        top = None
        if self.top_k:
            top = torch.topk(scores, self.top_k, dim=-1)
            scores = scores.masked_fill(scores < top.values[:, -1:], float("-inf"))
        if self.top_p < 1.0:
            scores = self._top_p(scores, top)
        probs = scores.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)

    def _top_p(self, scores: torch.Tensor, top) -> torch.Tensor:
        """transformers' TopPLogitsWarper: drop the least likely tokens holding at most 1 - top_p of the mass."""
        inf = float("-inf")
        if top is not None and self._exactly_k_distinct(scores, top.values):
            # the ascending sort of `scores` is (vocab - k) x -inf, then the k survivors ascending:
            # build it directly (same values in the same places, so the same softmax and cumsum bits)
            k = top.values.shape[1]
            asc_values, asc_ids = top.values.flip(-1), top.indices.flip(-1)
            sorted_scores = torch.full_like(scores, inf)
            sorted_scores[:, -k:] = asc_values
            cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)[:, -k:]
            drop = cum <= 1.0 - self.top_p
            drop[:, -1] = False  # always keep the most likely token
            return scores.scatter(1, asc_ids, asc_values.masked_fill(drop, inf))
        sorted_scores, order = torch.sort(scores, dim=-1)  # ascending
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= 1.0 - self.top_p
        drop_sorted[:, -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(1, order, drop_sorted)
        return scores.masked_fill(drop, inf)

    @staticmethod
    def _exactly_k_distinct(scores: torch.Tensor, values: torch.Tensor) -> bool:
        """True when top-k left exactly k finite scores per row, all distinct (no tie for a sort to order)."""
        k = values.shape[1]
        return bool(
            torch.isfinite(values).all()
            and (values[:, 1:] != values[:, :-1]).all()
            and ((scores > float("-inf")).sum(dim=-1) == k).all()
        )


def check_settings(
    max_new_tokens: int, do_sample: bool, temperature: float, top_k: int | None, top_p: float, repetition_penalty: float
) -> tuple[float, int, float, float]:
    """Validate decoding settings (clear errors); returns normalised (temperature, top_k, top_p, repetition_penalty)."""
    given_max = max_new_tokens
    max_new_tokens = _as_index(max_new_tokens)  # numpy / 0-d tensor integers too, as for eos_token_id
    if max_new_tokens is None or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {given_max!r}")
    if not isinstance(do_sample, bool):
        raise TypeError(f"generate: do_sample must be a bool, got {do_sample!r}")
    given_k = top_k
    top_k = 0 if top_k is None else _as_index(top_k)
    if top_k is None or top_k < 0:
        raise ValueError(f"generate: top_k must be an int >= 0 (0 or None disables it), got {given_k!r}")
    # greedy ignores temperature and top_p, but an impossible value is still a mistake (temperature 0 is the
    # usual way to ask for greedy decoding, so it passes then)
    temperature = _check_number("temperature", temperature, 0.0, math.inf, do_sample, True)
    top_p = _check_number("top_p", top_p, 0.0, 1.0, True, False)
    repetition_penalty = _check_number("repetition_penalty", repetition_penalty, 0.0, math.inf, True, True)
    return temperature, top_k, top_p, repetition_penalty


OUT_CHUNK = 256  # new-token columns generate() allocates at first; the buffer doubles when full


GRAPH_MIN_TOKENS = 8  # cuda_graph=None captures the decoding step from this many new tokens up


_CAPTURE_LOCK = threading.Lock()  # one capture at a time in this process (other threads' work is unaffected)


class _GraphedStep:
    """The one-token decoding step of every layer captured in one CUDA graph, replayed once per token.

    Eager decoding on a GPU is launch-bound (each layer is about fifteen small kernels, each launched
    from Python). The graph is captured on ``cache``'s tensors after the prompt, so it reads and
    updates them in place exactly as the eager step does; the capture's warm-up step is undone.
    Needs autograd off (``generate`` runs under inference mode): the differentiable step would
    rebind the cache's states instead of updating them in place.
    """

    def __init__(self, model: torch.nn.Module, cache: MambaCache, batch: int, device: torch.device):
        if torch.is_grad_enabled():
            raise RuntimeError("_GraphedStep: capture the decoding step with autograd off (torch.inference_mode())")
        self.cache, self.device = cache, device
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        states = (*cache.conv_states, *cache.ssm_states)
        saved, offset = [t.clone() for t in states], cache.seqlen_offset
        try:
            with _CAPTURE_LOCK, torch.cuda.device(device):
                side = torch.cuda.Stream()  # warm-up and capture off the default stream, on this device
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    model.forward_with_cache(self.ids, cache)  # kernel builds, cuBLAS workspaces
                torch.cuda.current_stream().wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                # thread_local: a concurrent generate() in another thread may still allocate and synchronise
                with torch.cuda.graph(self.graph, stream=side, capture_error_mode="thread_local"):
                    self.logits = model.forward_with_cache(self.ids, cache)[0][:, -1]
        finally:
            for t, s in zip(states, saved):
                t.copy_(s)
            cache.seqlen_offset = offset

    def __call__(self, tok: torch.Tensor) -> torch.Tensor:
        """Logits (batch, vocab) after ``tok`` (batch, 1); valid until the next call."""
        self.ids.copy_(tok)
        with torch.cuda.device(self.device):
            self.graph.replay()
        self.cache.seqlen_offset += 1
        return self.logits


def _graphed_step_or_none(
    model: torch.nn.Module, cache: MambaCache, batch: int, device: torch.device, cuda_graph: bool | None
) -> _GraphedStep | None:
    """The captured step; where the capture fails, None (decode eagerly, with a warning) unless the caller
    asked for the graph (``cuda_graph=True``), which gets the error."""
    try:
        return _GraphedStep(model, cache, batch, device)
    except Exception as exc:
        if cuda_graph:
            raise
        warnings.warn(
            f"generate: capturing the decoding step in a CUDA graph failed ({type(exc).__name__}: {exc}); "
            "decoding eagerly (pass cuda_graph=False to skip the attempt)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _check_cuda_graph(cuda_graph, device: torch.device) -> None:
    """Clear errors for a ``cuda_graph`` argument that is not True / False / None, or True off a CUDA device."""
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise TypeError(f"generate: cuda_graph must be True, False or None, got {cuda_graph!r}")
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"generate: cuda_graph=True needs input_ids on a CUDA device, got {device}")
    if cuda_graph and torch.is_autocast_enabled("cuda"):
        raise ValueError(
            "generate: cuda_graph=True under torch.autocast: a graph would keep autocast's cached weight casts "
            "past the autocast region; cast the model (model.to(dtype)) instead, or pass cuda_graph=None / False"
        )


def _graph_wanted(
    cuda_graph: bool | None, device: torch.device, cache: MambaCache, max_new_tokens: int, model: torch.nn.Module
) -> bool:
    """Whether to decode through a CUDA graph: ``cuda_graph`` if given, else (None) on a CUDA device for at
    least GRAPH_MIN_TOKENS new tokens, outside torch.compile and autocast, and where no module has forward
    hooks (a replay would skip them: they would run at the capture only)."""
    if cuda_graph is not None:
        return cuda_graph
    return (
        device.type == "cuda"
        and max_new_tokens >= GRAPH_MIN_TOKENS
        and cache.fused is None
        and not torch.is_autocast_enabled("cuda")
        and not torch.compiler.is_compiling()
        and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    )


def _stream_fns(streamer) -> tuple[Callable | None, Callable | None, Callable | None]:
    """(on_prompt, on_token, on_end) for ``streamer``: a callable gets each new token tensor; an object with
    ``put`` / ``end`` (transformers' BaseStreamer, e.g. TextStreamer) gets what transformers' generate gives it."""
    if streamer is None:
        return None, None, None
    if callable(streamer):
        return None, streamer, None
    if callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None)):
        return (lambda ids: streamer.put(ids.cpu())), (lambda tok: streamer.put(tok.cpu())), streamer.end
    raise TypeError(
        "generate: streamer must be a callable (called with each new (batch,) token tensor) or an object with "
        f"put() and end() (transformers' BaseStreamer, e.g. TextStreamer), got {type(streamer).__name__}"
    )


def _check_cache(cache, model: torch.nn.Module, batch: int, device: torch.device, backend: str | None) -> None:
    """Clear errors for a ``cache`` argument that generate() cannot continue from (or not with ``backend``)."""
    if not isinstance(cache, MambaCache):
        raise TypeError(f"generate: cache must be a MambaCache (model.allocate_cache), got {type(cache).__name__}")
    try:
        cache.check(model, batch)
    except ValueError as e:
        raise ValueError("generate: " + str(e).replace("past_key_values: ", "")) from None
    check_prompt_backend(model, device)  # the prompt runs the model's backend, as without a cache
    if backend is not None:
        wanted = dispatch.requested_backend(backend)
        if wanted not in ("auto", cache.backend):
            raise ValueError(
                f"generate: backend={backend!r}, but the cache decodes with {cache.backend!r} (chosen when it was "
                f"allocated): pass model.allocate_cache(batch, backend={backend!r}), or leave backend unset"
            )
    states = (*cache.conv_states, *cache.ssm_states)
    if states and states[0].device != device:
        raise ValueError(f"generate: the cache is on {states[0].device}, the prompt on {device}")
    if any(t.requires_grad for t in states):
        raise ValueError(
            "generate: the cache holds states recorded by autograd (decoded with gradients on); continue it under "
            "torch.no_grad(), or allocate the cache and prefill it without gradients"
        )


@contextlib.contextmanager
def _reading_into(cache: MambaCache | None) -> Iterator[None]:
    """Code that reads tokens into the caller's ``cache``: if it raises, the cache holds an unknown part of that
    call, so it is marked broken (refused until ``reset()``). None: a cache of generate's own, nothing to mark."""
    try:
        yield
    except BaseException as e:
        if cache is not None:
            cache.broken = (
                f"this cache was left part-way by a generate() call that stopped with {type(e).__name__} "
                f"({cache.seqlen_offset} tokens read into it)"
            )
        raise


def _prompt_rows(prompts: Sequence, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of any lengths (a list of 1-D token sequences) as a left-padded (batch, longest) tensor (pads 0)
    and its attention mask."""
    rows = []
    for i, row in enumerate(prompts):
        want = f"generate: prompt {i} must be a non-empty 1-D sequence of token ids (tokenize text first)"
        if isinstance(row, (str, bytes)):
            raise TypeError(f"{want}, got {type(row).__name__}")
        try:
            t = row if isinstance(row, torch.Tensor) else torch.as_tensor(row)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{want}, got {type(row).__name__} ({e})") from None
        if t.dim() == 0:
            raise ValueError(f"{want}, got the single id {row!r}: one prompt is [[...]] or a tensor, not a flat list")
        if t.dim() != 1 or t.numel() == 0 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{want}, got {tuple(t.shape)} {t.dtype}")
        rows.append(t)
    if not rows:
        raise ValueError("generate: the list of prompts is empty")
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r.to(device=device, dtype=torch.long)
        mask[i, width - len(r) :] = True
    return ids, mask


def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor | Sequence[Sequence[int] | torch.Tensor],
    max_new_tokens: int = 50,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = 50,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | torch.Tensor | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    cache: MambaCache | None = None,
    streamer: Callable[[torch.Tensor], None] | Any | None = None,
    backend: str | None = None,
    cuda_graph: bool | None = None,
) -> torch.Tensor:
    """Continue ``input_ids`` (batch, prompt_len) by up to ``max_new_tokens`` tokens; returns prompt + new tokens.

    Greedy (``do_sample=False``) or sampling with ``temperature``, ``top_k`` (0/None: off; 50 is
    transformers' default), ``top_p`` in (0, 1] and ``repetition_penalty`` (transformers' semantics
    and order). Each sequence stops at one of ``eos_token_id`` (an int, numpy integer or 0-d tensor, or a
    list / 1-D tensor of them); finished rows are filled with ``pad_token_id`` (default: the first EOS id)
    until all are done. ``seed`` or ``generator``
    makes sampling reproducible. Logits over padded vocabulary rows (ids >= ``cfg.vocab_size``) are never
    sampled. Token ids may be any integer dtype (the output is int64).

    Prompts of different lengths: pass them left-padded with an ``attention_mask`` (0 at padding, as a
    tokenizer with ``padding_side="left"`` returns them), or as a list of 1-D token sequences, which is
    left-padded with ``pad_token_id`` here. Padding never reaches the recurrent state: greedy decoding continues
    each row exactly as its prompt alone would (the repetition penalty ignores pads too). Sampling draws every
    row from one generator, as transformers does, so a row's sample also depends on the rows beside it. The
    output keeps the pads.

    ``cache``: continue from a :class:`MambaCache` (``model.allocate_cache(batch)``) instead of empty states,
    and leave in it the state after every token of the returned sequence (the last new one included): the
    next call with the same cache continues the conversation without reading it again. With
    ``max_new_tokens=0`` the prompt is only read into the cache (a shared prefix; ``cache.clone()`` forks it).
    Padding is allowed only before the first tokens of an empty cache; the repetition penalty sees this
    call's tokens only.

    ``streamer``: a callable is called with each new (batch,) token tensor as soon as it is chosen (never
    with the prompt). An object with ``put()`` and ``end()`` (transformers' ``BaseStreamer``, e.g.
    ``TextStreamer(tokenizer)``) is driven as transformers' generate drives it: ``put`` gets the prompt ids
    (batch, prompt_len) first (``TextStreamer(..., skip_prompt=True)`` leaves them out), then each new token
    tensor, on the CPU, and ``end()`` is called once decoding stops.

    ``backend``: the backend of the per-token decoding step (the ``selective_state_update`` op): "auto",
    "torch" or "triton". None takes the model's backend (``model.set_backend``), else
    $OPENLM_MAMBA_BACKEND, else auto; such a default that the step lacks ("cuda": mamba_ssm's scan) leaves
    the step to auto. An explicit backend that cannot run the step here ("cuda", or "triton" on CPU
    without the interpreter) raises ``BackendUnavailableError``. The prompt always runs the model's own
    backend, which must run on the prompt's device.

    ``cuda_graph``: decode through one CUDA graph of the whole step (a single launch per token instead of
    about fifteen per layer), captured once per call. None (default): on a CUDA device when ``max_new_tokens``
    >= 8, outside autocast and where no module has forward hooks; a failed capture then falls back to eager
    decoding with a warning. True: always (a CUDA device is required; a failed capture raises). False: never.
    The graph replays the eager step's kernels: the tokens are the same (tests/test_gpu.py).
    """
    if not hasattr(model, "forward_with_cache") or not hasattr(model, "allocate_cache"):
        raise TypeError(f"generate: model must be an openlm_mamba MambaLM, got {type(model).__name__}")
    listed = isinstance(input_ids, (list, tuple))
    if listed:
        if attention_mask is not None:
            raise ValueError("generate: a list of prompts is padded here; pass it without an attention_mask")
        input_ids, attention_mask = _prompt_rows(input_ids, model.model.backbone.embedding.weight.device)
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(
            f"generate: input_ids must be a torch.Tensor or a list of prompts, got {type(input_ids).__name__}"
        )
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 1:
            attention_mask = attention_mask.unsqueeze(0)
    input_ids = model.check_input_ids(input_ids)
    batch, prompt_len = input_ids.shape
    if batch == 0 or prompt_len == 0:
        raise ValueError(
            f"generate: input_ids must hold at least one token per sequence, got shape {tuple(input_ids.shape)}"
        )
    temperature, top_k, top_p, repetition_penalty = check_settings(
        max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty
    )
    max_new_tokens = operator.index(max_new_tokens)  # checked above: a numpy integer becomes an int
    if seed is not None and generator is not None:
        raise ValueError("generate: pass either seed or generator, not both")
    _check_cuda_graph(cuda_graph, input_ids.device)
    if seed is not None:
        given_seed, seed = seed, _as_index(seed)
        if seed is None:
            raise ValueError(f"generate: seed must be an int, got {given_seed!r}")
    if cache is not None:
        _check_cache(cache, model, batch, input_ids.device, backend)
    mask = None
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"generate: attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
        cached = 0 if cache is None else cache.seqlen_offset
        try:
            mask = padding_mask(attention_mask, batch, prompt_len, cached, right=False)
        except ValueError as e:
            if listed and cached:  # the mask is ours, made from the list's lengths: say what the caller did
                raise ValueError(
                    "generate: prompts of different lengths continue a cache that already holds tokens; only a "
                    "fresh cache (or none) takes left-padded prompts: pass equal-length prompts to continue"
                ) from None
            raise ValueError(str(e).replace("MambaLM: ", "generate: ")) from None
        if mask is not None:
            mask = mask.to(input_ids.device)
            if not bool(mask.any(1).all()):
                row = int(mask.any(1).logical_not().nonzero()[0, 0])
                raise ValueError(f"generate: attention_mask row {row} is all padding: a prompt needs a token")
    vocab = model.cfg.vocab_size
    device = input_ids.device
    eos = _eos_tensor(eos_token_id, vocab, device)
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if eos is not None else 0
    else:
        pad = _as_index(pad_token_id)
        if pad is None or not 0 <= pad < model.vocab_size:
            raise ValueError(f"generate: pad_token_id must be an int in [0, {model.vocab_size}), got {pad_token_id!r}")
        pad_token_id = pad
    if listed and mask is not None:
        input_ids.masked_fill_(mask.logical_not(), pad_token_id)
    on_prompt, on_token, on_end = _stream_fns(streamer)
    if do_sample and generator is None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    sampler = _Sampler(do_sample, temperature, top_k, top_p, repetition_penalty, vocab, generator)

    if max_new_tokens == 0:
        if cache is not None:  # read the prompt into the cache
            with torch.inference_mode(), _reading_into(cache):
                model.forward_with_cache(input_ids, cache, last_only=True, mask=mask)
        if on_end is not None:
            on_prompt(input_ids)
            on_end()
        return input_ids.to(torch.long, copy=True)
    with torch.inference_mode():
        # the output grows in chunks (doubling): max_new_tokens is a limit, not an allocation
        cap = min(max_new_tokens, OUT_CHUNK)
        out = torch.empty(batch, prompt_len + cap, dtype=torch.long, device=device)
        out[:, :prompt_len] = input_ids
        keep = cache is not None
        if not keep:
            cache = model.allocate_cache(batch, device=device, backend=backend)
        if on_prompt is not None:
            on_prompt(input_ids)
        with _reading_into(cache if keep else None):
            logits = model.forward_with_cache(input_ids, cache, last_only=True, mask=mask)[0][:, -1]
            # pads count as the row's last prompt token (always real): already seen, so penalised no more
            sampler.observe(input_ids if mask is None else torch.where(mask, input_ids, input_ids[:, -1:]))
            graph = _graph_wanted(cuda_graph, device, cache, max_new_tokens, model)
            step = None
            finished = torch.zeros(batch, dtype=torch.bool, device=device) if eos is not None else None
            n = 0
            while True:
                tok = sampler(logits)
                if finished is not None:
                    tok = tok.masked_fill(finished, pad_token_id)
                if n == cap:
                    cap = min(max_new_tokens, 2 * cap)
                    grown = torch.empty(batch, prompt_len + cap, dtype=torch.long, device=device)
                    grown[:, : prompt_len + n] = out
                    out = grown
                out[:, prompt_len + n] = tok
                n += 1
                if on_token is not None:
                    on_token(tok)
                if finished is not None:
                    finished |= torch.isin(tok, eos)
                    if bool(finished.all()):
                        break
                if n == max_new_tokens:
                    break
                tok = tok.unsqueeze(1)
                sampler.observe(tok)
                if graph and step is None:  # captured after the first token is out, so it does not delay it
                    step = _graphed_step_or_none(model, cache, batch, device, cuda_graph)
                    graph = step is not None
                logits = model.forward_with_cache(tok, cache)[0][:, -1] if step is None else step(tok)
            if keep:  # the caller's cache: take in the last new token too, so it holds the whole output
                tok = tok.view(batch, 1)
                model.forward_with_cache(tok, cache) if step is None else step(tok)
    if on_end is not None:
        on_end()
    return out[:, : prompt_len + n].clone()  # a normal tensor, not an inference-mode one
