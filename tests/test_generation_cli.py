"""``openlm-mamba generate`` end to end: offline tokenizer, OpenLM-format checkpoints (one trained by open_lm)."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from openlm_mamba import MambaConfig, MambaLM, generate
from openlm_mamba.cli import main as cli_main

from .conftest import has_module, help_parser, undocumented_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    not (has_module("tokenizers") and has_module("transformers")), reason="needs tokenizers and transformers"
)

TEXT = [
    "The Toyota Supra is a sports car made by Toyota.",
    "Mamba is a selective state space model for language modelling.",
    "A recurrent state of fixed size replaces the growing key value cache.",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (vocab 300 < mamba_tiny's 512) trained offline and saved HF-style."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXT * 10, trainer)
    out = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>").save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def openlm_style_checkpoint(tmp_path_factory) -> tuple[Path, MambaLM]:
    """A random mamba_tiny saved the way open_lm.main saves epoch_N.pt (DDP ``module.`` prefix)."""
    torch.manual_seed(0)
    model = MambaLM(MambaConfig.load("mamba_tiny")).eval()
    sd = {"module." + k: v for k, v in model.state_dict().items() if k != "model.lm_head.weight"}
    path = tmp_path_factory.mktemp("ckpt") / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "tiny", "state_dict": sd}, path)
    return path, model


class Recorder(io.StringIO):
    """stdout that remembers each write (to see that tokens are streamed, not printed once)."""

    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def run_cli(monkeypatch, argv: list[str]) -> tuple[int, Recorder]:
    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = cli_main(["generate", *argv])
    return rc, out


def test_cli_greedy_streams_the_same_text_as_generate(monkeypatch, tokenizer_dir, openlm_style_checkpoint):
    from transformers import AutoTokenizer

    path, model = openlm_style_checkpoint
    prompt = "The Toyota Supra"
    args = ["--model", "mamba_tiny", "--checkpoint", str(path), "--tokenizer", str(tokenizer_dir)]
    rc, out = run_cli(monkeypatch, [*args, "--prompt", prompt, "--greedy", "--max-new-tokens", "12"])
    assert rc == 0
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    expected = generate(model, ids, max_new_tokens=12, eos_token_id=tok.eos_token_id)
    text = prompt + tok.decode(expected[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
    assert out.getvalue() == text + "\n"
    assert len(out.writes) >= 3  # prompt, then pieces as tokens arrive


def test_cli_several_prompts_run_as_one_batch(monkeypatch, capsys, tokenizer_dir, openlm_style_checkpoint):
    """--prompt repeated: one left-padded batch, each text what that prompt alone gives, in order, a blank line
    between them; the stats line counts the prompts."""
    from transformers import AutoTokenizer

    path, model = openlm_style_checkpoint
    prompts = ["The Toyota Supra is a sports car", "Mamba", "A recurrent state"]
    args = ["--checkpoint", str(path), "--tokenizer", str(tokenizer_dir), "--greedy", "--max-new-tokens", "10"]
    rc, out = run_cli(monkeypatch, [*args, *(a for p in prompts for a in ("--prompt", p)), "--stats"])
    assert rc == 0
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    texts = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")["input_ids"]
        new = generate(model, ids, max_new_tokens=10, eos_token_id=tok.eos_token_id)[0, ids.shape[1] :]
        texts.append(p + tok.decode(new.tolist(), skip_special_tokens=True))
    assert len({len(tok(p)["input_ids"]) for p in prompts}) == 3  # three lengths: padding is exercised
    assert out.getvalue() == "\n\n".join(texts) + "\n"
    assert re.search(
        r"3 prompts of up to \d+ tokens, first token after .* tokens/s per sequence", capsys.readouterr().err
    )
    rc, _ = run_cli(monkeypatch, [*args, "--prompt", "Mamba", "--prompt", ""])  # the empty one is named
    assert rc != 0 and "error: --prompt 2 ('') encodes to zero tokens" in capsys.readouterr().err


def test_cli_model_card_sampling_is_reproducible(monkeypatch, tokenizer_dir, openlm_style_checkpoint):
    path, _ = openlm_style_checkpoint
    args = ["--checkpoint", str(path), "--tokenizer", str(tokenizer_dir), "--prompt", "Mamba is", "--seed", "3"]
    rc1, out1 = run_cli(monkeypatch, [*args, "--max-new-tokens", "10"])
    rc2, out2 = run_cli(monkeypatch, [*args, "--max-new-tokens", "10", "--no-stream"])
    assert rc1 == rc2 == 0
    assert out1.getvalue() == out2.getvalue() and out1.getvalue().startswith("Mamba is")


def test_cli_stats_line_on_stderr(monkeypatch, capsys, tokenizer_dir, openlm_style_checkpoint):
    path, _ = openlm_style_checkpoint
    args = ["--checkpoint", str(path), "--tokenizer", str(tokenizer_dir), "--prompt", "Mamba is", "--greedy"]
    rc, out = run_cli(monkeypatch, [*args, "--max-new-tokens", "6", "--stats", "--no-stream"])
    assert rc == 0 and "[openlm-mamba]" not in out.getvalue()  # stdout holds only the text
    err = capsys.readouterr().err
    assert re.search(
        r"\[openlm-mamba\] cpu float32: prompt \d+ tokens, first token after [\d.]+ ms, "
        r"then 5 tokens at [\d.]+ tokens/s \([\d.]+ ms each\)",
        err,
    ), err


def test_cli_accepts_compiled_model_prefix_and_bare_state_dict(monkeypatch, tmp_path, tokenizer_dir):
    torch.manual_seed(1)
    model = MambaLM(MambaConfig.load("mamba_tiny"))
    compiled = tmp_path / "epoch_2.pt"
    torch.save(
        {"epoch": 2, "state_dict": {"module._orig_mod." + k: v for k, v in model.state_dict().items()}}, compiled
    )
    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    outs = []
    for path in (compiled, bare):
        argv = ["--model", "mamba_tiny", "--checkpoint", str(path), "--tokenizer", str(tokenizer_dir)]
        rc, out = run_cli(monkeypatch, [*argv, "--prompt", "Mamba", "--greedy", "--max-new-tokens", "6"])
        assert rc == 0
        outs.append(out.getvalue())
    assert outs[0] == outs[1]


def test_cli_accepts_hf_directory(monkeypatch, tmp_path, tokenizer_dir, openlm_style_checkpoint):
    """An HF MambaForCausalLM directory (made by openlm_mamba.convert) generates the same text."""
    from openlm_mamba.convert import convert

    path, _ = openlm_style_checkpoint
    hf_dir = convert(path, tmp_path / "hf", to="hf", model="mamba_tiny", progress=False)
    outs = []
    for ckpt in (path, hf_dir):
        argv = ["--model", "mamba_tiny", "--checkpoint", str(ckpt), "--tokenizer", str(tokenizer_dir)]
        rc, out = run_cli(monkeypatch, [*argv, "--prompt", "Mamba", "--greedy", "--max-new-tokens", "6"])
        assert rc == 0
        outs.append(out.getvalue())
    assert outs[0] == outs[1]


def test_cli_clear_errors(monkeypatch, capsys, tmp_path, tokenizer_dir, openlm_style_checkpoint):
    """Bad input: one line on stderr, exit code 2 (as the other commands), and nothing on stdout: the prompt is
    echoed only once everything is checked."""
    path, _ = openlm_style_checkpoint
    base = ["--checkpoint", str(path), "--prompt", "x"]
    tok = ["--tokenizer", str(tokenizer_dir)]
    cases = [
        ([*base, "--tokenizer", "no-such-org/no-such-tokenizer"], r"--tokenizer 'no-such-org/no-such-tokenizer'.*"),
        ([*base, "--tokenizer", str(tmp_path)], r"--tokenizer .*" + re.escape(str(tmp_path))),
        ([*base, *tok, "--top-p", "0"], r"top_p must be in \(0.0, 1.0\]"),
        (["--checkpoint", str(tmp_path / "missing.pt"), "--prompt", "x", *tok], "no such file"),
        ([*base, *tok, "--model", "mamba_130m"], "d_model"),  # checkpoint does not match --model
        ([*base, *tok, "--device", "tpu"], r"--device tpu: not a valid torch device"),
        ([*base, *tok, "--device", "cuda:7"], r"--device cuda:7: (this torch build .* has no CUDA|no CUDA|only \d)"),
    ]
    if not torch.cuda.is_available():  # no mamba_ssm kernels on CPU: an explicit "cuda" backend cannot run
        cases.append(([*base, *tok, "--backend", "cuda"], r"causal_conv1d: backend 'cuda' is unavailable on cpu"))
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        cases.append(([*base, *tok, "--backend", "triton"], r"causal_conv1d: backend 'triton' is unavailable on cpu"))
    for argv, pattern in cases:
        rc, out = run_cli(monkeypatch, argv)
        err = capsys.readouterr().err
        assert rc == 2, (argv, err)
        assert re.search(r"^error: .*" + pattern, err, re.M | re.S), (argv, err)
        assert "Traceback" not in err, err
        assert out.getvalue() == "", (argv, out.getvalue())


def test_cli_tokenizer_that_does_not_match_the_checkpoint(monkeypatch, capsys, tmp_path, tokenizer_dir):
    """Token ids beyond the model's vocabulary: an error naming the mismatch, before anything is printed."""
    torch.manual_seed(0)
    small = MambaLM(MambaConfig.load("mamba_tiny").replace(vocab_size=128)).eval()  # the tokenizer has 300 tokens
    path = tmp_path / "small.pt"
    torch.save({"state_dict": small.state_dict()}, path)
    for prompt in ("The Toyota Supra is a sports car", "a"):  # also a prompt whose ids happen to fit
        argv = ["--checkpoint", str(path), "--tokenizer", str(tokenizer_dir), "--prompt", prompt]
        rc, out = run_cli(monkeypatch, argv)
        err = capsys.readouterr().err
        assert rc == 2 and "more than the model's vocabulary of 128: it does not match the checkpoint" in err, err
        assert out.getvalue() == ""


def test_incremental_text_adds_up_to_the_whole_decode_at_a_bounded_cost(tokenizer_dir):
    """Streaming decodes a window of the latest tokens, not the whole output again per token (that was quadratic
    in the output length), and the pieces add up to tokenizer.decode of all tokens: random ids, so multi-byte
    characters split across tokens and special tokens come up."""
    from transformers import AutoTokenizer

    from openlm_mamba.commands.generate import IncrementalText

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    longest = []
    real = tok.decode

    def decode(ids, **kwargs):
        longest.append(len(ids))
        return real(ids, **kwargs)

    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        ids = torch.randint(0, len(tok), (400,), generator=g).tolist()
        text = IncrementalText(tok)
        tok.decode = decode
        try:
            pieces = [text.add(i) for i in ids] + [text.flush()]
        finally:
            tok.decode = real
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True), trial
        assert max(longest) <= text.window + 1, max(longest)


def test_incremental_text_survives_the_tokenizers_clean_up_of_spaces():
    """Clean-up deletes a space before "." or "'" once the next token arrives: the stream must not have printed
    it, nor lose characters after it (it printed "hello don '." for "hello don't.")."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from openlm_mamba.commands.generate import IncrementalText

    vocab = {"[UNK]": 0, "[SEP]": 1, "don": 2, "'": 3, "t": 4, "hello": 5, ".": 6, ",": 7, "s": 8, "n't": 9}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=inner, unk_token="[UNK]", eos_token="[SEP]", clean_up_tokenization_spaces=True
    )
    cases = [[5, 2, 3, 4, 6], [5, 7, 8, 6, 6, 5], [2, 9, 5, 3, 8, 7], [5, 3, 5, 3, 4, 1, 6]]
    for ids in cases:
        stream = IncrementalText(tok)
        pieces = [stream.add(i) for i in ids]
        whole = tok.decode(ids, skip_special_tokens=True)
        assert "".join(pieces) + stream.flush() == whole, (ids, pieces)
        printed = ""
        for n, piece in enumerate(pieces, 1):  # never ahead of what the tokens so far decode to
            printed += piece
            assert tok.decode(ids[:n], skip_special_tokens=True).startswith(printed), (ids, n, printed)
    assert tok.decode([5, 2, 3, 4, 6]) == "hello don't."  # the clean-up this test is about is on


def test_cli_greedy_means_no_repetition_penalty(monkeypatch, tokenizer_dir, openlm_style_checkpoint):
    """--greedy decodes as plain greedy (generate()'s and transformers' default penalty 1.0) unless a penalty
    is given; sampling keeps the model card's 1.1."""
    path, model = openlm_style_checkpoint
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompt = "Mamba is a selective state space model"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    base = ["--checkpoint", str(path), "--tokenizer", str(tokenizer_dir), "--prompt", prompt, "--greedy"]
    texts = {}
    for penalty in (None, 1.0, 1.5):
        argv = [*base, "--max-new-tokens", "24", "--no-stream"]
        rc, out = run_cli(monkeypatch, argv + ([] if penalty is None else ["--repetition-penalty", str(penalty)]))
        assert rc == 0
        texts[penalty] = out.getvalue()
    plain = generate(model, ids, max_new_tokens=24, eos_token_id=tok.eos_token_id)
    assert texts[None] == prompt + tok.decode(plain[0, ids.shape[1] :].tolist(), skip_special_tokens=True) + "\n"
    assert texts[None] == texts[1.0] != texts[1.5]


def tiny_recipe():
    """examples/make_tiny_data.py (the tiny CPU recipe's data + offline tokenizer builder), if present."""
    import importlib.util

    path = Path(ROOT) / "examples" / "make_tiny_data.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("make_tiny_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_recipe_keeps_an_existing_folders_gitignore(tmp_path):
    """make_tiny_data marks a new or empty folder as generated (.gitignore "*"), but never writes into a folder
    already in use (e.g. ``make_tiny_data.py .`` in a user's repository)."""
    recipe = tiny_recipe()
    if recipe is None:
        pytest.skip("examples/make_tiny_data.py is not present")
    recipe.make_tiny_dataset(tmp_path / "new", max_chars=20_000)
    assert (tmp_path / "new" / ".gitignore").read_text() == "*\n"
    (tmp_path / "empty").mkdir()  # made beforehand, still empty: marked too
    recipe.make_tiny_dataset(tmp_path / "empty", max_chars=20_000)
    assert (tmp_path / "empty" / ".gitignore").read_text() == "*\n"
    mine = tmp_path / "repo"
    mine.mkdir()
    (mine / ".gitignore").write_text("build/\n")
    recipe.make_tiny_dataset(mine, max_chars=20_000)
    assert (mine / ".gitignore").read_text() == "build/\n"
    assert (mine / "tokenizer.json").is_file()


def test_tiny_recipe_failure_leaves_no_half_built_folder(tmp_path, capsys):
    """Settings the text cannot fill (a sequence longer than the corpus): one error line, and no tokenizer or
    .gitignore left in the folder the run started (an empty folder found there stays, empty)."""
    recipe = tiny_recipe()
    if recipe is None:
        pytest.skip("examples/make_tiny_data.py is not present")
    found = tmp_path / "found"
    found.mkdir()
    for out in (tmp_path / "new", found):
        with pytest.raises(SystemExit) as exit_info:
            recipe.main([str(out), "--seq-len", "100000"])
        assert exit_info.value.code == 2
        assert "error: make_tiny_dataset: only 1 training sequences for 4 shards" in capsys.readouterr().err
    assert not (tmp_path / "new").exists() and list(found.iterdir()) == []


def test_tiny_recipe_help_explains_every_flag(capsys, monkeypatch):
    """examples/make_tiny_data.py --help: every flag has a help text (--vocab-size and --seq-len had none)."""
    recipe = tiny_recipe()
    if recipe is None:
        pytest.skip("examples/make_tiny_data.py is not in this tree")
    parser = help_parser(monkeypatch, recipe.main)
    assert not undocumented_flags(parser), undocumented_flags(parser)
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 512, mamba_tiny's)" in out and "(default: 128)" in out


@pytest.mark.openlm
def test_cli_on_checkpoint_trained_by_open_lm(monkeypatch, tmp_path, tokenizer_dir):
    """Acceptance 5: the tiny CPU recipe (its offline tokenizer and data) for a few steps of open_lm.main,
    then generate from the epoch_1.pt it wrote."""
    if not has_module("open_lm"):
        pytest.skip("open_lm (OpenLM) is not importable")
    recipe = tiny_recipe()
    if recipe is not None:  # real text, tokenizer.json trained offline, webdataset shards
        info = recipe.make_tiny_dataset(tmp_path / "data", max_chars=50_000)
        data = ["--train-data", info["train_data"], "--data-key", "json.gz", "--global-batch-size", "16"]
        tokenizer = info["tokenizer"]
    else:  # recipe not available: OpenLM's synthetic data and this module's tokenizer
        data = ["--dataset-type", "synthetic", "--global-batch-size", "16"]
        tokenizer = str(tokenizer_dir)
    cmd = [
        sys.executable,
        "-m",
        "openlm_mamba.train",  # registers the plugin, then runs open_lm.main unmodified
        "--model",
        "mamba_tiny",
        *data,
        "--train-num-samples",
        "4096",  # tokens: 2 steps of 16 sequences x 128
        "--epochs",
        "1",
        "--lr",
        "3e-3",
        "--warmup",
        "1",
        "--precision",
        "fp32",
        "--workers",
        "0" if recipe is None else "1",
        "--seed",
        "0",
        "--logs",
        str(tmp_path),
        "--name",
        "tiny",
        "--report-to",
        "",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    ckpt = tmp_path / "tiny" / "checkpoints" / "epoch_1.pt"
    assert proc.returncode == 0 and ckpt.is_file(), proc.stdout[-2000:] + proc.stderr[-4000:]
    argv = ["--model", "mamba_tiny", "--checkpoint", str(ckpt), "--tokenizer", tokenizer]
    rc, out = run_cli(monkeypatch, [*argv, "--prompt", "The Toyota Supra", "--seed", "0", "--max-new-tokens", "8"])
    assert rc == 0 and out.getvalue().startswith("The Toyota Supra") and len(out.writes) >= 2


def test_bare_tokenizer_json_copied_into_a_checkpoint_dir(tmp_path, tokenizer_dir, openlm_style_checkpoint):
    """A lone tokenizer.json (what make_tiny_data writes) copied into a converted HF dir: read as that file, not
    by AutoTokenizer, which builds the class the dir's config.json suggests (GPT-NeoX's for a Mamba) and adds
    its own <|padding|> token past the model's vocabulary."""
    from openlm_mamba.commands.generate import load_tokenizer
    from openlm_mamba.convert import convert

    path, _ = openlm_style_checkpoint
    hf_dir = convert(path, tmp_path / "hf", to="hf", model="mamba_tiny", progress=False)
    shutil.copy(tokenizer_dir / "tokenizer.json", hf_dir / "tokenizer.json")
    bare = load_tokenizer(tokenizer_dir / "tokenizer.json")
    tok = load_tokenizer(hf_dir)
    assert len(tok) == len(bare) == 300 and tok.eos_token == "<|endoftext|>"
    assert tok.encode("Mamba state") == bare.encode("Mamba state")
    # with transformers' own metadata beside it, the directory is read as transformers reads it (its EOS kept)
    (hf_dir / "special_tokens_map.json").write_text('{"eos_token": "<unk>"}')
    assert load_tokenizer(hf_dir).eos_token == "<unk>"


def test_cli_tokenizer_defaults_to_the_checkpoint_directorys(monkeypatch, capsys, tmp_path, tokenizer_dir):
    """Without --tokenizer, generate takes the checkpoint directory's own tokenizer (as eval does), else
    Mamba-7B's from the hub, and says why when that cannot be had offline."""
    from openlm_mamba.convert import convert

    torch.manual_seed(0)
    model = MambaLM(MambaConfig.load("mamba_tiny"))
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, tmp_path / "epoch_1.pt")
    hf_dir = convert(tmp_path / "epoch_1.pt", tmp_path / "hf", to="hf", model="mamba_tiny", progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, hf_dir / name)
    args = ["--prompt", "Mamba", "--greedy", "--max-new-tokens", "4"]
    rc, own = run_cli(monkeypatch, ["--checkpoint", str(hf_dir), *args])
    rc2, given = run_cli(monkeypatch, ["--checkpoint", str(hf_dir), "--tokenizer", str(tokenizer_dir), *args])
    assert rc == rc2 == 0 and own.getvalue() == given.getvalue()
    capsys.readouterr()
    rc, _ = run_cli(monkeypatch, ["--checkpoint", str(tmp_path / "epoch_1.pt"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and "EleutherAI/gpt-neox-20b" in err and "has no tokenizer files" in err, err


def test_cli_missing_checkpoint_is_named_before_the_default_tokenizer(monkeypatch, capsys, tmp_path):
    """A mistyped --checkpoint without --tokenizer: the checkpoint is named, not a failed tokenizer download."""
    rc, _ = run_cli(monkeypatch, ["--checkpoint", str(tmp_path / "typo.pt"), "--prompt", "hi"])
    assert (
        rc == 2
        and capsys.readouterr().err.strip() == f"error: --checkpoint {tmp_path / 'typo.pt'}: no such file or directory"
    )
