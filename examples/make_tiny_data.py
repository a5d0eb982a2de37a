"""Build a small real-text token dataset offline, in OpenLM's webdataset format.

The text is the Python reference documentation that ships with every CPython
(``pydoc_data.topics``, ~460k characters of English prose and code). A byte-level BPE
tokenizer (default 512 tokens, matching ``mamba_tiny``) is trained on it with the
``tokenizers`` library, the documents are tokenized, joined with ``<|endoftext|>`` and cut into
sequences of ``seq_len + 1`` tokens, and the sequences are written like OpenLM's
``datapreprocess`` tools do: tar shards of ``{"__key__", "json.gz"}`` samples plus a
``manifest.jsonl`` (``{"shard", "num_sequences"}`` per line).

Usage: ``python examples/make_tiny_data.py [OUT_DIR]`` (default ``examples/tiny_data``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

EOS = "<|endoftext|>"
DEFAULT_OUT = Path(__file__).resolve().parent / "tiny_data"


def source_documents() -> list[str]:
    """The offline text corpus: CPython's reference-documentation topics, in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def train_tokenizer(docs: list[str], vocab_size: int):
    """A byte-level BPE tokenizer with ``vocab_size`` tokens (id 0 is ``<|endoftext|>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def _write_shards(seqs: list[list[int]], folder: Path, per_shard: int) -> list[dict]:
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    manifest = []
    for index, start in enumerate(range(0, len(seqs), per_shard)):
        chunk = seqs[start : start + per_shard]
        name = f"{index:08d}"
        with wds.TarWriter(str(folder / f"{name}.tar")) as sink:
            for tokens in chunk:
                text = json.dumps(tokens)
                sink.write({"__key__": hashlib.md5(text.encode()).hexdigest(), "json.gz": text})
        manifest.append({"shard": name, "num_sequences": len(chunk)})
    with open(folder / "manifest.jsonl", "w") as f:
        for row in manifest:
            f.write(json.dumps(row) + "\n")
    return manifest


def _shard_pattern(folder: Path, n: int) -> str:
    return str(folder / "00000000.tar") if n == 1 else str(folder / f"{{00000000..{n - 1:08d}}}.tar")


def make_tiny_dataset(
    out_dir: str | os.PathLike = DEFAULT_OUT,
    vocab_size: int = 512,
    seq_len: int = 128,
    train_shards: int = 4,
    val_fraction: float = 0.05,
    max_chars: int | None = None,
    seed: int = 0,
) -> dict[str, str | int]:
    """Build tokenizer + train/val shards under ``out_dir``; return their paths and sizes.

    Keys: ``tokenizer`` (tokenizer.json), ``train_data`` (brace pattern of train shards),
    ``train_manifest``, ``val_data`` (one shard), ``train_sequences``, ``val_sequences``,
    ``train_tokens``, ``vocab_size``, ``seq_len``, ``eos_id``.
    """
    if vocab_size < 258:
        raise ValueError(f"make_tiny_dataset: vocab_size must be >= 258 (bytes + <|endoftext|>), got {vocab_size}")
    if seq_len <= 0 or train_shards <= 0:
        raise ValueError(f"make_tiny_dataset: seq_len and train_shards must be positive, got {seq_len}, {train_shards}")
    out = Path(out_dir)
    existed = out.exists()
    out.mkdir(parents=True, exist_ok=True)
    fresh = not any(out.iterdir())
    if fresh:  # a new, empty folder of generated data: keep it out of git (never touch one in use)
        (out / ".gitignore").write_text("*\n")
    try:
        return _make(out, vocab_size, seq_len, train_shards, val_fraction, seed, max_chars)
    except BaseException:
        if fresh:  # nothing half-built left behind in a folder this run started (an empty one it found stays)
            for child in out.iterdir() if existed else ():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
            if not existed:
                shutil.rmtree(out, ignore_errors=True)
        raise


def _make(out: Path, vocab_size: int, seq_len: int, train_shards: int, val_fraction: float, seed: int, max_chars):

    docs = source_documents()
    if max_chars is not None:
        kept, total = [], 0
        for d in docs:
            if total >= max_chars:
                break
            kept.append(d[: max_chars - total])
            total += len(kept[-1])
        docs = kept
    tok = train_tokenizer(docs, vocab_size)
    tok_path = out / "tokenizer.json"
    tok.save(str(tok_path))
    eos_id = tok.token_to_id(EOS)

    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eos_id)
    n = seq_len + 1
    seqs = [ids[i : i + n] for i in range(0, len(ids) - n + 1, n)]
    random.Random(seed).shuffle(seqs)
    n_val = max(1, round(len(seqs) * val_fraction))
    val, train = seqs[:n_val], seqs[n_val:]
    if len(train) < train_shards:
        raise ValueError(f"make_tiny_dataset: only {len(train)} training sequences for {train_shards} shards")

    per_shard = -(-len(train) // train_shards)
    train_manifest = _write_shards(train, out / "train", per_shard)
    _write_shards(val, out / "val", len(val))
    (out / "info.json").write_text(
        json.dumps({"vocab_size": tok.get_vocab_size(), "seq_len": seq_len, "train": len(train), "val": len(val)})
    )
    return {
        "tokenizer": str(tok_path),
        "train_data": _shard_pattern(out / "train", len(train_manifest)),
        "train_manifest": str(out / "train" / "manifest.jsonl"),
        "val_data": _shard_pattern(out / "val", 1),
        "train_sequences": len(train),
        "val_sequences": len(val),
        "train_tokens": len(train) * seq_len,
        "vocab_size": tok.get_vocab_size(),
        "seq_len": seq_len,
        "eos_id": eos_id,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="examples/tiny_cpu.yaml reads the defaults (examples/tiny_data, 4 shards, vocab 512, mamba_tiny): "
        "with another folder, --vocab-size or --seq-len, edit its data paths, train-num-samples and model to match.",
    )
    parser.add_argument("out_dir", nargs="?", default=str(DEFAULT_OUT), help="output folder (default: %(default)s)")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=512,
        help="tokens in the trained byte-level BPE tokenizer, at least 258; the model config's vocab_size must be at "
        "least this (default: %(default)s, mamba_tiny's)",
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        default=128,
        help="tokens per training sequence; each sample holds seq_len + 1 tokens, the inputs and their shifted "
        "targets (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        info = make_tiny_dataset(args.out_dir, vocab_size=args.vocab_size, seq_len=args.seq_len)
    except ValueError as e:
        parser.error(str(e))
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
