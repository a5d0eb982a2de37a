"""Mamba-1 language model (the architecture of TRI's Mamba-7B), free of OpenLM.

MambaLM -> MambaLMHeadModel (`.model`) -> MambaBackbone (`.backbone`) -> ResidualBlock (`.layers`)
-> MambaMixer (`.mixer`). The nesting gives state-dict keys identical to upstream OpenLM's
Mamba wrapper around mamba_ssm's ``MambaLMHeadModel``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ConfigError, MambaConfig
from .ops import add_norm, causal_conv1d, dispatch, selective_scan
from .ops.causal_conv1d import causal_conv1d_step_ref, causal_conv1d_update
from .ops.cpp import use_cpp
from .ops.state_update import selective_state_step_ref

if TYPE_CHECKING:
    from .generation import MambaCache


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` runs forward hooks of its own. (Global module hooks are left out: tools such
    as FlopCounterMode install them to observe, and they would turn every fast path off.)"""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _backbone_hooked(backbone: nn.Module) -> bool:
    """Whether a module that the per-layer path calls (a block, its norm, its mixer and the mixer's projections;
    the final norm) runs hooks of its own: then only that path computes what a plain forward computes (the
    fused calls and the flat decoding step run none). It reads the ``_modules`` dicts, not attributes or
    ``modules()``: this runs per token (~5 us for 4 layers, where ``modules()`` took 64)."""
    if _hooked(backbone._modules["norm_f"]):
        return True
    for layer in backbone._modules["layers"]._modules.values():
        while True:  # the block, through FSDP / activation-checkpoint wrappers (their hooks count too)
            if _hooked(layer):
                return True
            inner = layer._modules.get("_fsdp_wrapped_module") or layer._modules.get("_checkpoint_wrapped_module")
            if inner is None:
                break
            layer = inner
        for child in layer._modules.values():  # the norm and the mixer
            if child is None:
                continue
            if _hooked(child):
                return True
            for part in child._modules.values():  # the mixer's projections, conv
                if part is not None and _hooked(part):
                    return True
    return False


def plain_linear(module: nn.Module) -> bool:
    """Whether ``F.linear(x, module.weight, module.bias)`` is what calling ``module`` computes: a plain
    ``nn.Linear`` without hooks (not a LoRA wrapper, a quantized layer or a hooked one). The inference fast
    paths read such layers' weights directly; any other layer is called as a module. (A ``forward`` set on the
    instance, as accelerate's hooks do, counts as a wrapper too.)"""
    return type(module) in _PLAIN_LINEARS and not _hooked(module) and "forward" not in module.__dict__


def _project(x: torch.Tensor, w, b: torch.Tensor | None) -> torch.Tensor:
    """A projection from :meth:`MambaMixer.step_params`: its weight and bias, or the layer itself."""
    return w(x) if isinstance(w, nn.Module) else F.linear(x, w, b)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or float64 as it is: 16-bit parameters do float32 math, float64 ones lose nothing."""
    return t if t.dtype == torch.float64 else t.float()


class RMSNorm(nn.Module):
    """RMSNorm weight holder; the math lives in ``ops.add_norm`` (fused with the residual add)."""

    backend: str | None = None  # set by MambaLM.set_backend

    def __init__(self, d: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(d, device=device, dtype=dtype))
        self.bias = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, residual_in_fp32: bool = True):
        backend = dispatch.for_op("add_norm", self.backend)
        return add_norm(x, self.weight, None, residual, self.eps, residual_in_fp32, is_rms_norm=True, backend=backend)


class LayerNorm(nn.LayerNorm):
    """LayerNorm with the same fused ``(x, residual) -> (normed, new residual)`` interface."""

    backend: str | None = None  # set by MambaLM.set_backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, residual_in_fp32: bool = True):
        backend = dispatch.for_op("add_norm", self.backend)
        return add_norm(
            x, self.weight, self.bias, residual, self.eps, residual_in_fp32, is_rms_norm=False, backend=backend
        )


class DtProj(nn.Linear):
    """dt projection initialised by the Mamba recipe (softplus(bias) log-uniform in [dt_min, dt_max])."""

    def __init__(self, cfg: MambaConfig, device=None, dtype=None):
        self._cfg = cfg
        super().__init__(cfg.dt_rank_value, cfg.d_inner, bias=True, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        cfg = self._cfg
        std = cfg.dt_rank_value**-0.5 * cfg.dt_scale
        self.bias._no_reinit = True  # mamba_ssm's marker: a generic re-init must keep the dt recipe
        with torch.no_grad():
            if cfg.dt_init == "constant":
                nn.init.constant_(self.weight, std)
            else:
                nn.init.uniform_(self.weight, -std, std)
            u = torch.rand(cfg.d_inner, device=self.bias.device, dtype=torch.float32)
            dt = torch.exp(u * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
            dt = dt.clamp(min=cfg.dt_init_floor)
            self.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus


class OutProj(nn.Linear):
    """Output projection: default init rescaled by 1/sqrt(n_layer) (GPT-2 prenorm-residual recipe)."""

    def __init__(self, cfg: MambaConfig, device=None, dtype=None):
        self._cfg = cfg
        super().__init__(cfg.d_inner, cfg.d_model, bias=cfg.bias, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self._cfg.rescale_prenorm_residual:
            with torch.no_grad():
                self.weight /= math.sqrt(self._cfg.n_layer)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class ZeroBiasLinear(nn.Linear):
    """nn.Linear whose bias (if any) starts at zero, as mamba_ssm's ``_init_weights`` does."""

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.bias is not None:
            nn.init.zeros_(self.bias)


_PLAIN_LINEARS = (nn.Linear, OutProj, ZeroBiasLinear, DtProj)  # the init-only subclasses compute F.linear


class MambaMixer(nn.Module):
    """The Mamba-1 selective SSM mixer (in_proj -> conv1d -> SSM -> gate -> out_proj)."""

    def __init__(self, cfg: MambaConfig, layer_idx: int = 0, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.backend: str | None = None
        di, n, r = cfg.d_inner, cfg.d_state, cfg.dt_rank_value
        self.in_proj = ZeroBiasLinear(cfg.d_model, 2 * di, bias=cfg.bias, **kw)
        self.conv1d = nn.Conv1d(di, di, cfg.d_conv, groups=di, padding=cfg.d_conv - 1, bias=cfg.conv_bias, **kw)
        self.x_proj = nn.Linear(di, r + 2 * n, bias=False, **kw)
        self.dt_proj = DtProj(cfg, **kw)
        self.A_log = nn.Parameter(torch.empty(di, n, device=device, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(di, device=device, dtype=torch.float32))
        self.out_proj = OutProj(cfg, **kw)
        self.reset_parameters()

    def mark_parameters(self) -> None:
        """mamba_ssm's markers, for trainers that honour them (OpenLM's optimizer groups do not): no weight decay
        on A_log and D, no generic re-init of the dt bias. New Parameter objects (materialising from the meta
        device, ``load_state_dict(assign=True)``) lack them, so they are set again then."""
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        if self.dt_proj.bias is not None:
            self.dt_proj.bias._no_reinit = True

    def reset_parameters(self) -> None:
        """Initialise the parameters this module owns directly (A_log = log(1..N), D = 1)."""
        self.mark_parameters()
        with torch.no_grad():
            n = self.cfg.d_state
            a = torch.arange(1, n + 1, dtype=torch.float32, device=self.A_log.device)
            self.A_log.copy_(torch.log(a).expand_as(self.A_log))
            self.D.fill_(1.0)

    def ssm_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """From conv output x (batch, d_inner, L): delta (batch, d_inner, L), A, B and C (batch, N, L)."""
        r, n = self.cfg.dt_rank_value, self.cfg.d_state
        x_dbl = self.x_proj(x.transpose(1, 2))  # (batch, L, r + 2N)
        dt, B, C = torch.split(x_dbl, [r, n, n], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # bias is added inside the scan
        A = -torch.exp(_wide(self.A_log))
        return delta, A, B.transpose(1, 2), C.transpose(1, 2)

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor | None = None, cached: list | None = None
    ) -> torch.Tensor:
        """hidden (batch, L, d_model) -> (batch, L, d_model). ``mask`` (batch, L), 0 at padding: the padded
        positions' conv inputs and SSM inputs are zeroed (see :func:`padding_mask`). ``cached``: ``[conv_state,
        ssm_state, fresh, last_only]`` to run :meth:`forward_cached` instead (a cache's prefill, called as a module
        so that hooks on the mixer run); its two states are replaced by the new ones."""
        if cached is not None:
            out, cached[0], cached[1] = self.forward_cached(hidden, cached[0], cached[1], cached[2], cached[3], mask)
            return out
        # split the time-major projection, then transpose: the backward then concatenates time-major
        # gradients (one copy) instead of channel-major ones plus a transposing copy
        x, z = (t.transpose(1, 2) for t in self.in_proj(hidden).chunk(2, dim=-1))  # (batch, d_inner, L)
        conv_w = self.conv1d.weight.squeeze(1)
        x = _masked(x, mask)
        x = _masked(causal_conv1d(x, conv_w, self.conv1d.bias, activation="silu", backend=self.backend), mask)
        delta, A, B, C = self.ssm_inputs(x)
        y = selective_scan(
            x,
            delta,
            A,
            B,
            C,
            _wide(self.D),
            z=z,
            delta_bias=_wide(self.dt_proj.bias),
            delta_softplus=True,
            backend=self.backend,
        )
        return self.out_proj(y.transpose(1, 2))

    def forward_cached(
        self,
        hidden: torch.Tensor,
        conv_state: torch.Tensor,
        ssm_state: torch.Tensor,
        fresh: bool,
        last_only=False,
        mask: torch.Tensor | None = None,
    ):
        """Prefill: like ``forward`` but starting from the layer's cached states; returns
        ``(out, conv_state, ssm_state)`` with the states after ``hidden``.

        conv_state (batch, d_inner, d_conv) holds the last d_conv conv inputs, newest last;
        ssm_state (batch, d_inner, d_state) float32. ``fresh``: the cache holds no tokens yet.
        ``last_only``: the output of the last position only (batch, 1, d_model); the gate z and the
        output projection are then computed for that position alone. ``mask``: as in :meth:`forward`
        (left padding of a fresh cache's first tokens leaves the states as if the pads were absent).

        The states given are updated in place and returned, unless the new ones take part in autograd
        (autograd on and a parameter, the input or a state requiring grad): then new tensors of the same
        dtypes are returned and the given ones are left as they were, since writing a graph's tensors in
        place would break (or silently corrupt) its backward. The caller stores what is returned.
        """
        if last_only and plain_linear(self.in_proj):
            di, w, b = self.cfg.d_inner, self.in_proj.weight, self.in_proj.bias
            x = F.linear(hidden, w[:di], None if b is None else b[:di]).transpose(1, 2)
            z = F.linear(hidden[:, -1:], w[di:], None if b is None else b[di:]).transpose(1, 2)
        elif last_only:  # a wrapped / hooked in_proj is called as a module (z needed at the last position only)
            x, z = self.in_proj(hidden).chunk(2, dim=-1)
            x, z = x.transpose(1, 2), z[:, -1:].transpose(1, 2)
        else:
            x, z = (t.transpose(1, 2) for t in self.in_proj(hidden).chunk(2, dim=-1))
        conv_w = self.conv1d.weight.squeeze(1)
        width = conv_w.shape[1]
        init = None if fresh else conv_state[:, :, 1:].to(x.dtype)
        x, final = causal_conv1d(
            _masked(x, mask),
            conv_w,
            self.conv1d.bias,
            init,
            return_final_states=True,
            activation="silu",
            backend=self.backend,
        )
        x = _masked(x, mask)
        delta, A, B, C = self.ssm_inputs(x)
        y, last = selective_scan(
            x,
            delta,
            A,
            B,
            C,
            _wide(self.D),
            z=None if last_only else z,
            delta_bias=_wide(self.dt_proj.bias),
            delta_softplus=True,
            return_last_state=True,
            initial_state=None if fresh else ssm_state,
            backend=self.backend,
        )
        if final.requires_grad or last.requires_grad:  # new states, part of the graph (contiguous, as allocated:
            # the fused C++ step reads them as such)
            conv_state = torch.cat([conv_state[:, :, :1], final.to(conv_state.dtype)], dim=-1).contiguous()
            ssm_state = last.to(ssm_state.dtype).contiguous()
        else:
            if width > 1:
                conv_state[:, :, 1:].copy_(final)
            ssm_state.copy_(last)
        if last_only:
            y = (y[:, :, -1:].float() * F.silu(z.float())).to(y.dtype)
        return self.out_proj(y.transpose(1, 2)), conv_state, ssm_state

    def step_params(self, detach: bool = True) -> tuple:
        """Tensors one decoding step needs, gathered once per cache (weights by reference; A = -exp(A_log),
        D and dt_bias as float32 copies). ``detach=False``: the derived ones computed under the current
        autograd mode, so gradients reach A_log, D and dt_proj.bias (the differentiable step). An in_proj,
        x_proj or out_proj that is not a plain ``nn.Linear`` (a LoRA wrapper, a quantized or hooked layer)
        comes as the layer itself, with None for its bias, and the step calls it."""

        def proj(layer: nn.Module) -> tuple:
            return (layer.weight, layer.bias) if plain_linear(layer) else (layer, None)

        with torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
            A = -torch.exp(self.A_log.float())
            r, n = self.cfg.dt_rank_value, self.cfg.d_state
            return (
                *proj(self.in_proj),
                self.conv1d.weight.squeeze(1),
                self.conv1d.bias,
                proj(self.x_proj)[0],
                [r, n, n],
                self.dt_proj.weight,
                A,
                self.D.float(),
                self.dt_proj.bias.float(),
                *proj(self.out_proj),
            )

    @staticmethod
    def step(hidden: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, params, state_update):
        """One decoding step: hidden (batch, d_model) -> (batch, d_model); updates both states in place.

        ``params`` come from :meth:`step_params`; ``state_update`` is a resolved
        ``selective_state_update`` backend (no per-step argument checks).
        """
        in_w, in_b, conv_w, conv_b, x_w, split, dt_w, A, D, dt_bias, out_w, out_b = params
        x, z = _project(hidden, in_w, in_b).chunk(2, dim=-1)  # (batch, d_inner) each
        x = causal_conv1d_update(x, conv_state, conv_w, conv_b, "silu")
        dt, B, C = torch.split(_project(x, x_w, None), split, dim=-1)
        y = state_update(ssm_state, x, F.linear(dt, dt_w), A, B, C, D, z, dt_bias, True)
        return _project(y, out_w, out_b)

    @staticmethod
    def step_autograd(hidden: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, params):
        """:meth:`step` for autograd: the same math in differentiable PyTorch ops, nothing written in place;
        returns ``(out, conv_state, ssm_state)`` with new contiguous states of the given states' dtypes.

        ``params`` from ``step_params(detach=False)``, so gradients reach every parameter.
        """
        in_w, in_b, conv_w, conv_b, x_w, split, dt_w, A, D, dt_bias, out_w, out_b = params
        x, z = _project(hidden, in_w, in_b).chunk(2, dim=-1)
        x, new_conv = causal_conv1d_step_ref(x, conv_state, conv_w, conv_b, "silu")
        dt, B, C = torch.split(_project(x, x_w, None), split, dim=-1)
        y, new_ssm = selective_state_step_ref(ssm_state, x, F.linear(dt, dt_w), A, B, C, D, z, dt_bias, True)
        return _project(y, out_w, out_b), new_conv.contiguous(), new_ssm.to(ssm_state.dtype).contiguous()


def step_norm(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None, residual_in_fp32: bool):
    """``add_norm`` for one decoding step (batch, d_model), as few kernels as possible; same math."""
    if x.dtype == torch.float64:
        return norm(x, residual, residual_in_fp32)
    r = x.float() if residual is None else x.float() + residual.float()
    if isinstance(norm, RMSNorm):
        out = F.rms_norm(r, r.shape[-1:], norm.weight.float(), norm.eps)
    else:
        bias = None if norm.bias is None else norm.bias.float()
        out = F.layer_norm(r, (r.shape[-1],), norm.weight.float(), bias, norm.eps)
    return out.to(x.dtype), (r if residual_in_fp32 else r.to(x.dtype))


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x (batch, channels, L) with the positions where mask (batch, L) is 0 zeroed (x itself without a mask)."""
    return x if mask is None else x * mask.unsqueeze(1).to(x.dtype)


def padding_mask(
    attention_mask: torch.Tensor | None, batch: int, seqlen: int, cached: int = 0, right: bool = True
) -> torch.Tensor | None:
    """Check an attention mask for ``seqlen`` new tokens after ``cached`` ones; returns it as a (batch, seqlen)
    bool tensor, or None when it masks nothing.

    Shape (batch, seqlen), or (batch, cached + seqlen) as transformers passes it while decoding (only the last
    seqlen columns are the new tokens'). Values 0 / 1 (or bool). Each row must be a run of real tokens with
    padding only before it (left padding) or, where ``right``, after it: a padded position's conv and SSM
    inputs are zeroed, so the states the real tokens see are those of the unpadded sequence (left padding)
    and outputs at real positions equal the unpadded sequence's. Holes inside a row cannot be made exact in
    a recurrence and are refused, as is padding of tokens that continue a cache (``cached`` > 0).
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"MambaLM: attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    widths = (seqlen, cached + seqlen) if cached else (seqlen,)
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] not in widths:
        also = f" or ({batch}, {cached + seqlen}): cached + new tokens" if cached else ""
        raise ValueError(
            f"MambaLM: attention_mask must have shape ({batch}, {seqlen}){also}, got {tuple(attention_mask.shape)}"
        )
    m = attention_mask[:, attention_mask.shape[1] - seqlen :]
    if m.dtype != torch.bool:
        if m.is_complex() or not bool(((m == 0) | (m == 1)).all()):
            raise ValueError("MambaLM: attention_mask values must be 0 (padding) or 1 (token)")
        m = m != 0
    if bool(m.all()):
        return None
    if cached:
        raise ValueError(
            "MambaLM: attention_mask pads tokens that continue a cached sequence; only a prompt's first tokens "
            "(left padding, fresh cache) can be padding"
        )
    if seqlen < 2:
        return m
    step = m.to(torch.int8).diff(dim=1)  # +1 where a run of tokens starts, -1 where it ends
    starts, ends = (step == 1).sum(1), (step == -1).sum(1)
    # a start after the end: tokens, a hole, tokens
    hole = (starts > 1) | (ends > 1) | ((starts == 1) & (ends == 1) & (step.argmax(1) > step.argmin(1)))
    trailing = torch.zeros_like(hole) if right else ends > 0
    for bad, why in (
        (hole, "a run of tokens with padding only around it: a pad between tokens would still decay the state"),
        (
            trailing,
            "padding only before the tokens (left padding): pads after them would decay the state the next "
            "tokens start from (pad on the left: padding_side='left')",
        ),
    ):
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"MambaLM: attention_mask row {row} is {m[row].to(torch.int8).tolist()}; a recurrent model needs {why}"
            )
    return m


# token id dtypes forward accepts; int32 / int64 index the embedding as they are, the others are cast to int64
_INTEGER_DTYPES = (torch.int64, torch.int32, torch.uint8, torch.int8, torch.int16)
_INTEGER_DTYPES += tuple(getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n))


def _symbolic(t: torch.Tensor) -> bool:
    """A tensor without values to read (meta, or a FakeTensor of shape inference): no range check, no fused
    C++ kernel."""
    if t.is_meta:
        return True
    try:
        from torch._subclasses.fake_tensor import FakeTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, FakeTensor)


def _index_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """Token ids as the embedding takes them: int32 / int64 unchanged, other integer dtypes as int64."""
    return input_ids if input_ids.dtype in (torch.int64, torch.int32) else input_ids.long()


def _fused_cpu_inference(hidden: torch.Tensor) -> bool:
    """Whether the fused C++ step / prefill may run on these activations: CPU float32, no autograd,
    no autocast (the module path honours it), not under torch.compile. The model must fit them
    too (``MambaCache.fused``: RMSNorm, float32 weights, the C++ kernels built)."""
    return (
        hidden.device.type == "cpu"
        and not _symbolic(hidden)
        and hidden.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


_EMB_KEY, _HEAD_KEY = "model.backbone.embedding.weight", "model.lm_head.weight"


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    ptr = a.data_ptr()  # 0 for tensors without local storage (DTensor, FSDP2): compare the values then
    if a is b or (ptr != 0 and ptr == b.data_ptr() and a.stride() == b.stride()):
        return True
    if bool(torch.equal(a, b)):  # DTensors too
        return True
    plain = type(a) is torch.Tensor and type(b) is torch.Tensor and a.is_floating_point()
    return plain and bool(torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True))  # NaN where the other has NaN


def _state_entry(state_dict, key: str):
    """``state_dict[key]``, also under wrapper prefixes (``module.``, ``_orig_mod.``, FSDP's: OpenLM strips those
    in a hook that runs after this model's own)."""
    if key in state_dict:
        return state_dict[key]
    from .convert.common import strip_wrappers

    return next((v for k, v in state_dict.items() if k.endswith(key) and strip_wrappers(k) == key), None)


def _refuse_distinct_head_when_tied(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: into a model that ties its LM head to the embedding, a state dict whose two
    differ (an untied checkpoint) would load one over the other silently; say so instead. (A checkpoint of
    another size is left to torch, or OpenLM's shape check, to name.)"""
    if not module.cfg.tie_embeddings:
        return
    emb, head = _state_entry(state_dict, prefix + _EMB_KEY), _state_entry(state_dict, prefix + _HEAD_KEY)
    if not isinstance(emb, torch.Tensor) or not isinstance(head, torch.Tensor):
        return
    if emb.shape != module.model.backbone.embedding.weight.shape or emb.shape != head.shape:
        return
    if emb.is_meta or head.is_meta or _same_values(emb, head):
        return
    raise ValueError(
        f"MambaLM: the state dict holds a {_HEAD_KEY} that differs from its {_EMB_KEY}, but this model ties "
        "them (tie_embeddings): one would overwrite the other. Build the model with tie_embeddings=False for "
        "an untied checkpoint"
    )


def _retie_after_load(module, incompatible_keys) -> None:
    """load_state_dict post-hook: ``assign=True`` (and loading after ``to_empty()`` without
    ``reset_parameters()``) leaves the embedding and the LM head two parameters; tie them again, and restore
    the parameters' optimizer markers (``_no_weight_decay``, ``_no_reinit``), which new parameters lack."""
    if _fsdp_managed_layers(module):
        return
    for m in module.modules():
        if isinstance(m, MambaMixer):
            m.mark_parameters()
    emb, head = module.model.backbone.embedding, module.model.lm_head
    if not module.cfg.tie_embeddings or head.weight is emb.weight or not isinstance(emb.weight, nn.Parameter):
        return
    if not emb.weight.is_meta and _same_values(emb.weight, head.weight):
        head.weight = emb.weight


def _fsdp_managed_layers(model: nn.Module) -> bool:
    """Whether FSDP wraps the layers: their weights are then gathered only inside each layer's own forward, so
    code that reads them directly (the fused prefill) must not run."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without FSDP
        return False
    return any(isinstance(layer, (FullyShardedDataParallel, FSDPModule)) for layer in model.layers)


PREFILL_ROWS = 1024  # (batch x tokens) per fused prefill call: long prompts run ~15% faster in slices
_prefill_workspace = threading.local()  # per thread: the fused prefill's activations, kept between calls


def _fused_prefill(hidden: torch.Tensor, cache, last_only: bool, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill of a CPU float32 model (``cache.fused`` set): every layer in one C++ call per slice of
    ``PREFILL_ROWS`` rows, the slices in order through the cache. hidden (batch, L, d_model)
    embeddings -> final-norm output, (batch, 1, d_model) with ``last_only``.

    The activations live in a per-thread buffer kept between calls, since fresh allocations would
    page-fault on every prompt; it holds at most ``PREFILL_ROWS`` rows of about 3 d_model +
    5 d_inner floats. Batches above 16 (slices of at least 64 tokens) take a buffer of their own.
    ``mask``: (batch, L) bool from :func:`padding_mask`, False at padding (None: none)."""
    batch, L = hidden.shape[:2]
    step = max(64, -(-PREFILL_ROWS // batch))
    keep = batch * min(step, L) <= PREFILL_ROWS
    ws = getattr(_prefill_workspace, "buf", None) if keep else None
    if ws is None:
        with torch.inference_mode(False):  # a normal tensor: usable inside and outside inference mode
            ws = torch.empty(0)
        if keep:
            _prefill_workspace.buf = ws
    outs = []
    for s in range(0, L, step):
        part = hidden[:, s : s + step].contiguous()
        fresh = cache.seqlen_offset == 0 and s == 0
        # a row padded past this slice has seen only pads: its state is still zero, so masking stays exact
        pads = None if mask is None else mask[:, s : s + step].float().contiguous()
        out = torch.ops.openlm_mamba_cpu.model_prefill(
            part, cache.conv_states, cache.ssm_states, *cache.fused, fresh, last_only, ws, pads
        )
        if not last_only:
            outs.append(out)
    if last_only:
        return out.unsqueeze(1)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


class ResidualBlock(nn.Module):
    """Pre-norm residual block: (hidden, residual) -> (mixer(norm(hidden + residual)), hidden + residual)."""

    def __init__(self, cfg: MambaConfig, layer_idx: int = 0, device=None, dtype=None):
        # Not super().__init__(): a subclass may also derive from open_lm's Block (see openlm.py),
        # whose __init__ takes other arguments.
        nn.Module.__init__(self)
        self.layer_idx = layer_idx
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.mixer = MambaMixer(cfg, layer_idx, device=device, dtype=dtype)
        self.norm = _make_norm(cfg, device=device, dtype=dtype)

    def reset_parameters(self) -> None:  # owns no parameters directly; children reset themselves
        pass

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None = None,
        cache=None,
        last_only=False,
        mask: torch.Tensor | None = None,
    ):
        """(hidden, residual) -> (mixer output, new residual); with a ``cache``, prefill from and into it,
        and with ``last_only`` as well, return the last position only (the cache still sees all).
        ``mask``: (batch, L) bool, False at padding (:func:`padding_mask`)."""
        normed, residual = self.norm(hidden, residual, self.residual_in_fp32)
        if cache is None:
            # keywords: a pre-hook that returns new positional args (the one-argument form) keeps the mask
            return (self.mixer(normed) if mask is None else self.mixer(normed, mask=mask)), residual
        i, fresh = self.layer_idx, cache.seqlen_offset == 0  # prefill; single steps go through MambaMixer.step
        slot = [cache.conv_states[i], cache.ssm_states[i], fresh, last_only]
        # as a module, so hooks on the mixer run; the slot and the mask as keywords, so a pre-hook that returns new
        # positional args (as the plain forward's one-argument call invites) keeps them
        out = self.mixer(normed, cached=slot) if mask is None else self.mixer(normed, mask=mask, cached=slot)
        cache.conv_states[i], cache.ssm_states[i] = slot[0], slot[1]
        return out, (residual[:, -1:] if last_only else residual)


def _make_norm(cfg: MambaConfig, device=None, dtype=None) -> nn.Module:
    if cfg.rms_norm:
        return RMSNorm(cfg.d_model, eps=cfg.norm_epsilon, device=device, dtype=dtype)
    return LayerNorm(cfg.d_model, eps=cfg.norm_epsilon, device=device, dtype=dtype)


class TiedEmbedding(nn.Embedding):
    """Token embedding (normal init, std = initializer_range) that keeps a tied LM head tied.

    ``to_empty()`` (meta-device materialisation, e.g. by FSDP) replaces parameters and so breaks
    weight tying; ``reset_parameters`` ties the head again after initialising.
    """

    def __init__(self, num: int, dim: int, std: float, device=None, dtype=None):
        self._std = std
        self._tied_heads: list[nn.Module] = []
        super().__init__(num, dim, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.normal_(self.weight, std=self._std)
        for head in self._tied_heads:
            head.weight = self.weight


class LMHead(nn.Linear):
    """Output projection to the (padded) vocabulary; shares the embedding weight when tied."""

    def __init__(self, d_model: int, vocab: int, embedding: TiedEmbedding | None, device=None, dtype=None):
        self._embedding = [embedding] if embedding is not None else []  # list: not a submodule
        super().__init__(d_model, vocab, bias=False, device=device, dtype=dtype)
        if embedding is not None:
            embedding._tied_heads.append(self)
            self.weight = embedding.weight

    def reset_parameters(self) -> None:
        if not self._embedding:
            super().reset_parameters()
        elif not self._embedding[0].weight.is_meta:
            self.weight = self._embedding[0].weight  # re-tie after a materialisation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits; a decoding step's few rows on CPU (float32, no autograd) take the C++ ``head_rows``, which
        streams the weight once at memory speed (MKL's sgemv for this shape was 6x slower on AMD EPYC)."""
        w = self.weight
        if (
            x.dim() >= 2
            and x.numel() <= 16 * x.shape[-1]
            and w.numel() >= 1 << 18
            and _fused_cpu_inference(x)  # CPU float32 values, no autograd, autocast or compile
            and w.dtype == torch.float32
            and w.device.type == "cpu"
            and torch.autograd.forward_ad._current_level < 0  # forward-mode AD (jvp) needs the linear layer's formula
            and not torch._C._functorch.is_functorch_wrapped_tensor(x)
            and type(w) in (torch.Tensor, nn.Parameter)
            and use_cpp(x)
        ):
            rows = x.reshape(-1, x.shape[-1])
            return torch.ops.openlm_mamba_cpu.head_rows(rows, w).view(*x.shape[:-1], w.shape[0])
        return super().forward(x)


class MambaBackbone(nn.Module):
    def __init__(self, cfg: MambaConfig, block_cls: type[ResidualBlock], device=None, dtype=None):
        super().__init__()
        self.embedding = TiedEmbedding(cfg.padded_vocab_size, cfg.d_model, cfg.initializer_range, device, dtype)
        self.layers = nn.ModuleList(block_cls(cfg, i, device=device, dtype=dtype) for i in range(cfg.n_layer))
        self.norm_f = _make_norm(cfg, device=device, dtype=dtype)


class MambaLMHeadModel(nn.Module):
    def __init__(self, cfg: MambaConfig, block_cls: type[ResidualBlock], device=None, dtype=None):
        super().__init__()
        self.backbone = MambaBackbone(cfg, block_cls, device=device, dtype=dtype)
        tied = self.backbone.embedding if cfg.tie_embeddings else None
        self.lm_head = LMHead(cfg.d_model, cfg.padded_vocab_size, tied, device=device, dtype=dtype)


def _config_from_dict(data: dict) -> MambaConfig:
    """A config given as a dict: ``MambaConfig.from_dict(data, require_all=False)`` (the fields of
    ``MambaConfig(**data)``, checked), with a clear error for missing required fields."""
    required = [f.name for f in dataclasses.fields(MambaConfig) if f.default is dataclasses.MISSING]
    missing = [k for k in required if k not in data]
    if missing:
        raise ConfigError(
            f"MambaLM: a config dict must give {', '.join(required)} (the other fields have defaults, as in "
            f"MambaConfig(**d)); missing {', '.join(missing)}. Or pass a MambaConfig, a shipped config name or a "
            "JSON path"
        )
    return MambaConfig.from_dict({"name": "custom", **data}, source="MambaLM(config dict)", require_all=False)


class MambaLM(nn.Module):
    """Mamba-1 language model following OpenLM's model contract.

    ``forward(input_ids) -> (logits float32 (batch, seq, padded vocab), hidden, None)``.

    ``cfg``: a :class:`MambaConfig`, a shipped config name or a JSON path (``MambaConfig.load``), or a
    dict of MambaConfig fields (``MambaConfig.from_dict(d, require_all=False)``: like ``MambaConfig(**d)``).
    """

    def __init__(
        self,
        cfg: MambaConfig | str | Path | dict,
        block_cls: type[ResidualBlock] = ResidualBlock,
        backend: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if isinstance(cfg, dict):
            cfg = _config_from_dict(cfg)
        elif isinstance(cfg, (str, os.PathLike)):
            cfg = MambaConfig.load(cfg)
        elif not isinstance(cfg, MambaConfig):
            raise TypeError(
                "MambaLM: cfg must be a MambaConfig, a shipped config name (e.g. 'mamba_tiny'), a JSON config path "
                f"or a dict of MambaConfig fields, got {type(cfg).__name__}"
            )
        self.cfg = cfg
        self.vocab_size = cfg.padded_vocab_size
        self.seq_len = cfg.seq_len
        self.grad_checkpointing = False
        self.model = MambaLMHeadModel(cfg, block_cls, device=device, dtype=dtype)
        self.set_backend(backend)
        self.register_load_state_dict_pre_hook(_refuse_distinct_head_when_tied)
        self.register_load_state_dict_post_hook(_retie_after_load)

    # -- OpenLM contract ---------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """(Re)initialise every parameter with the Mamba recipe; works after ``to_empty()``."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each residual block's activations in the backward pass."""
        self.grad_checkpointing = enable

    def set_backend(self, backend: str | None) -> None:
        """Force an op backend ("torch", "triton", "cuda") for every layer and norm; None = auto / env. Ops
        without the backend named (add_norm and the decoding step have no "cuda") take auto."""
        if backend is not None:
            dispatch.requested_backend(backend)  # a clear error for an unknown name, now rather than at forward
        for module in self.modules():
            if isinstance(module, (MambaMixer, RMSNorm, LayerNorm)):
                module.backend = backend

    @property
    def layers(self) -> nn.ModuleList:
        """The residual blocks, first to last (``model.backbone.layers``)."""
        return self.model.backbone.layers

    def check_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Raise a clear error for ids that are not integer tokens in [0, vocab_size); returns them as an index
        tensor: int32 / int64 as given, other integer dtypes (uint8, int16, ...) cast to int64. bool and
        floating-point tensors are refused."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in _INTEGER_DTYPES:
            got = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise TypeError(f"MambaLM: input_ids must be an integer tensor, got {got}")
        if input_ids.dim() != 2:
            raise ValueError(f"MambaLM: input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}")
        unsigned64 = input_ids.dtype == torch.uint64
        input_ids = _index_ids(input_ids)
        if input_ids.numel() and not torch.compiler.is_compiling() and not _symbolic(input_ids):
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.vocab_size:
                bad = lo if lo < 0 else hi
                bad += 2**64 if unsigned64 and bad < 0 else 0  # the id as given: int64 wrapped it
                raise ValueError(f"MambaLM: token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        return input_ids

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: MambaCache | None = None,
        use_cache: bool = False,
        attention_mask: torch.Tensor | None = None,
        inference_params: MambaCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, MambaCache | None]:
        """Training: ``forward(input_ids) -> (logits, hidden, None)``.

        Incremental decoding (OpenLM's interface): ``use_cache=True`` and/or
        ``past_key_values=cache`` (a :class:`~openlm_mamba.generation.MambaCache`; also accepted
        as ``inference_params``) runs the new tokens from the cached recurrent state and returns
        ``(logits, hidden, cache)`` with the cache updated (its states replaced by new tensors
        instead of written in place where autograd records them, so gradients flow through
        cached decoding as through the full forward).
        """
        cache = past_key_values if past_key_values is not None else inference_params
        if cache is not None or use_cache or inputs_embeds is not None or attention_mask is not None:
            return self._forward_cached(input_ids, inputs_embeds, cache, use_cache, attention_mask)
        input_ids = _index_ids(input_ids) if torch.compiler.is_compiling() else self.check_input_ids(input_ids)
        return self._forward_full(self.model.backbone.embedding(input_ids))

    def _forward_full(self, hidden: torch.Tensor, mask: torch.Tensor | None = None):
        """Every layer over embeddings ``hidden`` (batch, L, d_model) from zero states: (logits, hidden, None).
        ``mask``: from :func:`padding_mask` (None: no padding)."""
        backbone = self.model.backbone
        if (
            hidden.numel() > 0
            and _fused_cpu_inference(hidden)
            and not _fsdp_managed_layers(self)
            and not _backbone_hooked(backbone)
        ):  # (hooks: the module path below runs them; the fused call would not)
            # scoring / evaluation on CPU: the fused prefill from zero states, when the model fits it
            cache = self.allocate_cache(hidden.shape[0])
            if cache.fused is not None:
                hidden = _fused_prefill(hidden, cache, last_only=False, mask=mask)
                return _wide(self.model.lm_head(hidden)), hidden, None
        residual = None
        extra = () if mask is None else (None, False, mask)  # the blocks' cache, last_only and mask arguments
        for layer in backbone.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                hidden, residual = checkpoint(layer, hidden, residual, *extra, use_reentrant=False)
            else:
                hidden, residual = layer(hidden, residual, *extra)
        hidden, _ = backbone.norm_f(hidden, residual, True)
        logits = _wide(self.model.lm_head(hidden))
        return logits, hidden, None

    # -- inference -----------------------------------------------------------------------------------
    def allocate_cache(
        self,
        batch_size: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str | None = None,
    ) -> MambaCache:
        """A zeroed recurrent cache for ``batch_size`` sequences (see ``openlm_mamba.generation.MambaCache``)."""
        from .generation import MambaCache

        return MambaCache.allocate(self, batch_size, dtype=dtype, device=device, backend=backend)

    def _forward_cached(self, input_ids, inputs_embeds, cache, use_cache, attention_mask):
        from .generation import MambaCache

        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("MambaLM: pass exactly one of input_ids and inputs_embeds")
        weight = self.model.backbone.embedding.weight
        if input_ids is not None:
            input_ids = self.check_input_ids(input_ids)
            batch, seqlen = input_ids.shape
        else:
            if not isinstance(inputs_embeds, torch.Tensor):
                raise TypeError(f"MambaLM: inputs_embeds must be a torch.Tensor, got {type(inputs_embeds).__name__}")
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.cfg.d_model:
                raise ValueError(
                    f"MambaLM: inputs_embeds must have shape (batch, seq, {self.cfg.d_model}), "
                    f"got {tuple(inputs_embeds.shape)}"
                )
            if inputs_embeds.dtype != weight.dtype and not torch.is_autocast_enabled(inputs_embeds.device.type):
                raise TypeError(
                    f"MambaLM: inputs_embeds has dtype {inputs_embeds.dtype} but the model's weights are "
                    f"{weight.dtype}: pass inputs_embeds.to({weight.dtype}) (or run under torch.autocast)"
                )
            batch, seqlen = inputs_embeds.shape[:2]
        cached = getattr(cache, "seqlen_offset", 0) if cache is not None else 0
        # a cache will be decoded from: its prompt may be padded on the left only
        mask = padding_mask(attention_mask, batch, seqlen, cached, right=cache is None and not use_cache)
        if mask is not None:
            device = weight.device if inputs_embeds is None else inputs_embeds.device
            mask = mask.to(device)
        if cache is None and not use_cache:  # inputs_embeds / attention_mask alone: the plain forward
            hidden = self.model.backbone.embedding(input_ids) if inputs_embeds is None else inputs_embeds
            return self._forward_full(hidden, mask)
        if cache is None:
            emb_dtype = inputs_embeds.dtype if inputs_embeds is not None else weight.dtype
            cache = self.allocate_cache(batch, dtype=emb_dtype, device=weight.device)
        elif not isinstance(cache, MambaCache):
            raise TypeError(
                "past_key_values must be a MambaCache (from model.allocate_cache or forward(use_cache=True)), "
                f"got {type(cache).__name__}"
            )
        else:
            cache.check(self, batch)
        if seqlen == 0:
            raise ValueError("MambaLM: input_ids must hold at least one token when decoding with a cache")
        logits, hidden = self.forward_with_cache(input_ids, cache, embeds=inputs_embeds, mask=mask)
        return logits, hidden, cache

    def forward_with_cache(self, input_ids, cache, embeds=None, last_only: bool = False, mask=None, head=True):
        """Run new tokens from ``cache`` (no argument checks); returns (logits, hidden): logits float32 (float64
        for a float64 model), None without ``head`` (for a caller that needs them at a few positions only).

        One token (seq length 1) takes the O(1) recurrent step; longer inputs run the scan from the
        cached state (prefill). ``last_only`` computes logits (and returns hidden) for the last
        position only, and skips the last layer's output projection elsewhere. ``mask``: a left-padded
        first prompt's mask from :func:`padding_mask` (None: no padding), on the tokens' device.
        """
        backbone = self.model.backbone
        hidden = backbone.embedding(input_ids) if embeds is None else embeds
        seqlen = hidden.shape[1]
        # hooks on a layer, mixer or norm: only the per-layer modules below run them (one token included)
        hooked = _backbone_hooked(backbone)
        fused = cache.fused is not None and _fused_cpu_inference(hidden) and not hooked
        one = seqlen == 1 and mask is None and not hooked  # a padded token takes the prefill (the step cannot mask)
        if one and fused:
            # the O(1) recurrent step of a CPU float32 model: every layer in one C++ call
            x = hidden[:, 0].contiguous()
            hidden = torch.ops.openlm_mamba_cpu.model_step(x, cache.conv_states, cache.ssm_states, *cache.fused)
            hidden = hidden.unsqueeze(1)
        elif one and self._step_needs_grad(hidden, cache):
            # the step with autograd: differentiable ops and live parameters (cache.params hold detached
            # copies), the new states stored in the cache instead of written in place
            hidden, residual = hidden[:, 0], None
            for i, layer in enumerate(backbone.layers):
                normed, residual = step_norm(layer.norm, hidden, residual, layer.residual_in_fp32)
                hidden, cache.conv_states[i], cache.ssm_states[i] = MambaMixer.step_autograd(
                    normed, cache.conv_states[i], cache.ssm_states[i], layer.mixer.step_params(detach=False)
                )
            hidden = step_norm(backbone.norm_f, hidden, residual, True)[0].unsqueeze(1)
        elif one:  # the O(1) recurrent step: a flat loop, no per-layer module calls
            hidden, residual = hidden[:, 0], None
            step, update = MambaMixer.step, cache.state_update
            for layer, conv, ssm, params in zip(backbone.layers, cache.conv_states, cache.ssm_states, cache.params):
                normed, residual = step_norm(layer.norm, hidden, residual, layer.residual_in_fp32)
                hidden = step(normed, conv, ssm, params, update)
            hidden = step_norm(backbone.norm_f, hidden, residual, True)[0].unsqueeze(1)
        elif fused:
            hidden = _fused_prefill(hidden, cache, last_only, mask)
        else:
            residual, n = None, len(backbone.layers)
            for i, layer in enumerate(backbone.layers):
                hidden, residual = layer(hidden, residual, cache, last_only and i == n - 1, mask)
            hidden, _ = backbone.norm_f(hidden, residual, True)
        cache.seqlen_offset += seqlen
        if not head:
            return None, hidden
        head_in = hidden[:, -1:] if last_only else hidden
        return _wide(self.model.lm_head(head_in)), hidden

    def _step_needs_grad(self, hidden: torch.Tensor, cache) -> bool:
        """Whether a decoding step must be differentiable: autograd on, and the input, a parameter or a cached
        state requires grad."""
        if not torch.is_grad_enabled():
            return False
        return (
            hidden.requires_grad
            or any(p.requires_grad for p in self.parameters())
            or any(t.requires_grad for t in (*cache.conv_states, *cache.ssm_states))
        )

    def num_parameters(self) -> int:
        """Unique parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())
