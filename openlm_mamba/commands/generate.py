"""``openlm-mamba generate``: prompt a checkpoint and stream the continuation to stdout."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

HELP = "Generate text from a checkpoint (OpenLM .pt, HF or mamba_ssm directory), streaming tokens as they come."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="config name or JSON path (e.g. mamba_7b); checked against the checkpoint"
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="OpenLM checkpoint (epoch_N.pt / bare state dict) or an HF / mamba_ssm directory",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer directory, tokenizer.json file, or HF hub name (default: the checkpoint directory's own "
        "tokenizer files, else EleutherAI/gpt-neox-20b, Mamba-7B's)",
    )
    parser.add_argument(
        "--prompt",
        required=True,
        action="append",
        help="text to continue; repeat it to continue several prompts as one batch (left-padded; with --greedy "
        "each text is what its prompt alone gives, while sampling draws the batch from one seeded generator); "
        "the texts are printed in order once all are done, not streamed",
    )
    parser.add_argument("--max-new-tokens", type=int, default=50, help="default: 50")
    parser.add_argument(
        "--greedy",
        action="store_true",
        help="plain greedy decoding, repetition penalty 1.0 unless given (default: sampling as on the model card)",
    )
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default: 0.8)")
    parser.add_argument("--top-p", type=float, default=0.8, help="nucleus sampling mass in (0, 1] (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=50, help="keep the k likeliest tokens; 0 disables (default: 50)")
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        help="transformers' repetition penalty; 1.0 is none (default: 1.1 when sampling, as on the model card; "
        "1.0 with --greedy)",
    )
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16", "float64"],
        help="default: bf16 on GPU, fp32 on CPU",
    )
    parser.add_argument(
        "--backend",
        default=None,
        choices=["auto", "torch", "triton", "cuda"],
        help="op backend (default: auto, or $OPENLM_MAMBA_BACKEND)",
    )
    parser.add_argument("--no-stream", action="store_true", help="print the text once at the end")
    parser.add_argument(
        "--stats",
        action="store_true",
        help="print prompt length, time to first token and decode speed to stderr at the end",
    )


DEFAULT_TOKENIZER = "EleutherAI/gpt-neox-20b"  # Mamba-7B's
# transformers' tokenizer files beside a tokenizer.json: with any of them, AutoTokenizer reads the directory
_TOKENIZER_METADATA = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def default_tokenizer(checkpoint: str | os.PathLike | None) -> tuple[str, bool]:
    """The tokenizer to use when none is given: the checkpoint directory's own tokenizer files, else Mamba-7B's;
    and whether it is the directory's."""
    folder = Path(checkpoint) if checkpoint is not None else None
    own = folder is not None and folder.is_dir() and any((folder / f).is_file() for f in TOKENIZER_FILES)
    return (str(folder) if own else DEFAULT_TOKENIZER), own


def load_tokenizer(name: str | os.PathLike, add_bos_token: bool | None = None):
    """A transformers tokenizer from a directory, a tokenizer.json file or a hub name (clear error if unavailable).
    ``add_bos_token`` (not None) goes to the tokenizer as lm-eval's ``HFLM`` passes it: True makes one that adds no
    BOS of its own (GPT-NeoX's) add one.

    A hub name is looked up in the local HF cache first; the network is tried only if that fails, HF_HUB_OFFLINE is
    unset and the hub answers at all (so an offline machine fails at once instead of retrying for a minute).
    """
    try:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast
    except ImportError:
        raise SystemExit(
            "error: --tokenizer needs the `transformers` package (pip install 'openlm-mamba[hf]')"
        ) from None
    name = str(name)
    path = Path(name).expanduser()
    seps = tuple({"/", os.sep, os.altsep or "/"})
    looks_like_path = (
        name.startswith((".", "~", *seps))
        or name.endswith((".json", *seps))
        or name.count("/") > 1  # a hub name is "repo" or "namespace/repo"
        or any(sep in name for sep in seps if sep != "/")
    )
    if not path.exists() and looks_like_path:
        raise SystemExit(f"error: --tokenizer {name!r}: no such file or directory")
    if path.is_dir() and not any(
        (path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    ):
        raise SystemExit(
            f"error: --tokenizer {name!r}: cannot load a tokenizer from this directory: "
            f"no tokenizer.json / tokenizer_config.json in {path}"
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    extra = {} if add_bos_token is None else {"add_bos_token": bool(add_bos_token)}
    try:
        tok = None
        bare = path / "tokenizer.json" if path.is_dir() else None
        if path.is_file():  # a bare tokenizers file
            tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
        elif bare is not None and bare.is_file() and not any((path / f).is_file() for f in _TOKENIZER_METADATA):
            # a bare tokenizers file copied into a checkpoint dir, with none of transformers' tokenizer files: read
            # as that file (AutoTokenizer would build the class the dir's config.json suggests, e.g. GPT-NeoX's for
            # model_type mamba, adding its own tokens)
            tok = PreTrainedTokenizerFast(tokenizer_file=str(bare))
        elif path.is_dir():
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, **extra)
        else:
            try:  # a hub name: the local cache first (no network, no retries)
                tok = AutoTokenizer.from_pretrained(name, local_files_only=True, **extra)
            except OSError:
                if offline:
                    raise
        if tok is not None:
            if tok.eos_token is None:  # e.g. a lone tokenizer.json: take the usual end-of-text token if it has one
                for eos in ("<|endoftext|>", "</s>", "<eos>"):
                    if tok.convert_tokens_to_ids(eos) not in (None, tok.unk_token_id):
                        tok.eos_token = eos
                        break
            return tok
        try:
            from huggingface_hub import constants, get_session
        except ImportError:
            get_session = None
        if get_session is not None:  # one quick request first: huggingface_hub retries a dead link for ~50 s
            try:
                get_session().head(constants.ENDPOINT, timeout=10)
            except Exception as e:  # the HTTP client's connection errors
                raise SystemExit(
                    f"error: --tokenizer {name!r}: not in the local HF cache, and the hub ({constants.ENDPOINT}) "
                    f"cannot be reached ({type(e).__name__}: {e}); pass a local tokenizer directory or "
                    "tokenizer.json file, or set HF_HUB_OFFLINE=1 with the tokenizer in the HF cache"
                ) from None
        return AutoTokenizer.from_pretrained(name, **extra)
    except Exception as e:  # transformers raises many kinds here
        where = "file" if path.is_file() else "directory" if path.is_dir() else "name"
        hint = (
            " HF_HUB_OFFLINE is set, so only local directories and the local HF cache are searched." if offline else ""
        )
        cause = " ".join(str(e).split())  # one line, not cut at the first line break
        cause = cause if len(cause) <= 600 else cause[:597] + "..."
        raise SystemExit(
            f"error: --tokenizer {name!r}: cannot load a tokenizer from this {where} "
            f"(expected a directory with tokenizer.json / tokenizer_config.json, a tokenizer.json file, "
            f"or a hub name available offline).{hint} Cause: {type(e).__name__}: {cause}"
        ) from None


def load_model(args, device: str, dtype):
    """MambaLM from --checkpoint (any format ``openlm_mamba.convert.load_model`` reads)."""
    path = Path(args.checkpoint)  # run() checked that it exists, before the tokenizer
    from ..convert import ConversionError
    from ..convert import load_model as convert_load

    try:
        lm = convert_load(path, model=args.model, backend=args.backend, dtype=dtype, device=device)
    except (ConversionError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    return lm


def run(args: argparse.Namespace) -> int:
    import torch

    from ..device import check_device, check_tokenizer
    from ..generation import check_prompt_backend, check_settings, generate
    from ..ops.dispatch import BackendUnavailableError

    if args.repetition_penalty is None:
        args.repetition_penalty = 1.0 if args.greedy else 1.1
    try:
        check_settings(
            args.max_new_tokens, not args.greedy, args.temperature, args.top_k, args.top_p, args.repetition_penalty
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}".replace("generate: ", "")) from None
    try:
        device = check_device(args.device)
    except ValueError as e:
        raise SystemExit(f"error: --device {args.device}: {e}") from None
    dtype_name = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    if not Path(args.checkpoint).exists():  # before any tokenizer is looked for (the default may be a download)
        raise SystemExit(f"error: --checkpoint {args.checkpoint}: no such file or directory")
    if args.tokenizer is None:  # as eval: the checkpoint directory's own, else Mamba-7B's
        args.tokenizer, own = default_tokenizer(args.checkpoint)
        try:
            tok = load_tokenizer(args.tokenizer)
        except SystemExit as e:
            note = "" if own else f" (no --tokenizer given and {args.checkpoint} has no tokenizer files)"
            raise SystemExit(f"{e}{note}") from None
    else:
        tok = load_tokenizer(args.tokenizer)
    lm = load_model(args, device, dtype)
    if args.backend is not None:
        lm.set_backend(args.backend)
    try:
        check_prompt_backend(
            lm, device
        )  # an explicit backend that cannot run here fails now, before the prompt is shown
    except (BackendUnavailableError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    try:
        check_tokenizer(tok, lm.cfg.vocab_size)
    except ValueError as e:
        raise SystemExit(f"error: --tokenizer {args.tokenizer}: {e}") from None
    prompts = args.prompt
    rows = [tok(p, return_tensors="pt")["input_ids"][0] for p in prompts]
    for i, row in enumerate(rows):
        if row.numel() == 0:
            which = "--prompt" if len(rows) == 1 else f"--prompt {i + 1} ({prompts[i]!r})"
            raise SystemExit(f"error: {which} encodes to zero tokens")
    if len(rows) > 1:
        return _run_batch(args, lm, tok, prompts, rows, device, dtype_name)
    ids = rows[0].unsqueeze(0).to(device)

    out = sys.stdout
    text = IncrementalText(tok)
    arrivals: list[float] = []  # when each new token was picked

    def stream(token: torch.Tensor) -> None:
        arrivals.append(time.perf_counter())
        piece = text.add(int(token[0]))
        if piece and not args.no_stream:
            out.write(piece)
            out.flush()

    if not args.no_stream:
        out.write(prompts[0])
        out.flush()
    start = time.perf_counter()
    try:
        result = generate(
            lm,
            ids,
            **settings(args, tok),
            streamer=stream,
        )
    except (ValueError, TypeError, BackendUnavailableError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.no_stream:
        out.write(prompts[0] + tok.decode(result[0, ids.shape[1] :].tolist(), skip_special_tokens=True))
    else:
        out.write(text.flush())
    out.write("\n")
    out.flush()
    if args.stats:
        print(stats_line(ids.shape[1], start, arrivals, device, dtype_name), file=sys.stderr, flush=True)
    return 0


def settings(args: argparse.Namespace, tok) -> dict:
    """generate()'s decoding settings from the command line."""
    return {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": not args.greedy,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "eos_token_id": tok.eos_token_id,
        "seed": args.seed,
    }


def _run_batch(args: argparse.Namespace, lm, tok, prompts: list[str], rows: list, device: str, dtype_name: str) -> int:
    """Several prompts as one left-padded batch; each text printed once all are done."""
    from ..generation import generate
    from ..ops.dispatch import BackendUnavailableError

    arrivals: list[float] = []
    start = time.perf_counter()
    try:
        result = generate(
            lm,
            [r.to(device) for r in rows],
            **settings(args, tok),
            streamer=lambda _token: arrivals.append(time.perf_counter()),
        )
    except (ValueError, TypeError, BackendUnavailableError) as e:
        raise SystemExit(f"error: {e}") from None
    width = max(len(r) for r in rows)
    eos = tok.eos_token_id
    for i, prompt in enumerate(prompts):
        new = result[i, width:].tolist()
        if eos is not None and eos in new:  # rows that stopped early are filled with EOS after it
            new = new[: new.index(eos) + 1]
        sys.stdout.write(("\n" if i else "") + prompt + tok.decode(new, skip_special_tokens=True) + "\n")
    sys.stdout.flush()
    if args.stats:
        line = stats_line(width, start, arrivals, device, dtype_name, batch=len(rows))
        print(line, file=sys.stderr, flush=True)
    return 0


class IncrementalText:
    """The text of a growing list of token ids, handed out piece by piece at a cost per token that does not grow
    with the output: only a short window of the latest ids is decoded, after the text already settled.

    The window's start moves forward only where decoding the window in two parts gives the same text as in
    one, so the pieces add up to ``tokenizer.decode(ids)`` (multi-byte characters split across tokens, and
    tokenizers' clean-up of spaces, included); a piece ending in an incomplete character waits for the rest,
    and a last space that clean-up could still delete (before "." or "n't", say) waits for the next token.
    """

    def __init__(self, tokenizer: Any, window: int = 16, lookahead: int = 4) -> None:
        self.tokenizer = tokenizer
        self.window, self.lookahead = window, lookahead
        self.ids: list[int] = []
        self.start = 0  # ids[:start] are settled into `settled`
        self.settled = ""
        self.printed = 0  # characters of the text handed out so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Append one token id; the text that became final (maybe "")."""
        self.ids.append(token)
        tail = self._decode(self.ids[self.start :])
        if len(self.ids) - self.start > self.window:
            for cut in range(len(self.ids) - self.lookahead, self.start + self.lookahead, -1):
                head = self._decode(self.ids[self.start : cut])
                if not head.endswith("\ufffd") and head + self._decode(self.ids[cut:]) == tail:
                    self.settled += head
                    self.start = cut
                    tail = tail[len(head) :]
                    break
        if tail.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            return ""
        return self._take(self.settled + tail)

    def flush(self) -> str:
        """The rest of the text (at the end: incomplete characters included)."""
        return self._take(self.settled + self._decode(self.ids[self.start :]), final=True)

    def _take(self, text: str, final: bool = False) -> str:
        if not final:
            text = _before_cleanup(text)
        piece = text[self.printed :]
        self.printed = max(self.printed, len(text))
        return piece


# what may follow a space that transformers' clean_up_tokenization deletes (" ." -> ".", "do n't" -> "don't", ...)
_CLEANED_AFTER_SPACE = (".", "?", "!", ",", "' ", "n't", "'m", "'s", "'ve", "'re")


def _before_cleanup(text: str) -> str:
    """``text`` without a last space that a later token could still make the tokenizer's clean-up delete."""
    at = text.rfind(" ")
    if at >= 0 and any(after.startswith(text[at + 1 :]) for after in _CLEANED_AFTER_SPACE):
        return text[:at]
    return text


def stats_line(prompt_tokens: int, start: float, arrivals: list[float], device: str, dtype: str, batch: int = 1) -> str:
    """One line: prompt length, time to first token, decode speed after it (per sequence of a batch)."""
    line = f"[openlm-mamba] {device} {dtype}: prompt {prompt_tokens} tokens"
    if batch > 1:
        line = f"[openlm-mamba] {device} {dtype}: {batch} prompts of up to {prompt_tokens} tokens"
    if not arrivals:
        return line + ", nothing generated"
    line += f", first token after {(arrivals[0] - start) * 1e3:.1f} ms"
    n = len(arrivals) - 1
    if n:
        spent = arrivals[-1] - arrivals[0]
        each = "" if batch == 1 else " per sequence"
        line += f", then {n} tokens at {n / spent:.1f} tokens/s{each} ({spent / n * 1e3:.2f} ms each)"
    return line
