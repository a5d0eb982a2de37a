"""``openlm-mamba info``: sizes, parameter count and FLOPs per token of a model config; ``--env``:
what this machine runs (versions, optional packages, C++ CPU kernels, each op's backends)."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # no torch import for the CLI's parser
    from ..config import MambaConfig
    from ..convert.openlm import FoundConfig

HELP = (
    "Show a model config's (or a checkpoint's) sizes, parameter count and training FLOPs per token, or (--env) "
    "what this machine runs."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="config name (e.g. mamba_7b), path to a JSON config, or a checkpoint (an OpenLM .pt, an HF or "
        "mamba_ssm directory): its config, tensor count, dtypes and size",
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--list", action="store_true", help="list the shipped configs")
    parser.add_argument(
        "--save-config",
        metavar="PATH",
        default=None,
        help="also write MODEL's config as a JSON file that --model (OpenLM, convert, generate, eval) accepts",
    )
    parser.add_argument(
        "--env",
        action="store_true",
        help="show the environment instead: versions, optional packages (open_lm, triton, mamba_ssm, ...), "
        "whether the C++ CPU kernels build (compiling them on first use), and which backend each op picks "
        "on CPU and GPU",
    )


def environment() -> dict:
    """Versions, optional packages, C++ kernel status and per-op backends (what ``auto`` picks and what else can run)."""
    import importlib.metadata
    import importlib.util
    import platform

    import torch

    from .. import __version__
    from ..ops import cpp, dispatch

    def version(pkg: str) -> str | None:
        if importlib.util.find_spec(pkg) is None:
            return None
        try:
            return importlib.metadata.version(pkg.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            return "present"

    with warnings.catch_warnings():  # its "kernels unavailable" warning: the report's cpp_kernels says why
        warnings.filterwarnings(
            "ignore", message=r"openlm_mamba: C\+\+ CPU kernels unavailable", category=RuntimeWarning
        )
        built = cpp.load_extension()
    try:
        requested = dispatch.requested_backend()
    except ValueError as e:  # a bad $OPENLM_MAMBA_BACKEND: say so, as every op would
        requested = f"invalid ({e})"
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ops = {}
    for op in sorted(dispatch._REGISTRY):
        ops[op] = {}
        for dev in devices:
            try:
                picked = dispatch.resolve(op, torch.device(dev))[0]
            except (dispatch.BackendUnavailableError, ValueError) as e:
                reason = str(e).removeprefix(f"{op}: ")
                picked = f"none ({reason})"
            ops[op][dev] = {"picked": picked, "available": dispatch.available_backends(op, dev)}
    return {
        "openlm_mamba": __version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "packages": {p: version(p) for p in ("open_lm", "triton", "mamba_ssm", "causal_conv1d", "transformers")},
        "cpp_kernels": "built" if built else f"unavailable: {cpp._ext_state.get('reason', '?')}",
        "cpu_decode_step": "fused (one C++ call per token, and per prompt slice, for float32 RMSNorm models)"
        if built
        else "per-layer Python step",
        "backend_requested": requested,
        "ops": ops,
    }


def print_environment(env: dict) -> None:
    """:func:`environment` as a few readable lines."""
    from ..ops.dispatch import ENV_VAR

    print(f"openlm_mamba {env['openlm_mamba']}, python {env['python']} ({env['platform']}), torch {env['torch']}")
    print(f"GPU: {env['cuda'] or 'none'}; CPU threads: {env['cpu_threads']}")
    print("packages: " + ", ".join(f"{k} {v or 'absent'}" for k, v in env["packages"].items()))
    print(f"C++ CPU kernels: {env['cpp_kernels']}; CPU decoding: {env['cpu_decode_step']}")
    print(f"backend requested: {env['backend_requested']} (the ops' backend= argument, else ${ENV_VAR}, else auto)")
    for op, per_dev in env["ops"].items():
        parts = [f"{dev}: {d['picked']} (can run: {', '.join(d['available']) or 'none'})" for dev, d in per_dev.items()]
        print(f"  {op:24s} " + "; ".join(parts))


def _params(n: int) -> str:
    """A parameter count at a readable scale: 98.2K, 129.1M, 6.95B."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.{3 if unit == 'B' else 1}f}{unit}"
    return str(n)


_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".json")


def _is_checkpoint_path(arg: str, names: list[str]) -> bool:
    """MODEL names a checkpoint (a file that is not JSON, or a directory) rather than a config; a shipped
    config's name wins over a directory of that name in the working directory (say ./NAME for the directory)."""
    from ..convert import is_hf_dir, is_mamba_ssm_dir

    path = Path(arg)
    if path.is_file() and path.name == "config.json" and (is_hf_dir(path.parent) or is_mamba_ssm_dir(path.parent)):
        return True  # an HF / mamba_ssm checkpoint's config: the checkpoint reader says to pass the directory
    return arg not in names and (path.is_dir() or (path.is_file() and path.suffix != ".json"))


# MambaConfig fields a checkpoint's tensor shapes determine (checked against them when it is read)
_SHAPE_CONFIG_FIELDS = frozenset(
    ("d_model", "n_layer", "d_state", "d_conv", "expand", "dt_rank", "rms_norm", "tie_embeddings", "conv_bias", "bias")
)
_NOT_RECORDED = "not recorded in the checkpoint"
_DEFAULT = f"default: {_NOT_RECORDED}"


def _openlm_unrecorded(cfg: MambaConfig, found: FoundConfig | None) -> dict[str, str]:
    """Field -> where its value came from, for the fields of an OpenLM checkpoint's config that were not recorded
    with it (none when the full config was: embedded by our converter, or params.txt's ``mamba_config`` line)."""
    if found is not None and found.exact:
        return {}
    notes = {}
    for field in cfg.to_dict():
        if field in _SHAPE_CONFIG_FIELDS or field == "model_type":
            continue
        if found is not None and getattr(cfg, field) == getattr(found.config, field):
            notes[field] = f"from {found.config.name}: {_NOT_RECORDED}; {found.origin}"
        elif field in ("vocab_size", "pad_vocab_size_multiple"):
            notes[field] = f"inferred from the embedding's rows: {_NOT_RECORDED}"
        else:
            notes[field] = _DEFAULT
    return notes


def _dir_unrecorded(fmt: str, config_json: Path) -> dict[str, str]:
    """Field -> where its value came from, for the fields an HF / mamba_ssm config.json does not record (the
    fields tensor shapes confirm aside)."""
    from ..convert.common import read_json

    data = read_json(config_json, "config.json")
    notes = {"seq_len": f"default: {_NOT_RECORDED}; {'HF' if fmt == 'hf' else 'mamba_ssm'} configs have none"}
    if fmt == "hf":
        from ..convert.hf import _HF_FIELDS

        missing = [ours for key, (ours, _, _) in _HF_FIELDS.items() if key not in data]
        # read_hf keeps HF's vocab_size (the embedding's rows) exact: a multiple it does not divide becomes 1
        pad, vocab = data.get("pad_vocab_size_multiple"), data.get("vocab_size")
        given = pad if isinstance(pad, int) and not isinstance(pad, bool) and pad > 0 else None
        if isinstance(vocab, int) and vocab % (given or 8):
            had = f"config.json has {given}" if given else "the default is 8"
            notes["pad_vocab_size_multiple"] = (
                f"1: {had}, which does not divide vocab_size {vocab} (the embedding's rows)"
            )
        elif given is None:
            missing.append("pad_vocab_size_multiple")
        notes["rescale_prenorm_residual"] = (
            f"{_DEFAULT}: HF configs hold False for this init-only flag, whatever was trained"
        )
    else:
        from ..convert.mamba_ssm import _SSM_KEYS

        ssm = data.get("ssm_cfg") or {}
        missing = [f for f in ("residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple") if f not in data]
        missing += [ours for key, ours in _SSM_KEYS.items() if key not in ssm]
        missing += ["initializer_range", "rescale_prenorm_residual"]
        notes["norm_epsilon"] = f"mamba_ssm's fixed value: {_NOT_RECORDED}"
    notes.update({f: _DEFAULT for f in missing if f not in _SHAPE_CONFIG_FIELDS})
    return notes


def checkpoint_info(path: str | Path) -> tuple[MambaConfig, dict[str, Any]]:
    """(config, {format, file, tensors, dtypes, bytes, not_recorded}) of a checkpoint in any format ``convert``
    reads; ``not_recorded`` maps each config field the checkpoint does not record (a default, or inferred) to
    where its value came from."""
    from ..convert import read_checkpoint

    with read_checkpoint(path) as ckpt:
        if ckpt.format == "openlm":
            unrecorded = _openlm_unrecorded(ckpt.config, ckpt.found)
        else:
            unrecorded = _dir_unrecorded(ckpt.format, Path(path) / "config.json")
        tensors = ckpt.source.tensors.values()
        dtypes: dict[str, int] = {}
        for t in tensors:
            name = str(t.dtype).removeprefix("torch.")
            dtypes[name] = dtypes.get(name, 0) + 1
        about = {
            "checkpoint": str(path),
            "checkpoint_format": ckpt.format,
            "checkpoint_tensors": len(tensors),
            "checkpoint_dtypes": ", ".join(f"{k} ({v})" for k, v in sorted(dtypes.items())),
            "checkpoint_tensor_bytes": sum(t.nbytes for t in tensors),
            "not_recorded": unrecorded,
        }
        return ckpt.config, about


def run(args: argparse.Namespace) -> int:
    from ..config import ConfigError, MambaConfig, available_configs

    if sum(map(bool, (args.env, args.list, args.model is not None))) > 1:
        print("error: give one of MODEL, --list and --env", file=sys.stderr)
        return 2
    if args.save_config and args.model is None:
        print("error: --save-config needs MODEL (a config name, JSON or checkpoint)", file=sys.stderr)
        return 2
    if args.env:
        env = environment()
        if args.json:
            print(json.dumps(env, indent=2))
        else:
            print_environment(env)
        return 0
    if args.list or args.model is None:
        configs = {name: MambaConfig.load(name) for name in available_configs()}
        if args.json:
            rows = {
                n: {"d_model": c.d_model, "n_layer": c.n_layer, "parameters": c.num_parameters()}
                for n, c in configs.items()
            }
            print(json.dumps(rows, indent=2))
            return 0
        for name, cfg in configs.items():
            print(
                f"{name:12s} d_model={cfg.d_model:<5d} n_layer={cfg.n_layer:<3d} params={_params(cfg.num_parameters())}"
            )
        return 0
    info: dict = {}
    unrecorded: dict[str, str] | None = None
    try:
        path = Path(args.model)
        names = available_configs()
        if args.model not in names and not path.exists() and (path.suffix in _CHECKPOINT_SUFFIXES or "/" in args.model):
            raise ValueError(f"{args.model}: no such file or directory")
        if _is_checkpoint_path(args.model, names):
            cfg, info = checkpoint_info(args.model)
            unrecorded = info.pop("not_recorded")
        else:
            cfg = MambaConfig.load(args.model)
    except (ConfigError, ValueError) as e:  # ConversionError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.save_config:
        if Path(args.save_config).exists():
            print(
                f"error: --save-config {args.save_config}: already exists; remove it or give another path",
                file=sys.stderr,
            )
            return 2
        try:
            Path(args.save_config).parent.mkdir(parents=True, exist_ok=True)
            with open(args.save_config, "x") as f:  # "x": not over a file made since the check either
                f.write(json.dumps(cfg.to_dict(), indent=2) + "\n")
        except OSError as e:
            print(f"error: --save-config {args.save_config}: {e.strerror or e}", file=sys.stderr)
            return 2
    info.update(cfg.to_dict())
    info.update(
        d_inner=cfg.d_inner,
        dt_rank=cfg.dt_rank_value,
        padded_vocab_size=cfg.padded_vocab_size,
        parameters=cfg.num_parameters(),
        train_flops_per_token=cfg.flops_per_token(),
    )
    if args.json:
        if unrecorded is not None:
            info["not_recorded"] = unrecorded
        print(json.dumps(info, indent=2))
    else:
        values = {k: f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v) for k, v in info.items()}
        width = max(len(k) for k in values)
        noted = max((len(values[k]) for k in unrecorded or () if k in values), default=0)
        for k, v in values.items():
            note = (unrecorded or {}).get(k)
            print(f"{k:{width}s}  {v:{noted}s}  ({note})" if note else f"{k:{width}s}  {v}")
    return 0
