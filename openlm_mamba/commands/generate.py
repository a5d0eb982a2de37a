"""``openlm-mamba generate``: prompt a checkpoint and stream the continuation to stdout."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HELP = "Generate text from an OpenLM checkpoint (or an HF directory), streaming tokens as they come."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="config name or JSON path (e.g. mamba_7b); checked against the checkpoint"
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="OpenLM checkpoint (epoch_N.pt / bare state dict) or an HF / mamba_ssm directory",
    )
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory, tokenizer.json file, or HF hub name")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=50)
    parser.add_argument(
        "--greedy", action="store_true", help="greedy decoding (default: sampling as on the model card)"
    )
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50, help="0 disables top-k filtering")
    parser.add_argument("--repetition-penalty", type=float, default=1.1)
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: bf16 on GPU, fp32 on CPU"
    )
    parser.add_argument("--backend", default=None, help="op backend: auto | torch | triton | cuda")
    parser.add_argument("--no-stream", action="store_true", help="print the text once at the end")
    parser.add_argument(
        "--stats",
        action="store_true",
        help="print prompt length, time to first token and decode speed to stderr at the end",
    )


def load_tokenizer(name: str):
    """A transformers tokenizer from a directory, a tokenizer.json file or a hub name (clear error if unavailable)."""
    try:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast
    except ImportError:
        raise SystemExit(
            "error: --tokenizer needs the `transformers` package (pip install 'openlm-mamba[hf]')"
        ) from None
    path = Path(name)
    try:
        if path.is_file():  # a bare tokenizers file: take the usual end-of-text token as EOS if it has one
            tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
            for eos in ("<|endoftext|>", "</s>", "<eos>"):
                if tok.convert_tokens_to_ids(eos) not in (None, tok.unk_token_id):
                    tok.eos_token = eos
                    break
            return tok
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        return AutoTokenizer.from_pretrained(name, local_files_only=offline or path.is_dir())
    except Exception as e:  # transformers raises many kinds here
        where = "directory" if path.is_dir() else "name"
        hint = (
            " HF_HUB_OFFLINE is set, so only local directories and the local HF cache are searched."
            if os.environ.get("HF_HUB_OFFLINE")
            else ""
        )
        raise SystemExit(
            f"error: --tokenizer {name!r}: cannot load a tokenizer from this {where} "
            f"(expected a directory with tokenizer.json / tokenizer_config.json, a tokenizer.json file, "
            f"or a hub name available offline).{hint} Cause: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None


def _strip(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key.replace("._orig_mod.", ".").replace("._fsdp_wrapped_module.", ".")


def load_openlm_file(path: Path, model: str | None, device: str, dtype):
    """Fallback loader for an OpenLM ``.pt`` file (used when ``openlm_mamba.convert`` is unavailable)."""
    import torch

    from ..config import MambaConfig
    from ..model import MambaLM

    if model is None:
        raise SystemExit("error: --model is required to load this checkpoint")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise SystemExit(f"error: --checkpoint {path}: expected a state dict or a dict with 'state_dict'")
    sd = {_strip(k): v for k, v in sd.items()}
    lm = MambaLM(MambaConfig.load(model))
    missing, unexpected = lm.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "model.lm_head.weight"]
    if missing or unexpected:
        raise SystemExit(f"error: --checkpoint {path}: missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")
    return lm.to(device=device, dtype=dtype).eval()


def load_model(args, device: str, dtype):
    """MambaLM from --checkpoint, through ``openlm_mamba.convert.load_model`` when available."""
    path = Path(args.checkpoint)
    if not path.exists():
        raise SystemExit(f"error: --checkpoint {path}: no such file or directory")
    try:
        from ..convert import ConversionError
        from ..convert import load_model as convert_load
    except ImportError:
        if path.is_dir():
            raise SystemExit("error: loading a checkpoint directory needs openlm_mamba.convert") from None
        return load_openlm_file(path, args.model, device, dtype)
    try:
        lm = convert_load(path, model=args.model, backend=args.backend, dtype=dtype, device=device)
    except (ConversionError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    return lm


def run(args: argparse.Namespace) -> int:
    import torch

    from ..generation import check_settings, generate

    try:
        check_settings(
            args.max_new_tokens, not args.greedy, args.temperature, args.top_k, args.top_p, args.repetition_penalty
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}".replace("generate: ", "")) from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    tok = load_tokenizer(args.tokenizer)
    lm = load_model(args, device, dtype)
    if args.backend is not None:
        lm.set_backend(args.backend)
    ids = tok(args.prompt, return_tensors="pt")["input_ids"].to(device)
    if ids.shape[1] == 0:
        raise SystemExit("error: --prompt encodes to zero tokens")

    out = sys.stdout
    new: list[int] = []
    arrivals: list[float] = []  # when each new token was picked
    printed = 0

    def stream(token: torch.Tensor) -> None:
        nonlocal printed
        arrivals.append(time.perf_counter())
        new.append(int(token[0]))
        if args.no_stream:
            return
        text = tok.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.write(text[printed:])
            out.flush()
            printed = len(text)

    if not args.no_stream:
        out.write(args.prompt)
        out.flush()
    start = time.perf_counter()
    try:
        result = generate(
            lm,
            ids,
            max_new_tokens=args.max_new_tokens,
            do_sample=not args.greedy,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            eos_token_id=tok.eos_token_id,
            seed=args.seed,
            streamer=stream,
        )
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.no_stream:
        out.write(args.prompt + tok.decode(result[0, ids.shape[1] :].tolist(), skip_special_tokens=True))
    else:
        text = tok.decode(new, skip_special_tokens=True)
        out.write(text[printed:])
    out.write("\n")
    out.flush()
    if args.stats:
        print(stats_line(ids.shape[1], start, arrivals, device, dtype_name), file=sys.stderr, flush=True)
    return 0


def stats_line(prompt_tokens: int, start: float, arrivals: list[float], device: str, dtype: str) -> str:
    """One line: prompt length, time to first token, decode speed after it."""
    line = f"[openlm-mamba] {device} {dtype}: prompt {prompt_tokens} tokens"
    if not arrivals:
        return line + ", nothing generated"
    line += f", first token after {(arrivals[0] - start) * 1e3:.1f} ms"
    n = len(arrivals) - 1
    if n:
        spent = arrivals[-1] - arrivals[0]
        line += f", then {n} tokens at {n / spent:.1f} tokens/s ({spent / n * 1e3:.2f} ms each)"
    return line
