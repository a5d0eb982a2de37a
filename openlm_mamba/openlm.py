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
  (:func:`_patch_wds_eof_marker`), and numpy scalars in OpenLM's optimizer checkpoints under torch's
  ``weights_only`` loading (:func:`_allow_numpy_scalars_in_checkpoints`). Each docstring says what fails
  without it.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_lm.model as _olm
import torch
from open_lm.model import Block as _OpenLMBlock

from .config import PARAMS_CONFIG_KEY, MambaConfig, config_dir, is_mamba_config
from .model import MambaLM, ResidualBlock

__all__ = ["OpenLMMambaBlock", "build_model", "create_model", "register", "resolve_config"]

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
        except (OSError, json.JSONDecodeError):
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
    tensor (a size mismatch fails in torch with ``strict=False`` too); so does one sharing no tensor name with
    the model (another model type), which would load nothing."""
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
    bad = [(k, have[k], shape) for k, shape in want.items() if k in have and have[k] != shape]
    if not bad:
        return
    layers = {int(m.group(1)) for k in have if (m := re.match(r"backbone\.layers\.(\d+)\.", k))}
    held = f"d_model {emb[1]}, {max(layers) + 1 if layers else 0} layers, vocabulary {emb[0]}"
    diffs = "; ".join(f"{k}: checkpoint {tuple(a)}, model {tuple(b)}" for k, a, b in bad[:3])
    more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
    raise ValueError(
        f"the checkpoint does not fit {model}: it holds {held} (from its tensor shapes). Build the model it was "
        f"trained with (--model). Differing tensors: {diffs}{more}"
    )


def build_model(cfg: MambaConfig, backend: str | None = None) -> MambaLM:
    """A MambaLM whose layers are OpenLM Blocks, loading upstream-OpenLM Mamba checkpoints with or without prefixes."""
    model = MambaLM(cfg, block_cls=OpenLMMambaBlock, backend=backend)
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
    for flag in ("pretrained", "resume"):
        _refuse_converter_formats(getattr(args, flag, None), f"--{flag}", cfg)
        _warn_if_config_differs(getattr(args, flag, None), f"--{flag}", cfg)
    _avoid_inductor_cpu_half_transposes(args)
    return build_model(cfg)


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


def _refuse_converter_formats(path: Any, flag: str, cfg: MambaConfig) -> None:
    """An HF or mamba_ssm checkpoint directory given to --pretrained / --resume: OpenLM would fail on it with a
    bare IsADirectoryError; say what it is and how to convert it."""
    if not isinstance(path, str) or not Path(path).is_dir():
        return
    from .convert import ConversionError, detect_format

    try:
        kind = detect_format(path)
    except ConversionError:
        return
    if kind in ("hf", "mamba_ssm"):
        name = {"hf": "an HF transformers", "mamba_ssm": "a mamba_ssm"}[kind]
        raise ValueError(
            f"{flag} {path}: {name} checkpoint directory; OpenLM loads its own .pt checkpoints: convert it first, "
            f"openlm-mamba convert --to openlm {path} {Path(path).name}.pt --model {cfg.name}, and pass that file"
        )


def _warn_if_config_differs(path: Any, flag: str, cfg: MambaConfig) -> None:
    """Warn when a checkpoint was made from a model that differs from ``cfg`` in a field its tensor shapes
    do not show (norm_epsilon, residual_in_fp32, ...): OpenLM loads the weights into ``cfg``'s model,
    silently. The checkpoint's config: the ``model_config`` our converter embeds, else the full config our
    hook records in its training run's params.txt."""
    if not isinstance(path, str) or not Path(path).is_file():
        return
    from .convert.common import config_differences
    from .convert.openlm import _config_from_params

    try:  # mmap: only the pickled structure is read, not the tensors
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # unreadable: OpenLM's own loading reports what is wrong
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
            "--model's; pass the checkpoint's own config as --model (openlm-mamba info %s shows it)",
            flag,
            path,
            cfg.name,
            "; ".join(diffs),
            path,
        )


# ---------------------------------------------------------------------------------------------------
_ORIGINAL: dict[str, Callable] = {}


def _add_configs(registry: dict) -> None:
    registry.update(our_configs())


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
    _when_imported("open_lm.main", _patch_cpu_distributed)
    entry = sys.modules.get("__main__")
    if getattr(getattr(entry, "__spec__", None), "name", None) == "open_lm.main":  # python/torchrun -m open_lm.main
        _patch_cpu_distributed(entry)
    _when_imported("open_lm.data", _patch_wds_eof_marker)
    _when_imported("open_lm.file_utils", _allow_numpy_scalars_in_checkpoints)


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


def _patch_cpu_distributed(main: Any) -> None:
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
    """
    if getattr(main, "_openlm_mamba_cpu_patch", False) or torch.cuda.is_available():
        return
    original = getattr(main, "FullStateDictConfig", None)
    if original is not None:

        def full_state_dict_config(*args, **kwargs):
            kwargs["offload_to_cpu"] = False
            return original(*args, **kwargs)

        full_state_dict_config.__wrapped__ = original
        main.FullStateDictConfig = full_state_dict_config
    cleanup = getattr(main, "cleanup", None)
    if cleanup is not None:

        def quiet_cleanup(sync_process, distributed=False, *args, **kwargs):
            dist = torch.distributed
            if distributed and dist.is_initialized() and dist.get_backend() == "gloo":
                dist.barrier()
                time.sleep(0.5)  # GIL released: gloo's workers finish dropping completed work
            return cleanup(sync_process, distributed, *args, **kwargs)

        quiet_cleanup.__wrapped__ = cleanup
        main.cleanup = quiet_cleanup
    _patch_cpu_ddp()
    main._openlm_mamba_cpu_patch = True


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
