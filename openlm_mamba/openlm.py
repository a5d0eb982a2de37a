"""Everything that touches OpenLM (`open_lm`): config registry, ``create_model`` hook, FSDP block class.

Importing this module imports ``open_lm.model``; the rest of the package never imports it, so
``openlm_mamba`` works without OpenLM. :func:`register` is idempotent and is normally run for
you by the post-import hook that the installed ``.pth`` file arms (see ``_autoload.py``).

What :func:`register` changes, all in memory (OpenLM's files stay untouched):

* ``open_lm.model._MODEL_CONFIGS`` gains our ``model_configs/*.json`` (ours replace upstream's
  four-field ``mamba_*`` entries of the same name), also after a later ``_rescan_model_configs()``.
* ``open_lm.model.create_model`` builds :class:`~openlm_mamba.model.MambaLM` for a Mamba config
  (a registered name whose JSON says ``"model_type": "mamba"``, or ``--model path/to/x.json``
  with that marker); any other model goes to OpenLM's own ``create_model``.
* Each residual layer is an :class:`OpenLMMambaBlock`, a subclass of ``open_lm.model.Block``, so
  OpenLM's unmodified FSDP wrap policy makes every layer its own FSDP unit.
* Compatibility shims, in memory: FSDP full-state-dict saving, DDP and a clean gloo exit on
  CPU-only machines (:func:`_patch_cpu_distributed`), webdataset's end-of-shard marker in OpenLM's tar reader
  (:func:`_patch_wds_eof_marker`), numpy scalars in OpenLM's optimizer checkpoints under torch's
  ``weights_only`` loading (:func:`_allow_numpy_scalars_in_checkpoints`), and tied weights averaged once per
  step by ``--averagers`` (:func:`_average_tied_weights_once`). Each docstring says what fails without it.
* Clear errors instead of OpenLM's or torch's raw ones, for a Mamba model: checkpoints of another size or
  layer count (:func:`_check_shapes_hook`), ``--pretrained`` / ``--resume`` given a directory or an HF /
  mamba_ssm checkpoint (:func:`_check_checkpoint_arg`), and MoE or other Transformer-only options
  (:func:`_check_transformer_options`).
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import logging
import os
import re
import shlex
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_lm.model as _olm
import torch
from open_lm.model import Block as _OpenLMBlock

from .config import PARAMS_CONFIG_KEY, MambaConfig, config_dir, is_mamba_config
from .model import MambaLM, ResidualBlock

__all__ = ["OpenLMMambaBlock", "OpenLMMambaLM", "build_model", "create_model", "register", "resolve_config"]

_log = logging.getLogger(__name__)
_STATE_PREFIXES = ("module.", "_orig_mod.")


class OpenLMMambaBlock(ResidualBlock, _OpenLMBlock):
    """A Mamba residual layer that is also an ``open_lm.model.Block`` (one FSDP unit per layer).

    Only the type matters: ``ResidualBlock`` comes first in the MRO, so its ``__init__``,
    ``forward`` and ``reset_parameters`` are used and ``Block.__init__`` never runs.
    """


def our_configs() -> dict[str, dict[str, Any]]:
    """Our shipped model configs as raw JSON dicts, by name."""
    out = {}
    for path in sorted(config_dir().glob("*.json")):
        out[path.stem] = json.loads(path.read_text())
    return out


def resolve_config(model: str) -> MambaConfig | None:
    """The MambaConfig that OpenLM's ``--model`` value names, or None when it is not a Mamba config."""
    if not isinstance(model, str):
        return None
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            return None  # OpenLM reports the missing file itself
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):  # _check_model_name says what is wrong
            return None
        return MambaConfig.load(path) if is_mamba_config(data) else None
    data = _olm._MODEL_CONFIGS.get(model)
    if is_mamba_config(data):
        return MambaConfig.from_dict(data, source=f"{model}.json")
    return None


def _strip_prefixes_hook(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: accept keys saved through DDP (``module.``) or torch.compile (``_orig_mod.``)."""
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        changed = True
        while changed:
            changed = False
            for p in _STATE_PREFIXES:
                if rest.startswith(p):
                    rest, changed = rest[len(p) :], True
        if prefix + rest != key:
            state_dict[prefix + rest] = state_dict.pop(key)


def _check_shapes_hook(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: a Mamba checkpoint of another size (``--pretrained`` / ``--resume``) gets one
    error saying what the checkpoint holds and what the model is, instead of torch's list of every mismatched
    tensor (a size mismatch fails in torch with ``strict=False`` too) or every missing and unexpected key (another
    layer count, in a strict load: see :class:`OpenLMMambaLM`); so does one sharing no tensor name with the model
    (another model type), which would load nothing."""
    from .convert.common import expected_shapes, strip_wrappers

    cfg = module.cfg
    have: dict[str, tuple[int, ...]] = {}
    for key, value in state_dict.items():
        if key.startswith(prefix) and isinstance(value, torch.Tensor):
            have[strip_wrappers(key[len(prefix) :]).removeprefix("model.")] = tuple(value.shape)
    if not have:
        return
    want = expected_shapes(cfg)
    model = f"model {cfg.name!r} (d_model {cfg.d_model}, {cfg.n_layer} layers, vocabulary {cfg.padded_vocab_size})"
    if not any(k in want for k in have):  # loading would change nothing, strict or not
        kind = " (an OpenLM Transformer's, by its names)" if "tok_embeddings.weight" in have else ""
        raise ValueError(
            f"the checkpoint holds none of the tensors of {model}: its {len(have)} tensors{kind} start with "
            f"{', '.join(list(have)[:3])}. Is it a checkpoint of another model type?"
        )
    emb = have.get("backbone.embedding.weight")
    if emb is None or len(emb) != 2:  # torch names the missing and unexpected keys
        return
    layers = sorted({int(m.group(1)) for k in have if (m := re.match(r"backbone\.layers\.(\d+)\.", k))})
    n_held = max(layers) + 1 if layers else 0
    held = f"d_model {emb[1]}, {_layers(n_held)}, vocabulary {emb[0]}"
    bad = [(k, have[k], shape) for k, shape in want.items() if k in have and have[k] != shape]
    if bad:
        diffs = "; ".join(f"{k}: checkpoint {tuple(a)}, model {tuple(b)}" for k, a, b in bad[:3])
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise ValueError(
            f"the checkpoint does not fit {model}: it holds {held} (from its tensor shapes). "
            f"{_fitting_model_hint(emb[1], n_held, emb[0])} Differing tensors: {diffs}{more}"
        )
    if not getattr(module, "_openlm_mamba_strict", True) or layers == list(range(cfg.n_layer)):
        return
    partial = (  # a wrapper's load_state_dict (DDP, FSDP) does not say strict=False to this model
        " (for a deliberate partial load, call load_state_dict(..., strict=False) on the unwrapped model)"
    )
    if layers != list(range(n_held)):  # a gap: layers were dropped from the state dict
        raise ValueError(
            f"the checkpoint does not fit {model}: it holds {_layers(len(layers))}, numbered "
            f"{', '.join(map(str, layers))}: layers are missing (an incomplete or edited checkpoint?){partial}"
        )
    raise ValueError(
        f"the checkpoint does not fit {model}: it holds {_layers(n_held)}, the model {cfg.n_layer} (with the "
        f"same d_model {emb[1]} and vocabulary {emb[0]}). {_fitting_model_hint(emb[1], n_held, emb[0])}{partial}"
    )


def _layers(n: int) -> str:
    return f"{n} layer" if n == 1 else f"{n} layers"


def _fitting_model_hint(d_model: int, n_layer: int, vocab: int) -> str:
    """What to pass as --model for a checkpoint with these sizes: registered Mamba configs that have them, and
    a note when upstream OpenLM's own entry of a name we replace has them (its mamba_130m has 12 layers)."""
    fits = []
    for name, data in getattr(_olm, "_MODEL_CONFIGS", {}).items():
        if not is_mamba_config(data):
            continue
        try:
            other = MambaConfig.from_dict(data, source=f"{name}.json")
        except Exception:
            continue
        if (other.d_model, other.n_layer, other.padded_vocab_size) == (d_model, n_layer, vocab):
            fits.append(name)
    hint = f"--model {' or '.join(fits)} has those sizes." if fits else ""
    shipped = our_configs()
    for name, upstream in _UPSTREAM_REPLACED.items():
        ours = shipped.get(name, {})
        if (upstream.get("d_model"), upstream.get("n_layer")) != (d_model, n_layer) or ours.get("n_layer") == n_layer:
            continue
        hint += (
            f" Upstream OpenLM's own {name} config has d_model {d_model} and {n_layer} layers; this package's "
            f"{name}, which replaces it, follows the state-spaces model ({ours.get('n_layer')} layers): for a "
            f"checkpoint of upstream's {name}, pass --model a JSON copy of openlm-mamba's {name}.json with "
            f'"n_layer": {n_layer}.'
        )
    if not hint:
        hint = (
            f"Build the model it was trained with: --model a JSON config with d_model {d_model} and n_layer "
            f"{n_layer} (or a registered name with those sizes: openlm-mamba info lists the shipped ones)."
        )
    return hint.strip()


class OpenLMMambaLM(MambaLM):
    """The MambaLM that OpenLM builds. ``load_state_dict`` tells the shape check whether it was asked for a strict
    load: torch's pre-hooks always see ``strict=True``, and a partial load (``strict=False``, say the first
    layers of a deeper model) must stay possible. Loading through a wrapper (FSDP) counts as strict."""

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        self._openlm_mamba_strict = strict
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:
            del self._openlm_mamba_strict


def build_model(cfg: MambaConfig, backend: str | None = None) -> MambaLM:
    """A MambaLM whose layers are OpenLM Blocks, loading upstream-OpenLM Mamba checkpoints with or without prefixes."""
    model = OpenLMMambaLM(cfg, block_cls=OpenLMMambaBlock, backend=backend)
    model.register_load_state_dict_pre_hook(_strip_prefixes_hook)
    model.register_load_state_dict_pre_hook(_check_shapes_hook)
    return model


def _check_model_name(model_arg: str) -> None:
    """A clear error for a --model that is neither a registered name nor a JSON file (OpenLM's own says only
    "Pass a pre-defined open_lm model name or a json config")."""
    if not isinstance(model_arg, str):
        return
    if model_arg.endswith(".json"):
        if not Path(model_arg).is_file():
            raise ValueError(f"--model {model_arg}: no such JSON config file")
        try:
            data = json.loads(Path(model_arg).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(
                f"--model {model_arg}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
            ) from None
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--model {model_arg}: cannot read it ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(
                f"--model {model_arg}: expected a JSON object of config fields, got a {type(data).__name__}"
            )
        if {"d_state", "d_conv", "expand"} & set(data):
            if "model_type" not in data:
                raise ValueError(
                    f'--model {model_arg}: looks like a Mamba config but has no "model_type": "mamba" '
                    "(without it OpenLM reads the file as a transformer config)"
                )
            raise ValueError(
                f'--model {model_arg}: looks like a Mamba config, but "model_type" must be "mamba" (Mamba-1, '
                f"the architecture this package builds), got {data['model_type']!r}"
            )
        return
    names = sorted(getattr(_olm, "_MODEL_CONFIGS", {}))
    if model_arg in names:
        return
    close = difflib.get_close_matches(model_arg, names, n=3, cutoff=0.6)
    close += [n for n in names if n.lower() == model_arg.lower() and n not in close]
    hint = f"did you mean {', '.join(close)}?" if close else f"known names: {', '.join(names)}"
    raise ValueError(f"--model {model_arg!r} is not an OpenLM model name or a JSON config file; {hint}")


def create_model(args: argparse.Namespace, _fallback: Callable | None = None):
    """OpenLM's ``create_model(args)``: our MambaLM for Mamba configs, otherwise OpenLM's own model."""
    model_arg = args.model
    cfg = resolve_config(model_arg)
    if cfg is None:
        _check_model_name(model_arg)
        fallback = _fallback or _ORIGINAL.get("create_model")
        if fallback is None:
            raise ValueError(f"--model {model_arg!r} is not a Mamba config and OpenLM's create_model is unavailable")
        return fallback(args)
    if model_arg.endswith(".json"):
        args.model = Path(model_arg).stem  # as OpenLM's create_params does for JSON paths
        _olm._MODEL_CONFIGS[args.model] = cfg.to_dict()
    # OpenLM writes every argument to the run's params.txt: the full config there lets the converter and
    # loaders rebuild this exact model, even when a custom JSON shares a shipped config's name
    setattr(args, PARAMS_CONFIG_KEY, json.dumps({**cfg.to_dict(), "name": cfg.name}, separators=(",", ":")))
    _check_transformer_options(args, cfg)
    for flag in ("pretrained", "resume"):
        _check_checkpoint_arg(getattr(args, flag, None), f"--{flag}", cfg, model_arg)
    _avoid_inductor_cpu_half_transposes(args)
    return build_model(cfg)


def _check_transformer_options(args: argparse.Namespace, cfg: MambaConfig) -> None:
    """OpenLM's architecture options (``open_lm.params.add_model_args``) shape its Transformer only. MoE
    (``--moe-freq`` > 0) is refused: OpenLM would build the Mamba model without experts and then fail at the
    first step (``'MambaLM' object has no attribute 'dim'``, in its MoE loss setup). Any other such option set
    to a value other than its default gets one warning naming it as ignored."""
    try:
        from open_lm.params import add_model_args
    except ImportError:  # another OpenLM version: nothing to compare with
        add_model_args = None
    defaults = {}
    if add_model_args is not None:
        parser = argparse.ArgumentParser(add_help=False)
        add_model_args(parser)
        defaults = vars(parser.parse_args([]))
    moe_freq = getattr(args, "moe_freq", 0) or 0
    if moe_freq > 0:
        experts = getattr(args, "moe_num_experts", None)
        raise ValueError(
            f"--moe-freq {moe_freq}"
            + (f" --moe-num-experts {experts}" if experts is not None else "")
            + f": OpenLM's mixture-of-experts layers exist only in its Transformer; the Mamba model {cfg.name!r} "
            "has none (OpenLM would fail at the first step). Leave out the --moe-* options"
        )
    ignored = []
    for dest, default in defaults.items():
        value = getattr(args, dest, default)
        if value != default:
            flag = "--" + dest.replace("_", "-")
            ignored.append(flag if isinstance(value, bool) else f"{flag} {value}")
    if ignored:
        _log.warning(
            "%s: OpenLM Transformer options, ignored for the Mamba model %s (its architecture comes from its "
            "config only)",
            ", ".join(ignored),
            cfg.name,
        )


def _avoid_inductor_cpu_half_transposes(args: argparse.Namespace) -> None:
    """--torchcompile with 16-bit precision on a machine without CUDA: Inductor's AVX-512 C++ code for a kernel
    writing a bf16/fp16 tensor's transposed copy and its float32 one computes wrong values (NaN: "Training
    exiting due to NaN value" at step 1, seen with torch 2.13). Its 256-bit code is right, so ask for that,
    unless the user set the vector width."""
    if not getattr(args, "torchcompile", False) or getattr(args, "precision", "fp32") == "fp32":
        return
    if torch.cuda.is_available():
        return
    import torch._inductor.config as inductor_config

    if inductor_config.cpp.simdlen is not None:
        return
    inductor_config.cpp.simdlen = 256
    _log.warning(
        "--torchcompile with --precision %s on CPU: setting torch._inductor.config.cpp.simdlen = 256, since "
        "Inductor's 512-bit code for 16-bit transposed copies gives wrong values (NaN) on this torch %s",
        args.precision,
        torch.__version__,
    )


def _check_checkpoint_arg(path: Any, flag: str, cfg: MambaConfig, model_arg: str) -> None:
    """Clear errors for a --pretrained / --resume value that OpenLM's ``pt_load`` cannot read (a directory, an HF
    or mamba_ssm checkpoint), then the config warning of :func:`_warn_if_config_differs`. Remote (s3://) and
    missing paths are left to OpenLM. ``model_arg``: --model as given (a JSON path too), for the commands shown."""
    if not isinstance(path, str):
        return
    if Path(path).is_dir():
        _refuse_directory(path, flag, model_arg)
    elif Path(path).is_file():
        ckpt = _refuse_converter_file(path, flag, model_arg)
        _warn_if_config_differs(path, flag, cfg, ckpt, model_arg)


def _shell(*words: Any) -> str:
    """A command line to copy: each word quoted for the shell where it needs it (spaces in paths)."""
    return " ".join(shlex.quote(str(w)) for w in words)


def _convert_first(path: str | Path, flag: str, what: str, source: Path | None, model_arg: str) -> ValueError:
    """The error for an HF or mamba_ssm checkpoint: the convert command for ``source`` (None: no command fits)."""
    if source is None:
        how = (
            "convert it first, from its checkpoint directory (the weights with their config.json): "
            f"{_shell('openlm-mamba', 'convert', '--to', 'openlm')} DIR out.pt {_shell('--model', model_arg)}, "
            "and pass that file"
        )
    else:
        out = (source.stem if source.is_file() else source.name) + ".pt"
        command = _shell("openlm-mamba", "convert", "--to", "openlm", source, out, "--model", model_arg)
        how = f"convert it first, {command}, and pass that file"
    return ValueError(f"{flag} {path}: {what}; OpenLM loads its own .pt checkpoints: {how}")


def _refuse_directory(path: str, flag: str, model_arg: str) -> None:
    """A directory given to --pretrained / --resume (OpenLM would fail on it with a bare IsADirectoryError): an
    HF or mamba_ssm checkpoint gets the convert command, an OpenLM run (or its checkpoints/) the newest
    epoch_N.pt in it to pass instead."""
    from .convert import ConversionError, detect_format
    from .convert.openlm import find_checkpoint_file

    try:
        kind = detect_format(path)
    except ConversionError:
        kind = None
    if kind in ("hf", "mamba_ssm"):
        name = {"hf": "an HF transformers", "mamba_ssm": "a mamba_ssm"}[kind]
        raise _convert_first(path, flag, f"{name} checkpoint directory", Path(path), model_arg)
    try:
        newest = find_checkpoint_file(Path(path))
    except ConversionError as e:
        raise ValueError(f"{flag} {path}: a directory, and OpenLM loads one checkpoint file; {e}") from None
    also = ""
    run = newest.parent.parent
    if flag == "--resume" and newest.parent.name == "checkpoints" and (run / "params.txt").is_file():
        logs = ("--logs", run.parent)
        if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun takes --logs for its own --logs-specs: only the default
            logs = () if run.parent.resolve() == Path("logs").resolve() else None
        if logs is not None:
            also = f" (or continue that run: {_shell('--resume', 'latest', '--name', run.name, *logs)})"
    raise ValueError(
        f"{flag} {path}: a directory, and OpenLM loads one checkpoint file: pass the newest in it, "
        f"{_shell(flag, newest)}{also}"
    )


def _refuse_converter_file(path: str, flag: str, model_arg: str) -> Any:
    """A file given to --pretrained / --resume that OpenLM's ``torch.load`` would fail on with a raw error: a
    safetensors (or JSON, text) file, or a ``torch.save`` file whose state dict has the HF or mamba_ssm key
    layout (``backbone.*``, no ``model.``). Returns the checkpoint loaded with mmap (only its pickled structure
    is read), for the config check, or None when torch cannot load it that way (OpenLM reports why)."""
    from .convert.common import describe_file
    from .convert.hf import is_hf_dir
    from .convert.mamba_ssm import is_mamba_ssm_dir

    file = Path(path)
    folder = file.parent
    in_dir = "HF" if is_hf_dir(folder) else "mamba_ssm" if is_mamba_ssm_dir(folder) else None
    kind = describe_file(file)
    if kind is not None:
        if in_dir is not None:
            raise _convert_first(path, flag, f"{kind} of the {in_dir} checkpoint {folder}", folder, model_arg)
        if "safetensors" in kind:
            raise _convert_first(path, flag, f"{kind} (an HF or mamba_ssm checkpoint's)", None, model_arg)
        raise ValueError(
            f"{flag} {path}: {kind}, not a checkpoint: OpenLM loads the .pt files that it saves (epoch_N.pt) or "
            "that openlm-mamba convert --to openlm writes"
        )
    try:  # mmap: only the pickled structure is read, not the tensors
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # not loadable this way: OpenLM's own loading reports what is wrong
        return None
    if isinstance(ckpt, dict) and "state_dict" not in ckpt and isinstance(ckpt.get("av_model_sd"), dict):
        command = _shell(
            "openlm-mamba", "convert", "--to", "openlm", path, f"{file.stem}_weights.pt", "--model", model_arg
        )
        raise ValueError(
            f"{flag} {path}: an --averagers file (its averaged weights are under 'av_model_sd'), which OpenLM's "
            f"loading does not read: {command}, and pass that file"
        )
    layout = _foreign_layout(ckpt)
    if layout is not None:
        what = f"a state dict in {layout} layout (backbone.* keys, where OpenLM's have model.backbone.*)"
        if in_dir is not None:
            raise _convert_first(path, flag, f"{what}, of the {in_dir} checkpoint {folder}", folder, model_arg)
        raise _convert_first(path, flag, what, file if layout == "mamba_ssm" else None, model_arg)
    return ckpt


def _foreign_layout(ckpt: Any) -> str | None:
    """ "HF" or "mamba_ssm" when a loaded checkpoint's tensors have those key layouts, else None."""
    from .convert.common import strip_wrappers

    sd = ckpt.get("state_dict") if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict) else ckpt
    if not isinstance(sd, dict):
        return None
    keys = [strip_wrappers(k) for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)]
    if not keys or any(k.startswith("model.") for k in keys):
        return None
    if any(k.startswith("backbone.embeddings.") for k in keys):
        return "HF"
    if any(k.startswith("backbone.") for k in keys):
        return "mamba_ssm"
    return None


def _warn_if_config_differs(path: str, flag: str, cfg: MambaConfig, ckpt: Any, model_arg: str) -> None:
    """Warn when a checkpoint was made from a model that differs from ``cfg`` in a field its tensor shapes
    do not show (norm_epsilon, residual_in_fp32, ...): OpenLM loads the weights into ``cfg``'s model,
    silently. The checkpoint's config: the ``model_config`` our converter embeds (``ckpt`` is the checkpoint,
    loaded; None when it could not be), else the full config our hook records in its training run's
    params.txt."""
    from .convert.common import config_differences
    from .convert.openlm import _config_from_params

    if ckpt is None:  # unreadable: OpenLM's own loading reports what is wrong
        return
    embedded = ckpt.get("model_config") if isinstance(ckpt, dict) else None
    try:
        if isinstance(embedded, dict):
            theirs = MambaConfig.from_dict(embedded, source=path)
        else:
            found = _config_from_params(Path(path))
            if found is None or not found.exact:  # params.txt only names a config: nothing to compare
                return
            theirs = found.config
    except Exception:  # a damaged config: OpenLM's own loading and the shape check report what matters
        return
    diffs = [f"{label} {a!r} vs {b!r}" for label, a, b in config_differences(theirs, cfg)]
    if diffs:
        _log.warning(
            "%s %s holds a model whose config differs from --model %s (checkpoint vs --model): %s. Training uses "
            "--model's; to use the checkpoint's own config, write it with %s and pass --model its_config.json",
            flag,
            path,
            model_arg,
            "; ".join(diffs),
            _shell("openlm-mamba", "info", path, "--save-config", "its_config.json"),
        )


# ---------------------------------------------------------------------------------------------------
_ORIGINAL: dict[str, Callable] = {}
_UPSTREAM_REPLACED: dict[str, dict[str, Any]] = {}  # upstream OpenLM's entries that ours replace, by name


def _add_configs(registry: dict) -> None:
    ours = our_configs()
    for name in ours:
        if name in registry and not is_mamba_config(registry[name]):
            _UPSTREAM_REPLACED[name] = dict(registry[name])
    registry.update(ours)


def register(module: Any = None) -> None:
    """Make OpenLM build our Mamba models (idempotent). ``module`` is ``open_lm.model`` (default: import it)."""
    olm = module if module is not None else _olm
    if getattr(olm, "_openlm_mamba_registered", False):
        return
    _add_configs(olm._MODEL_CONFIGS)

    original_create = olm.create_model
    original_rescan = olm._rescan_model_configs
    _ORIGINAL["create_model"] = original_create
    _ORIGINAL["_rescan_model_configs"] = original_rescan

    def create_model_hook(args):
        return create_model(args, _fallback=original_create)

    def rescan_hook(model_config_paths=None):
        original_rescan(model_config_paths)
        if model_config_paths is None:
            _add_configs(olm._MODEL_CONFIGS)

    create_model_hook.__doc__ = create_model.__doc__
    create_model_hook.__wrapped__ = original_create
    rescan_hook.__wrapped__ = original_rescan
    olm.create_model = create_model_hook
    olm._rescan_model_configs = rescan_hook
    olm._openlm_mamba_registered = True

    main = sys.modules.get("open_lm.main")
    if main is not None and getattr(main, "create_model", None) is original_create:
        main.create_model = create_model_hook  # registered after open_lm.main was loaded (openlm_mamba.train)
    _when_imported("open_lm.main", _patch_main)
    entry = sys.modules.get("__main__")
    if getattr(getattr(entry, "__spec__", None), "name", None) == "open_lm.main":  # python/torchrun -m open_lm.main
        _patch_main(entry)
    _when_imported("open_lm.data", _patch_wds_eof_marker)
    _when_imported("open_lm.file_utils", _allow_numpy_scalars_in_checkpoints)
    _when_imported("open_lm.utils.averaging_utils", _average_tied_weights_once)
    _when_imported("open_lm.utils.averaging_utils", _start_averages_from_loaded_weights)


def _allow_numpy_scalars_in_checkpoints(file_utils: Any = None) -> None:
    """Let ``torch.load``'s default ``weights_only=True`` (torch >= 2.6) read numpy scalars.

    OpenLM's cosine scheduler (its default ``--lr-scheduler``) leaves the learning rate as a
    ``numpy.float64`` in the optimizer state, and its ``pt_load`` calls ``torch.load`` without
    ``weights_only=False``: ``--resume`` of such a run fails with "Unsupported global: GLOBAL
    numpy._core.multiarray.scalar". Numpy scalars and their dtypes hold plain numbers, nothing to run,
    so they join torch's allowlist (``torch.serialization.add_safe_globals``).
    """
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    skip = ("ObjectDType", "VoidDType", "StringDType", "StrDType", "BytesDType")  # numbers and bools only
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType") and n not in skip]
    torch.serialization.add_safe_globals([core.multiarray.scalar, np.dtype, *dtypes])


class _StateDictView:
    """Stands in for ``Averager.model`` during one update: ``state_dict()`` returns the given dict."""

    def __init__(self, state_dict: dict[str, Any]) -> None:
        self._state_dict = state_dict

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self._state_dict


def _tensor_identity(t: Any) -> tuple | None:
    """What makes two state-dict entries the same tensor (``state_dict()`` detaches, so not ``is``); None for
    tensors without storage of their own (empty, meta), which are never treated as aliases."""
    if not isinstance(t, torch.Tensor) or t.numel() == 0 or t.device.type == "meta" or t.data_ptr() == 0:
        return None
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


def _average_tied_weights_once(averaging_utils: Any) -> None:
    """Make ``--averagers`` update each distinct tensor once per step.

    OpenLM's ``Averager.update`` walks ``model.state_dict()`` and updates the averaged model's entry of
    every key in place. A tied weight (our configs tie the embedding and the LM head:
    ``model.backbone.embedding.weight`` and ``model.lm_head.weight`` are one tensor, in the deepcopied
    averaged model too) has two keys, so it was updated twice per step: EMA decayed by gamma^2 instead of
    gamma, poly took a double step. Each update now sees the model's state dict without the keys whose
    averaged tensor an earlier key already holds; the state dicts themselves, hence the averager's
    checkpoints, are unchanged. OpenLM Transformers with tied weights get the same fix.
    """
    averager = getattr(averaging_utils, "Averager", None)
    original = getattr(averager, "update", None)
    if original is None or getattr(original, "_openlm_mamba", False):
        return

    def update(self, *args, **kwargs):
        if getattr(self, "method", None) == "none":
            return original(self, *args, **kwargs)
        model = self.model
        model_sd = model.state_dict()
        av_sd = self.av_model.state_dict()
        first = next(iter(av_sd), "")
        seen: set[tuple] = set()
        once = {}
        for key, value in model_sd.items():
            av_key = key[len("module.") :] if key.startswith("module") and not first.startswith("module") else key
            ident = _tensor_identity(av_sd.get(av_key))  # OpenLM's own mapping of the keys
            if ident is not None:
                if ident in seen:
                    continue  # an alias of a tensor updated under an earlier key
                seen.add(ident)
            once[key] = value
        self.model = _StateDictView(once)
        try:
            return original(self, *args, **kwargs)
        finally:
            self.model = model

    averager.update = _mark_wrapper(update, original)


def _start_averages_from_loaded_weights(averaging_utils: Any) -> None:
    """Make ``--averagers`` start from the ``--pretrained`` weights, not from the random initialisation.

    OpenLM's ``main`` builds its averagers (a deepcopy of the model) before it loads ``--pretrained`` into the
    model, so a fine-tune's EMA began at the random weights: with lr 0 it ended 3.5 away from weights that never
    moved. An averager not yet updated nor loaded from its own checkpoint (``--resume`` loads those first) now
    takes the model's weights whenever they are loaded (a load_state_dict post-hook on the model).
    """
    averager = getattr(averaging_utils, "Averager", None)
    init, load_avg, update = (getattr(averager, n, None) for n in ("__init__", "load_state_dict_avg", "update"))
    if init is None or getattr(init, "_openlm_mamba", False):
        return
    unwrap = getattr(averaging_utils, "unwrap_model", lambda m: getattr(m, "module", m))

    def __init__(self, model, *args, **kwargs):
        init(self, model, *args, **kwargs)
        if getattr(self, "method", None) == "none" or not isinstance(model, torch.nn.Module):
            return
        self._openlm_mamba_fresh = True
        ref = weakref.ref(self)

        def take_loaded_weights(module, incompatible_keys) -> None:
            me = ref()  # (a later averager's deepcopy of the model carries this hook too: only the model's counts)
            if me is not None and getattr(me, "_openlm_mamba_fresh", False) and module is unwrap(me.model):
                with torch.no_grad():
                    unwrap(me.av_model).load_state_dict(module.state_dict())

        unwrap(model).register_load_state_dict_post_hook(take_loaded_weights)

    def load_state_dict_avg(self, *args, **kwargs):
        self._openlm_mamba_fresh = False  # its own averaged weights, from --resume
        return load_avg(self, *args, **kwargs)

    def stepped(self, *args, **kwargs):
        self._openlm_mamba_fresh = False
        return update(self, *args, **kwargs)

    for name, fn, original in (
        ("__init__", __init__, init),
        ("load_state_dict_avg", load_state_dict_avg, load_avg),
        ("update", stepped, update),
    ):
        if original is not None:
            setattr(averager, name, _mark_wrapper(fn, original))


def _mark_wrapper(fn: Callable, original: Callable) -> Callable:
    """``fn``, a shim around OpenLM's function ``original``, with its name, docstring and ``__wrapped__``, and
    marked as ours (``_openlm_mamba``: a second registration leaves it alone)."""
    functools.update_wrapper(fn, original)
    fn._openlm_mamba = True
    return fn


def _when_imported(name: str, fn: Callable[[Any], None]) -> None:
    """Run ``fn(module)`` now if ``name`` is loaded, else right after it loads (a wrapt post-import hook)."""
    try:
        module = sys.modules.get(name)
        if module is not None:
            fn(module)
        else:
            import wrapt

            wrapt.register_post_import_hook(fn, name)
    except Exception as e:  # never break OpenLM over an optional workaround
        _log.warning("openlm_mamba: could not apply the %s compatibility patch (%s)", name, e)


def _patch_main(main: Any) -> None:
    """The shims on ``open_lm.main`` itself (or ``python -m open_lm.main``'s ``__main__``): :func:`_patch_load_model`
    and, without CUDA, :func:`_patch_cpu_distributed`. Names main defines after its imports are patched once its
    main() starts, when register() ran while it was still importing."""
    if _patch_load_model(main) & _patch_cpu_distributed(main):
        _PENDING_MAIN_PATCH[:] = [m for m in _PENDING_MAIN_PATCH if m is not main]
    elif not any(m is main for m in _PENDING_MAIN_PATCH):
        # open_lm.main is still being imported (its own ``from open_lm.model import ...`` ran register()), so
        # ``cleanup`` is not defined yet: finish when its main() starts (before it registers cleanup at exit)
        _PENDING_MAIN_PATCH.append(main)
        _when_imported("open_lm.distributed", _finish_main_patches_at_distributed_init)


def _patch_load_model(main: Any) -> bool:
    """Let ``open_lm.main.load_model`` load a bare state dict (no ``epoch``: what --pretrained often gets) into a
    DDP-wrapped Mamba model; whether it is patched (False: main is still importing).

    Its bare branch calls ``load_state_dict`` on the DDP wrapper, whose keys start with ``module.``: a file saved
    from an unwrapped (or compiled) model failed with every key missing and unexpected, while one process and
    FSDP load it. During that call the wrapper gets a pre-hook that adds the ``module.`` its keys lack (the
    model's own pre-hook then strips ``module.`` / ``_orig_mod.`` as for every load). Every route into OpenLM's
    ``main()`` gets it (when main is still importing at registration, main() finishes the patch); code that calls
    ``open_lm.main.load_model`` without ``main()`` can apply it with ``_patch_main(open_lm.main)``.
    """
    original = getattr(main, "load_model", None)
    if original is None:
        return False
    if getattr(original, "_openlm_mamba", False):
        return True

    def load_model(args, model, *rest, **kwargs):
        inner = getattr(model, "module", None)
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel) or not isinstance(inner, OpenLMMambaLM):
            return original(args, model, *rest, **kwargs)

        def add_module_prefix(module, state_dict, prefix, *hook_args) -> None:
            for key in list(state_dict):
                if key.startswith(prefix) and not key.startswith(prefix + "module."):
                    state_dict[prefix + "module." + key[len(prefix) :]] = state_dict.pop(key)

        handle = model._register_load_state_dict_pre_hook(add_module_prefix, with_module=True)
        try:
            return original(args, model, *rest, **kwargs)
        finally:
            handle.remove()

    main.load_model = _mark_wrapper(load_model, original)
    return True


def _patch_cpu_distributed(main: Any) -> bool:
    """Without CUDA, let ``open_lm.main``'s distributed paths run on CPU (gloo). Three shims, applied only then:

    * FSDP save: ``FullStateDictConfig(offload_to_cpu=True, rank0_only=True)`` in ``save_checkpoint``
      fails for parameters that already live on the CPU. We rebind the name ``FullStateDictConfig``
      in ``open_lm.main`` (not torch's class) to a factory that turns ``offload_to_cpu`` off.
    * DDP: ``open_lm.main`` passes ``device_ids=[device]``, which DDP rejects for a CPU device. We set
      ``torch.nn.parallel.DistributedDataParallel`` to a subclass that drops CPU ``device_ids``
      (what DDP expects for CPU modules); isinstance checks against DDP still hold.
    * Exit: when ``main()`` returns, freeing the DDP model destroys the gloo process group, which
      joins gloo's worker threads while holding the GIL. A worker that is still releasing a
      finished barrier (decref of tensors, which needs the GIL) then deadlocks the process at exit
      (seen with torchrun on 2 CPU processes). ``cleanup`` gets a barrier and a short GIL-free
      wait first, so the workers are idle by then.

    Returns whether nothing is left to patch (False: main is still importing).
    """
    if getattr(main, "_openlm_mamba_cpu_patch", False) or torch.cuda.is_available():
        return True
    original = getattr(main, "FullStateDictConfig", None)
    if original is not None and not getattr(original, "_openlm_mamba", False):

        def full_state_dict_config(*args, **kwargs):
            kwargs["offload_to_cpu"] = False
            return original(*args, **kwargs)

        full_state_dict_config.__wrapped__ = original
        full_state_dict_config._openlm_mamba = True
        main.FullStateDictConfig = full_state_dict_config
    cleanup = getattr(main, "cleanup", None)
    if cleanup is not None and not getattr(cleanup, "_openlm_mamba", False):

        def quiet_cleanup(sync_process, distributed=False, *args, **kwargs):
            dist = torch.distributed
            # the barrier only where every rank gets here: OpenLM's own calls at the end of a run. At exit after an
            # exception (atexit calls it with no Python frame below) the other ranks never would: one rank's crash
            # would hang the job instead of ending it
            if distributed and _called_from_python() and dist.is_initialized() and dist.get_backend() == "gloo":
                dist.barrier()
                time.sleep(0.5)  # GIL released: gloo's workers finish dropping completed work
            return cleanup(sync_process, distributed, *args, **kwargs)

        quiet_cleanup.__wrapped__ = cleanup  # its own name kept: what runs at exit is recognisable as the shim
        quiet_cleanup._openlm_mamba = True
        main.cleanup = quiet_cleanup
    _patch_cpu_ddp()
    if all(getattr(getattr(main, n, None), "_openlm_mamba", False) for n in ("FullStateDictConfig", "cleanup")):
        main._openlm_mamba_cpu_patch = True
        return True
    return False


def _called_from_python() -> bool:
    """Whether the caller's caller is Python code (OpenLM's main()), not the interpreter's atexit handling."""
    try:
        sys._getframe(2)  # 0: here, 1: quiet_cleanup, 2: its caller, absent when atexit called it
    except ValueError:
        return False
    return True


_PENDING_MAIN_PATCH: list[Any] = []  # open_lm.main modules (or ``python -m open_lm.main``'s __main__) half patched


def _finish_main_patches_at_distributed_init(distributed: Any) -> None:
    """Wrap ``open_lm.distributed.init_distributed_device``, the first thing ``open_lm.main.main()`` calls after
    parsing its arguments, to finish :func:`_patch_main` on the modules it left pending. This runs
    while ``open_lm.main`` is still importing, before its ``from open_lm.distributed import ...`` line, so
    main's name is the wrapper."""
    original = getattr(distributed, "init_distributed_device", None)
    if original is None or getattr(original, "_openlm_mamba", False):
        return

    def init_distributed_device(*args, **kwargs):
        for main in list(_PENDING_MAIN_PATCH):
            _patch_main(main)
        return original(*args, **kwargs)

    distributed.init_distributed_device = _mark_wrapper(init_distributed_device, original)
    for main in _PENDING_MAIN_PATCH:  # should main have bound the name already
        if getattr(main, "init_distributed_device", None) is original:
            main.init_distributed_device = init_distributed_device


def _patch_cpu_ddp() -> None:
    ddp = torch.nn.parallel.DistributedDataParallel
    if getattr(ddp, "_openlm_mamba_cpu_ddp", False):
        return

    class DistributedDataParallel(ddp):
        """torch's DDP, accepting ``device_ids=[cpu device]`` as OpenLM passes it (dropped: CPU modules take none)."""

        _openlm_mamba_cpu_ddp = True

        def __init__(self, module, device_ids=None, *args, **kwargs):
            if device_ids is not None and all(torch.device(d).type == "cpu" for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids, *args, **kwargs)

    DistributedDataParallel.__module__ = ddp.__module__
    DistributedDataParallel.__qualname__ = ddp.__qualname__
    torch.nn.parallel.DistributedDataParallel = DistributedDataParallel


def _patch_wds_eof_marker(data: Any) -> None:
    """Let OpenLM's ``group_by_keys_nothrow`` skip webdataset's end-of-shard markers.

    webdataset >= 0.2.90 ends every shard in ``tar_file_expander`` with an EOF marker (``{}``, no
    ``"fname"``); OpenLM's own grouping (used for ``--train-data`` / ``--dataset-manifest``) indexes
    ``filesample["fname"]`` and dies with ``KeyError: 'fname'`` at the end of the first shard. We
    drop samples without ``"fname"`` before OpenLM's function sees them; its behaviour is otherwise
    unchanged (samples are still flushed when the key prefix changes).
    """
    original = getattr(data, "group_by_keys_nothrow", None)
    if original is None or getattr(data, "_openlm_mamba_wds_patch", False):
        return

    def group_by_keys_nothrow(files, *args, **kwargs):
        return original((f for f in files if "fname" in f), *args, **kwargs)

    group_by_keys_nothrow.__wrapped__ = original
    group_by_keys_nothrow.__doc__ = original.__doc__
    data.group_by_keys_nothrow = group_by_keys_nothrow
    data._openlm_mamba_wds_patch = True


def _finish_deferred_autoload() -> None:
    from . import _autoload

    if _autoload.take_pending():
        register()


_finish_deferred_autoload()
