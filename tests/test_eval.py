"""lm-eval adapter: an offline multiple-choice task through lm-eval, log-likelihoods equal transformers' Mamba."""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import has_module

pytestmark = pytest.mark.skipif(
    not (has_module("lm_eval") and has_module("transformers") and has_module("tokenizers")),
    reason="lm-eval, transformers and tokenizers are needed (pip install lm-eval transformers tokenizers)",
)

CORPUS = [
    "The cat sat on the mat.",
    "A dog runs in the park every morning.",
    "Water boils at one hundred degrees.",
    "The sun rises in the east and sets in the west.",
    "Birds can fly, fish can swim.",
    "Paris is the capital of France.",
]

QUESTIONS = [
    ("Where does the sun rise?", ["In the east.", "In the west.", "Under the sea.", "On the mat."], 0),
    ("What sat on the mat?", ["A fish.", "The cat.", "Paris.", "Water."], 1),
    ("What can birds do?", ["Boil.", "Swim.", "Fly.", "Rise."], 2),
    ("What is the capital of France?", ["The park.", "The dog.", "The east.", "Paris."], 3),
    ("When does the dog run?", ["Every morning.", "Never.", "At night.", "In France."], 0),
    ("At what does water boil?", ["Zero degrees.", "One hundred degrees.", "The mat.", "West."], 1),
]

TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    texts = CORPUS + [q + " " + " ".join(c) for q, c, _ in QUESTIONS]
    tok.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    assert wrapped.eos_token_id == 0 and len(wrapped) <= 512
    return wrapped


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random model converted to an HF dir (with tokenizer), our adapter on it, and HF's model on it."""
    from transformers import MambaForCausalLM

    from openlm_mamba import MambaLM
    from openlm_mamba.convert import convert
    from openlm_mamba.evaluation import MambaEvalLM

    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    model = MambaLM("mamba_tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, root / "epoch_1.pt")
    convert(root / "epoch_1.pt", root / "hf", to="hf", model="mamba_tiny", progress=False)
    tokenizer = _tokenizer()
    tokenizer.save_pretrained(root / "hf")
    lm = MambaEvalLM(pretrained=root / "hf", batch_size=4, max_length=128)  # tokenizer found in the dir
    hf = MambaForCausalLM.from_pretrained(root / "hf").eval()
    return root, lm, hf


def _hf_loglikelihoods(hf, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
    """sum log p(cont | ctx) from transformers' MambaForCausalLM, one right-padded batch (causal: padding is inert)."""
    width = max(len(c) + len(t) for c, t in pairs)
    ids = torch.zeros(len(pairs), width, dtype=torch.long)
    for row, (ctx, cont) in enumerate(pairs):
        ids[row, : len(ctx) + len(cont)] = torch.tensor(ctx + cont)
    with torch.no_grad():
        logp = torch.log_softmax(hf(ids).logits.float(), dim=-1)
    out = []
    for row, (ctx, cont) in enumerate(pairs):
        rows = logp[row, len(ctx) - 1 : len(ctx) + len(cont) - 1]
        out.append(rows.gather(-1, torch.tensor(cont)[:, None]).sum().item())
    return out


def _hf_loglikelihood(hf, ctx: list[int], cont: list[int]) -> float:
    return _hf_loglikelihoods(hf, [(ctx, cont)])[0]


@pytest.fixture(scope="module")
def task_dir(setup):
    """A local multiple-choice task: JSONL data + an lm-eval task YAML pointing at it."""
    root = setup[0]
    data = root / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": y}) + "\n" for q, c, y in QUESTIONS))
    tasks = root / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "tiny_mc.yaml").write_text(TASK_YAML.format(data=data))
    return tasks


def test_lm_eval_multiple_choice_offline_matches_transformers(setup, task_dir, monkeypatch):
    from openlm_mamba.evaluation import evaluate, results_table

    _root, lm, hf = setup
    tasks = task_dir
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    results = evaluate(lm, ["tiny_mc"], include_path=tasks, log_samples=True, include_defaults=False)
    acc = results["results"]["tiny_mc"]["acc,none"]
    samples = results["samples"]["tiny_mc"]
    assert len(samples) == len(QUESTIONS)

    pairs = [lm._encode_pair(ctx, cont) for sample in samples for ctx, cont in sample["arguments"]]
    theirs = iter(_hf_loglikelihoods(hf, pairs))
    correct = 0
    for sample in samples:
        ours = [resp[0][0] for resp in sample["resps"]]
        hf_lls = [next(theirs) for _ in ours]
        assert max(abs(a - b) for a, b in zip(ours, hf_lls)) < 1e-4, (sample["arguments"], ours, hf_lls)
        correct += int(max(range(len(hf_lls)), key=hf_lls.__getitem__) == sample["target"])
    assert acc == pytest.approx(correct / len(QUESTIONS))  # the accuracy lm-eval reports is transformers' too
    table = results_table(results)
    assert "| tiny_mc | 0 |" in table and f"{100 * acc:.1f}" in table


def test_shared_contexts_score_as_whole_requests_with_fewer_tokens(setup):
    """Requests sharing a context (choices of one question) read it once and continue from copies of its state:
    the same log-likelihoods and greedy flags as scoring each request whole (and as transformers), with fewer
    tokens through the model. Covers 1-token and longer continuations, singletons, a continuation as long
    as max_length and contexts cut at max_length."""
    from openlm_mamba.evaluation import MambaEvalLM

    _, lm, hf = setup
    g = torch.Generator().manual_seed(0)

    def toks(n: int) -> list[int]:
        return torch.randint(1, 400, (n,), generator=g).tolist()

    ctxs = [toks(n) for n in (30, 7, 1, 120)]  # the last is cut at max_length with its longer continuations
    reqs = [(None, ctx, toks(n)) for ctx in ctxs for n in (1, 3, 1, 6, 2)]
    reqs += [(None, toks(12), toks(4)), (None, toks(5), toks(128)), (None, ctxs[1], toks(1))]  # alone, max_length
    assert lm.share_contexts and lm.batch_size == 4
    shared = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    kw = {"model": lm.model, "tokenizer": lm.tokenizer, "max_length": 128}
    whole = MambaEvalLM(**kw, batch_size=4, share_contexts=False)._loglikelihood_tokens(reqs, disable_tqdm=True)
    for (a, ga), (b, gb) in zip(shared, whole):
        assert abs(a - b) < 1e-4 and ga == gb, (a, b)
    counted: list[int] = []  # tokens through the model, one request or context at a time (no padding)
    hook = lm.model.model.backbone.embedding.register_forward_pre_hook(lambda _m, a: counted.append(a[0].numel()))
    tokens = []
    try:
        for share in (False, True):
            counted.clear()
            one = MambaEvalLM(**kw, batch_size=1, share_contexts=share)._loglikelihood_tokens(reqs, disable_tqdm=True)
            assert [ll for ll, _ in one] == pytest.approx([ll for ll, _ in shared], abs=1e-4)
            tokens.append(sum(counted))
    finally:
        hook.remove()
    # each context once, then each continuation but its first token (scored from the context's last logits);
    # the two requests alone run whole (15 and 128 input tokens)
    assert tokens[1] == sum(len(c) + (0 + 2 + 0 + 5 + 1) for c in ctxs) + 15 + 128, tokens
    assert tokens[1] < 0.5 * tokens[0], tokens
    # an empty context scores as lm-eval scores it: after the prefix (EOT) token
    empty = lm._loglikelihood_tokens([(None, [], ctxs[0][:3]), (None, [lm.prefix_token_id], ctxs[0][:3])], True)
    assert empty[0] == pytest.approx(empty[1], abs=1e-6)
    for text, flag in (("false", False), ("True", True), ("0", False), ("yes", True)):
        assert MambaEvalLM(**kw, share_contexts=text).share_contexts is flag
    with pytest.raises(ValueError, match="share_contexts must be true or false, got 'maybe'"):
        MambaEvalLM(**kw, share_contexts="maybe")
    for (_, ctx, cont), (ll, _) in list(zip(reqs, shared))[:10]:  # against transformers too
        assert ll == pytest.approx(_hf_loglikelihood(hf, ctx, cont), abs=1e-4)


def test_few_shot_prefix_read_once_per_batch(setup):
    """Contexts with a long common start (few-shot examples) read it once per batch, then each rest from
    copies of its state: the same log-likelihoods as scoring whole, with far fewer tokens. Covers a context
    equal to the prefix, all-1-token choice groups (one row per context) and multi-token ones, singletons."""
    from openlm_mamba.evaluation import PREFIX_MIN, MambaEvalLM

    _, lm, _ = setup
    g = torch.Generator().manual_seed(1)

    def toks(n: int) -> list[int]:
        return torch.randint(1, 400, (n,), generator=g).tolist()

    shots = toks(3 * PREFIX_MIN)
    ctxs = [shots] + [shots + toks(n) for n in (5, 1, 12, 7, 3, 9)]
    reqs = [(None, c, toks(1)) for c in ctxs for _ in range(4)]  # MMLU-like: four 1-token choices
    reqs += [(None, c, toks(k)) for c in ctxs[:3] for k in (1, 3)]  # mixed lengths for three of them
    reqs += [(None, shots + toks(4), toks(2))]  # a singleton with the same start
    kw = {"model": lm.model, "tokenizer": lm.tokenizer, "max_length": 512}
    counted: list[int] = []
    hook = lm.model.model.backbone.embedding.register_forward_pre_hook(lambda _m, a: counted.append(a[0].numel()))
    out, tokens = [], []
    try:
        for share, size in ((False, 4), (True, 4), (True, 1)):
            counted.clear()
            out.append(MambaEvalLM(**kw, batch_size=size, share_contexts=share)._loglikelihood_tokens(reqs, True))
            tokens.append(sum(counted))
    finally:
        hook.remove()
    for results in out[1:]:
        for (a, ga), (b, gb) in zip(results, out[0]):
            assert abs(a - b) < 1e-4 and ga == gb, (a, b)
    # one at a time (no padding): the prefix once, then each context's rest once for its 1-token choices and
    # rest + all but the last token for each longer choice (the singleton's too); a rest of 0 tokens runs nothing
    rests = (0, 5, 1, 12, 7, 3, 9)
    assert tokens[2] == len(shots) + sum(rests) + sum(n + 2 for n in rests[:3]) + (4 + 1), tokens
    assert tokens[1] < 0.2 * tokens[0], tokens


def test_loglikelihood_rolling_and_generate_until(setup):
    from lm_eval.api.instance import Instance

    _, lm, hf = setup
    text = CORPUS[3]
    req = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    (rolled,) = lm.loglikelihood_rolling([req], disable_tqdm=True)
    tokens = lm.tok_encode(text)
    assert rolled == pytest.approx(_hf_loglikelihood(hf, [lm.eot_token_id], tokens), abs=1e-4)

    # greedy continuation equals transformers' argmax continuation, cut at the stop sequence
    prompt = "The cat"
    ids = lm.tok_encode(prompt)
    want = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(hf(torch.tensor([ids + want])).logits[0, -1].argmax())
            if nxt == lm.eot_token_id:
                break
            want.append(nxt)
    gen = Instance(
        request_type="generate_until", doc={}, arguments=(prompt, {"until": ["\n\n\n"], "max_gen_toks": 6}), idx=0
    )
    (out,) = lm.generate_until([gen], disable_tqdm=True)
    assert out == lm.tok_decode(want).split("\n\n\n")[0]


def test_generate_until_batches_give_the_single_request_answers(setup):
    """batch_size 3: requests of different context lengths and budgets decode in left-padded batches, each
    answer (and its order) what the request alone gets."""
    from lm_eval.api.instance import Instance

    from openlm_mamba.evaluation import MambaEvalLM

    _, lm, _ = setup
    prompts = ["The cat", "A", "The dog sat on the mat and", "Once upon a time there", "Dogs", "The"]
    reqs = [
        Instance(
            request_type="generate_until",
            doc={},
            arguments=(p, {"until": ["\n\n\n"] if i % 3 else ["e"], "max_gen_toks": 5 + i % 2}),
            idx=i,
        )
        for i, p in enumerate(prompts)
    ]
    assert len({len(lm.tok_encode(p)) for p in prompts}) >= 4
    single = [lm.generate_until([r], disable_tqdm=True)[0] for r in reqs]
    batched = MambaEvalLM(model=lm.model, tokenizer=lm.tokenizer, batch_size=3).generate_until(reqs, disable_tqdm=True)
    assert batched == single and any(single)


def test_generate_until_leaves_requests_alone_and_honours_sampling_settings(setup, caplog):
    """The request's args are not changed (lm-eval's cache keys them: EOS was appended to `until` in place);
    sampling follows lm-eval's normalize_gen_kwargs (do_sample, or a temperature above 0 without it; greedy with
    temperature 0 or do_sample false); lm-eval's max_tokens alias is read; a setting generate() has no
    equivalent for is named in a warning."""
    import copy

    from lm_eval.api.instance import Instance

    _, lm, _ = setup

    def req(**kw):
        return Instance(
            request_type="generate_until", doc={}, arguments=("The cat", {"until": ["\n\n\n"], **kw}), idx=0
        )

    r = req(max_gen_toks=6)
    before = copy.deepcopy(r.args)
    greedy = lm.generate_until([r], disable_tqdm=True)[0]
    assert r.args == before
    for greedy_kw in ({"temperature": 0.0}, {"do_sample": False, "temperature": 5.0}, {"max_new_tokens": None}):
        assert lm.generate_until([req(max_gen_toks=6, **greedy_kw)], disable_tqdm=True)[0] == greedy, greedy_kw
    short = lm.generate_until([req(max_tokens=1)], disable_tqdm=True)[0]
    assert len(lm.tok_encode(short)) <= 1 < len(lm.tok_encode(greedy))
    torch.manual_seed(0)
    for hot in ({"do_sample": True, "temperature": 5.0}, {"temperature": 5.0}):  # a hot temperature: several draws
        sampled = [lm.generate_until([req(max_gen_toks=6, **hot)], True)[0] for _ in range(4)]
        assert len(set(sampled)) > 1, (hot, sampled)
    with caplog.at_level("WARNING"):
        lm.generate_until([req(max_gen_toks=2, num_beams_made_up=3)], disable_tqdm=True)
    assert "num_beams_made_up" in caplog.text


def _bos_tokenizer():
    """A BPE tokenizer like Llama's: BOS <s> (1) distinct from EOS </s> (0), prepended by its post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["</s>", "<s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="<s>", pad_token="<pad>")
    assert (wrapped.eos_token_id, wrapped.bos_token_id) == (0, 1) and wrapped.encode("The")[0] == 1
    return wrapped


def test_tokens_handled_as_lm_evals_transformers_adapter(setup):
    """With a tokenizer that adds a BOS distinct from EOS, every request type gives HFLM's numbers on the same
    weights: BOS where the tokenizer adds it, an empty context after BOS (not EOS); add_bos_token and
    prefix_token_id as HFLM takes them; generated text without special tokens."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from openlm_mamba.evaluation import MambaEvalLM

    _, lm, hf = setup
    tok = _bos_tokenizer()
    ours = MambaEvalLM(model=lm.model, tokenizer=tok, batch_size=2, max_length=64)
    theirs = HFLM(pretrained=hf, tokenizer=tok, batch_size=2, max_length=64)
    assert ours.prefix_token_id == theirs.prefix_token_id == 1
    pairs = [("", " sat on"), ("The cat", " sat on the mat"), ("<s>Birds", " can fly")]
    ll = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    for (a, ga), (b, gb) in zip(ours.loglikelihood(ll, disable_tqdm=True), theirs.loglikelihood(ll, True)):
        assert a == pytest.approx(b, abs=1e-3) and ga == gb
    roll = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(CORPUS[1],), idx=0)]
    assert ours.loglikelihood_rolling(roll, True)[0] == pytest.approx(
        theirs.loglikelihood_rolling(roll, True)[0], abs=1e-3
    )
    gen = [
        Instance(
            request_type="generate_until", doc={}, arguments=("The sun", {"until": ["."], "max_gen_toks": 8}), idx=0
        )
    ]
    assert ours.generate_until(gen, True) == theirs.generate_until(gen, True)
    assert MambaEvalLM(model=lm.model, tokenizer=tok, add_bos_token="false").tok_encode("The")[0] != 1
    custom = MambaEvalLM(model=lm.model, tokenizer=tok, prefix_token_id=2, max_length=64)
    assert custom.prefix_token_id == 2
    theirs_custom = HFLM(pretrained=hf, tokenizer=tok, prefix_token_id=2, max_length=64)
    bos_gen = [
        Instance(request_type="generate_until", doc={}, arguments=(t, {"until": ["."], "max_gen_toks": 8}), idx=0)
        for t in ("<s>The cat", "The cat")
    ]
    seen = []  # the context ids generate_until decodes from, against HFLM's for the same request
    custom._continue = lambda contexts, max_new, sampling: seen.extend(contexts) or [[] for _ in contexts]
    for req in bos_gen:  # a context starting with the BOS text gets no second BOS, whatever prefix_token_id is
        custom.generate_until([req], True)
        assert seen.pop() == theirs_custom.tok_batch_encode([req.args[0]])[0][0].tolist(), req.args
    with pytest.raises(ValueError, match=r"prefix_token_id must be a token id in \[0, 512\), got 99999"):
        MambaEvalLM(model=lm.model, tokenizer=tok, prefix_token_id=99999)

    ours._continue = lambda contexts, max_new, sampling: [[2, *tok.encode(" cat", add_special_tokens=False), 2]]
    assert ours.generate_until(gen, True) == [" cat"]  # "<pad>" dropped, as HFLM decodes


def test_add_bos_token_makes_a_tokenizer_without_its_own_bos_add_one(setup, tmp_path):
    """add_bos_token=True is passed to the tokenizer as HFLM passes it: GPT-NeoX's tokenizer (Mamba-7B's), which
    adds no BOS of its own, then adds one, in every request type (ours scored without it: -26.3 vs -32.9)."""
    import shutil

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import GPTNeoXTokenizer

    from openlm_mamba.evaluation import MambaEvalLM

    root, _, _ = setup
    neox = tmp_path / "neox"
    shutil.copytree(root / "hf", neox)
    tok = GPTNeoXTokenizer(
        tokenizer_file=str(root / "hf" / "tokenizer.json"), bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    tok.save_pretrained(neox)
    assert tok.encode("The cat")[0] != tok.bos_token_id  # no BOS of its own
    theirs = HFLM(pretrained=str(neox), add_bos_token=True, device="cpu", batch_size=2, max_length=64)
    ours = MambaEvalLM(pretrained=neox, add_bos_token=True, batch_size=2, max_length=64)
    assert ours.tok_encode("The cat sat") == theirs.tok_encode("The cat sat")
    assert ours.tok_encode("The cat sat")[0] == tok.bos_token_id
    assert ours._encode_context("The cat") == theirs.tok_batch_encode(["The cat"])[0][0].tolist()
    reqs = [Instance("loglikelihood", {}, ("The cat sat", " on the mat"), 0)]
    (a, _), (b, _) = ours.loglikelihood(reqs, True)[0], theirs.loglikelihood(reqs, True)[0]
    assert a == pytest.approx(b, abs=1e-3)


def test_lengths_beyond_max_length_are_refused_not_cut(setup):
    """A continuation longer than max_length, or a token budget that leaves no room for the context, is an error
    (as in HFLM), not a score of the continuation's tail or an answer to the context's last token alone."""
    from lm_eval.api.instance import Instance

    from openlm_mamba.evaluation import MambaEvalLM

    _, lm, _ = setup
    short = MambaEvalLM(model=lm.model, tokenizer=lm.tokenizer, max_length=8)
    with pytest.raises(ValueError, match=r"a continuation of \d+ tokens is longer than max_length \(8\)"):
        short._loglikelihood_tokens([(None, [3], list(range(5, 15)))], disable_tqdm=True)
    for budget in (8, 9):
        req = Instance(
            request_type="generate_until", doc={}, arguments=(CORPUS[3], {"until": [], "max_gen_toks": budget}), idx=0
        )
        with pytest.raises(ValueError, match=f"asks for {budget} new tokens, which leaves no room"):
            short.generate_until([req], disable_tqdm=True)
    req = Instance(
        request_type="generate_until", doc={}, arguments=(CORPUS[3], {"until": [], "max_gen_toks": 7}), idx=0
    )
    assert isinstance(short.generate_until([req], disable_tqdm=True)[0], str)  # one context token left: allowed


def test_adapter_argument_errors(setup):
    from openlm_mamba.evaluation import MambaEvalLM

    _root, lm, _ = setup
    with pytest.raises(ValueError, match="exactly one of pretrained"):
        MambaEvalLM(tokenizer=lm.tokenizer)
    for bad in (0, "x", "-2"):
        with pytest.raises(ValueError, match=f"batch_size must be a positive int or 'auto', got {bad!r}"):
            MambaEvalLM(model=lm.model, tokenizer=lm.tokenizer, batch_size=bad)
    for size, want in (("auto", 8), ("auto:4", 8), (None, 8), ("16", 16), (3, 3)):  # lm-eval passes strings
        assert MambaEvalLM(model=lm.model, tokenizer=lm.tokenizer, batch_size=size).batch_size == want
    with pytest.raises(TypeError, match=r"unknown argument\(s\) share_context \(share_context: did you mean share_con"):
        MambaEvalLM(model=lm.model, tokenizer=lm.tokenizer, share_context=False)
    assert MambaEvalLM(model=lm.model, tokenizer=lm.tokenizer, max_batch_size=64).batch_size == 1  # lm-eval's own
    with pytest.raises(ValueError, match=r"dtype= applies to pretrained= only; .*model.to\(torch.bfloat16\)"):
        MambaEvalLM(model=lm.model, tokenizer=lm.tokenizer, dtype="bfloat16")  # was silently float32
    with pytest.raises(ValueError, match="device='meta' but the model given is on cpu"):
        MambaEvalLM(model=lm.model, tokenizer=lm.tokenizer, device="meta")
    assert MambaEvalLM(model=lm.model, tokenizer=lm.tokenizer, device="cpu").device == torch.device("cpu")
    for same in ("float32", torch.float32):  # the model's own dtype describes it: accepted
        assert MambaEvalLM(model=lm.model, tokenizer=lm.tokenizer, dtype=same).model is lm.model
    with pytest.raises(ValueError, match="dtype must be one of"):
        MambaEvalLM(model=lm.model, tokenizer=lm.tokenizer, dtype="float33")


def test_cli_eval_on_local_task(setup, task_dir, tmp_path, capsys, monkeypatch):
    from openlm_mamba.cli import main as cli_main

    root = setup[0]
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "results.json"
    import openlm_mamba.convert as convert

    checks = []
    real_check = convert.check_checkpoint
    monkeypatch.setattr(convert, "check_checkpoint", lambda *a: (checks.append(a), real_check(*a))[1])
    argv = ["eval", str(root / "hf"), "--tasks", "tiny_mc", "--include-path", str(task_dir), "--only-local-tasks"]
    assert cli_main([*argv, "--limit", "3", "--batch-size", "2", "--device", "cpu", "--output", str(out)]) == 0
    assert len(checks) == 1, checks  # the CLI checks the checkpoint once; MambaEvalLM does not check it again
    printed = capsys.readouterr().out
    assert "| tiny_mc |" in printed
    saved = json.loads(out.read_text())
    assert 0.0 <= saved["results"]["tiny_mc"]["acc,none"] <= 1.0
    config = saved["config"]  # what produced the numbers (lm-eval alone wrote model_args None, device None)
    assert config["model"] == "openlm-mamba" and config["model_args"]["pretrained"] == str(root / "hf")
    assert config["model_args"]["dtype"] == "float32" and config["batch_size"] == 2 and config["device"] == "cpu"
    assert config["limit"] == 3 and saved["openlm_mamba_version"] and saved["model_name"] == str(root / "hf")
    whole = tmp_path / "whole.json"  # every request scored whole: the same accuracy
    assert cli_main([*argv, "--limit", "3", "--batch-size", "2", "--no-share-contexts", "--output", str(whole)]) == 0
    assert json.loads(whole.read_text())["results"]["tiny_mc"] == saved["results"]["tiny_mc"]
    assert cli_main(["eval", str(root / "hf")]) == 2
    assert "--tasks" in capsys.readouterr().err
    assert cli_main([*argv, "--limit", "2", "--batch-size", "auto", "--output", str(whole)]) == 0  # lm-eval's "auto"
    capsys.readouterr()
    rc, err = _eval_cli(capsys, [*argv[1:], "--num-fewshot", "500", "--limit", "2"])  # more shots than documents
    _one_line_error(rc, err.splitlines()[-1], "error: tiny_mc: lm-eval: ")  # after lm-eval's own progress bars
    assert "Traceback" not in err


def test_cli_model_card_runs_zero_shot_tasks_and_mmlu_five_shot(setup, capsys, monkeypatch):
    """--model-card: one 0-shot run over the five tasks, one 5-shot MMLU run, table against the card."""
    from openlm_mamba import evaluation
    from openlm_mamba.cli import main as cli_main

    calls = []

    def fake_evaluate(lm, tasks, num_fewshot=None, **kwargs):
        calls.append((sorted(tasks), num_fewshot))
        results = {t: {"acc,none": 0.5, "acc_norm,none": 0.25} for t in tasks}
        groups = {}
        if "mmlu" in tasks:
            results = {"mmlu_anatomy": {"acc,none": 0.1}}
            groups = {"mmlu": {"acc,none": 0.333}}
        return {"results": results, "groups": groups, "n-shot": {t: num_fewshot for t in tasks}, "configs": {}}

    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    assert cli_main(["eval", str(setup[0] / "hf"), "--model-card"]) == 0
    assert calls == [(["arc_challenge", "arc_easy", "hellaswag", "piqa", "winogrande"], 0), (["mmlu"], 5)]
    table = capsys.readouterr().out
    assert "| hellaswag | 0 | 50.0 | 25.0 | - | 77.9 |" in table
    assert "| mmlu | 5 | 33.3 | - | - | 33.3 |" in table and "mmlu_anatomy" not in table


def test_results_table_shows_every_metric():
    """Perplexity and generation tasks report no acc: their own metrics show (they used to print only '-')."""
    from openlm_mamba.evaluation import results_table

    results = {
        "results": {
            "ppl": {
                "alias": "ppl",
                "word_perplexity,none": 162892.2,
                "word_perplexity_stderr,none": "N/A",
                "byte_perplexity,none": 7.33,
                "bits_per_byte,none": 2.874,
            },
            "gen": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1},
            "mc": {"acc,none": 0.6, "acc_norm,none": 0.5, "acc_stderr,none": 0.2},
        },
        "n-shot": {"ppl": 0, "gen": 5, "mc": 0},
    }
    lines = results_table(results).splitlines()
    assert lines[0] == "| Task | n-shot | acc | acc_norm | other metrics |"
    assert "| gen | 5 | - | - | exact_match (strict-match) 0.25 |" in lines
    assert "| mc | 0 | 60.0 | 50.0 | - |" in lines
    assert "| ppl | 0 | - | - | word_perplexity 162,892, byte_perplexity 7.33, bits_per_byte 2.874 |" in lines


# -- bad input: one line `error: ...`, exit 2, before anything heavy is loaded ---------------------------------


def _eval_cli(capsys, argv: list[str]) -> tuple[int, str]:
    from openlm_mamba.cli import main as cli_main

    rc = cli_main(["eval", *argv])
    err = capsys.readouterr().err.strip()
    return rc, err


def _one_line_error(rc: int, err: str, start: str) -> None:
    assert rc == 2, err
    assert err.startswith(start) and "\n" not in err and "Traceback" not in err, err


def test_cli_backend_tokenizer_and_output_checked_before_evaluating(setup, task_dir, tmp_path, capsys, monkeypatch):
    """An unusable --backend / $OPENLM_MAMBA_BACKEND, a tokenizer larger than the model's vocabulary and an
    --output that cannot be written: one line each, before any task runs; --backend auto overrides the variable;
    --output's missing directories are created and lm-eval's other sections kept."""
    from openlm_mamba import evaluation

    root = setup[0]
    ran = []

    def fake_evaluate(lm, tasks, num_fewshot=None, **kwargs):
        ran.append(tasks)
        return {"results": {"tiny_mc": {"acc,none": 0.5}}, "n-shot": {"tiny_mc": 0}, "versions": {"tiny_mc": 1.0}}

    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    base = [str(root / "hf"), "--tasks", "tiny_mc", "--include-path", str(task_dir), "--only-local-tasks"]
    _one_line_error(*_eval_cli(capsys, [*base, "--backend", "triton"]), "error: ")
    monkeypatch.setenv("OPENLM_MAMBA_BACKEND", "bogus")
    _one_line_error(*_eval_cli(capsys, base), "error: $OPENLM_MAMBA_BACKEND must be one of")
    monkeypatch.setenv("OPENLM_MAMBA_BACKEND", "cuda")
    _one_line_error(*_eval_cli(capsys, base), "error: ")
    out = tmp_path / "new" / "dir" / "results.json"
    assert _eval_cli(capsys, [*base, "--backend", "auto", "--output", str(out)]) == (0, "")
    assert json.loads(out.read_text())["versions"] == {"tiny_mc": 1.0}
    monkeypatch.delenv("OPENLM_MAMBA_BACKEND")
    _one_line_error(*_eval_cli(capsys, [*base, "--output", str(tmp_path)]), f"error: --output {tmp_path}: is a dir")
    big = setup[1].tokenizer.__class__.from_pretrained(root / "hf")
    big.add_tokens([f"extra{i}" for i in range(600)])
    big.save_pretrained(tmp_path / "big_tok")
    rc, err = _eval_cli(capsys, [*base, "--tokenizer", str(tmp_path / "big_tok")])
    _one_line_error(rc, err, "error: MambaEvalLM: the tokenizer has")
    assert "more than the model's vocabulary of 512" in err
    assert len(ran) == 1  # only the good run evaluated


def test_cli_unknown_task_names_them_with_close_matches(setup, task_dir, capsys, monkeypatch):
    from openlm_mamba.evaluation import evaluate

    root, lm, _ = setup
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    local = ["--include-path", str(task_dir), "--only-local-tasks"]
    rc, err = _eval_cli(capsys, [str(root / "hf"), *local, "--tasks", "nonexistent_task,tiny_mx"])
    _one_line_error(rc, err, "error: --tasks: unknown tasks 'nonexistent_task', 'tiny_mx' (did you mean tiny_mc?)")
    assert "registered: tiny_mc" in err and "--only-local-tasks skips lm-eval's built-in tasks" in err
    # the model card's tasks are built-in ones: with --only-local-tasks they are unknown, said so at once
    rc, err = _eval_cli(capsys, [str(root / "hf"), *local, "--model-card"])
    _one_line_error(rc, err, "error: --model-card: unknown tasks 'hellaswag', 'piqa'")
    rc, err = _eval_cli(capsys, [str(root / "hf"), "--include-path", str(root / "no_such_dir"), "--tasks", "tiny_mc"])
    _one_line_error(rc, err, f"error: --include-path {root / 'no_such_dir'}: no such directory")
    rc, err = _eval_cli(capsys, [str(root / "hf"), *local, "--tasks", " , "])
    _one_line_error(rc, err, "error: --tasks ' , ': no task names in it")
    # the library says the same (ValueError, not lm-eval's KeyError)
    with pytest.raises(ValueError, match=r"unknown task 'nonexistent_task'.*registered: tiny_mc"):
        evaluate(lm, ["nonexistent_task"], include_path=task_dir, include_defaults=False)
    with pytest.raises(ValueError, match="no tasks are registered at all"):
        evaluate(lm, ["tiny_mc"], include_defaults=False)


@pytest.mark.parametrize("limit", ["0", "-1", "2.5", "nan", "inf"])
def test_cli_limit_out_of_range_is_a_clear_error(setup, task_dir, capsys, limit):
    root = setup[0]
    argv = [str(root / "hf"), "--tasks", "tiny_mc", "--include-path", str(task_dir), "--only-local-tasks"]
    rc, err = _eval_cli(capsys, [*argv, "--limit", limit, "--device", "cpu"])
    _one_line_error(rc, err, f"error: --limit {float(limit):g}: expected a count of examples per task")
    assert "or a fraction in (0, 1)" in err


def test_cli_dataset_that_cannot_be_fetched_is_a_clear_error(setup, task_dir, capsys, monkeypatch):
    """lm-eval fetching a dataset offline raises ConnectionError from deep in `datasets`: one line, exit 2."""
    import openlm_mamba.evaluation as evaluation

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'baber/piqa' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(evaluation, "evaluate", offline)
    argv = [str(setup[0] / "hf"), "--tasks", "tiny_mc", "--include-path", str(task_dir), "--only-local-tasks"]
    rc, err = _eval_cli(capsys, [*argv, "--device", "cpu"])
    _one_line_error(rc, err, "error: tiny_mc: lm-eval could not load the data (ConnectionError: Couldn't reach")
    assert "HF_DATASETS_OFFLINE=1" in err


def test_cli_num_fewshot_with_model_card_is_refused(setup, capsys):
    """The model card fixes each task's shots: a --num-fewshot beside it would be silently ignored."""
    rc, err = _eval_cli(capsys, [str(setup[0] / "hf"), "--model-card", "--num-fewshot", "3", "--device", "cpu"])
    _one_line_error(rc, err, "error: --num-fewshot with --model-card: the card fixes each task's shots")


def test_cli_num_fewshot_help_says_its_default(capsys):
    from openlm_mamba.cli import main as cli_main

    with pytest.raises(SystemExit):
        cli_main(["eval", "--help"])
    assert "(with --tasks; default: each task's own setting" in " ".join(capsys.readouterr().out.split())


def test_missing_checkpoint_is_named_before_tasks_and_tokenizer(tmp_path, capsys, monkeypatch):
    """A checkpoint path that does not exist: `error: PATH: no such file or directory` (as convert says), before
    lm-eval indexes its tasks and before a tokenizer is looked for (which used to be blamed instead)."""
    from openlm_mamba import evaluation
    from openlm_mamba.evaluation import MambaEvalLM

    def not_reached(*args, **kwargs):
        raise AssertionError("reached past the checkpoint check")

    monkeypatch.setattr(evaluation, "make_task_manager", not_reached)
    monkeypatch.setattr(evaluation, "_load_tokenizer", not_reached)
    monkeypatch.chdir(tmp_path)
    for extra in ([], ["--tokenizer", str(tmp_path)]):
        rc, err = _eval_cli(capsys, ["nofile.pt", "--tasks", "my_task", *extra])
        _one_line_error(rc, err, "error: nofile.pt: no such file or directory")
    with pytest.raises(ValueError, match=r"^nofile\.pt: no such file or directory$"):
        MambaEvalLM(pretrained="nofile.pt")
    # paths that exist but hold no checkpoint: named up front too (they blamed the tokenizer as well)
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for bad, says in (("emptydir", "emptydir: no OpenLM checkpoint found"), ("notes.txt", "notes.txt")):
        rc, err = _eval_cli(capsys, [bad, "--tasks", "my_task"])
        assert rc == 2 and err.startswith(f"error: {says}") and len(err.strip().splitlines()) == 1, err
        with pytest.raises(ValueError, match=says):
            MambaEvalLM(pretrained=bad)


def test_limit_semantics_count_or_fraction(setup, task_dir, capsys, monkeypatch):
    from openlm_mamba.cli import main as cli_main
    from openlm_mamba.evaluation import check_limit, evaluate

    assert check_limit(None) is None
    assert check_limit(3.0) == 3 and isinstance(check_limit(3.0), int)
    assert check_limit(0.5) == 0.5
    for bad in (0, -1, 1.5, float("nan"), True, "3"):
        with pytest.raises(ValueError):
            check_limit(bad)
    with pytest.raises(SystemExit):
        cli_main(["eval", "--help"])
    assert "a whole count N >= 1 or a fraction in (0, 1)" in " ".join(capsys.readouterr().out.split())

    lm = setup[1]
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    local = {"include_path": task_dir, "include_defaults": False}
    with pytest.raises(ValueError, match="limit: expected a count"):
        evaluate(lm, ["tiny_mc"], limit=0, **local)
    res = evaluate(lm, ["tiny_mc"], limit=0.5, log_samples=True, **local)  # a fraction of the 6 questions
    assert len(res["samples"]["tiny_mc"]) == 3


@pytest.mark.parametrize(
    ("device", "built", "available", "count", "expected"),
    [
        ("tpu", True, True, 1, "error: --device tpu: not a valid torch device"),
        ("cuda", False, False, 0, "error: --device cuda: this torch build ("),
        ("cuda", True, False, 0, "error: --device cuda: no CUDA device is visible"),
        ("cuda:7", True, True, 1, "error: --device cuda:7: only 1 CUDA device(s) visible"),
        ("meta", True, True, 1, "error: --device meta: the meta device holds no data"),
    ],
)
def test_cli_unusable_device_is_a_clear_error(setup, capsys, monkeypatch, device, built, available, count, expected):
    root = setup[0]
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: built)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    rc, err = _eval_cli(capsys, [str(root / "hf"), "--tasks", "tiny_mc", "--device", device])
    _one_line_error(rc, err, expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cli_device_cuda_without_cuda(setup, capsys):
    from openlm_mamba.evaluation import MambaEvalLM

    root, lm, _ = setup
    rc, err = _eval_cli(capsys, [str(root / "hf"), "--tasks", "tiny_mc", "--device", "cuda"])
    _one_line_error(rc, err, "error: --device cuda: ")
    assert "no CUDA" in err
    with pytest.raises(ValueError, match="MambaEvalLM: device 'cuda': "):
        MambaEvalLM(pretrained=root / "hf", tokenizer=lm.tokenizer, device="cuda")


def test_eval_accepts_a_bare_tokenizer_json_like_generate(setup, task_dir, tmp_path, capsys, monkeypatch):
    from openlm_mamba.evaluation import MambaEvalLM

    root, lm, _ = setup
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    file = tmp_path / "tokenizer.json"  # what examples/make_tiny_data.py writes: a lone tokenizers file
    lm.tokenizer.backend_tokenizer.save(str(file))
    from_file = MambaEvalLM(pretrained=root / "epoch_1.pt", model_config="mamba_tiny", tokenizer=str(file))
    text = CORPUS[0] + " " + CORPUS[1]
    assert from_file.tok_encode(text) == lm.tok_encode(text)
    assert from_file.eot_token_id == lm.eot_token_id == 0 and from_file.tokenizer.eos_token == "<|endoftext|>"

    argv = [str(root / "epoch_1.pt"), "--model", "mamba_tiny", "--tokenizer", str(file), "--tasks", "tiny_mc"]
    argv += ["--include-path", str(task_dir), "--only-local-tasks", "--limit", "2", "--device", "cpu"]
    from openlm_mamba.cli import main as cli_main

    assert cli_main(["eval", *argv]) == 0
    assert "| tiny_mc |" in capsys.readouterr().out
    rc, err = _eval_cli(capsys, [*argv[:4], str(tmp_path / "missing" / "tokenizer.json"), *argv[5:]])
    _one_line_error(rc, err, f"error: --tokenizer '{tmp_path / 'missing' / 'tokenizer.json'}': no such file")


def test_load_tokenizer_paths_that_do_not_exist_or_hold_no_tokenizer(setup, tmp_path, monkeypatch):
    from openlm_mamba.commands.generate import load_tokenizer

    lm = setup[1]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("/nonexistent/tok.json", "./missing", "~/no/such/tokenizer", "missing.json", "a/b/c"):
        with pytest.raises(SystemExit, match=rf"^error: --tokenizer '{name}': no such file or directory$"):
            load_tokenizer(name)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match=r"cannot load a tokenizer from this directory: no tokenizer.json / .*empty$"):
        load_tokenizer(str(empty))
    # a broken tokenizer dir: the whole (multi-line) cause, on one line
    (empty / "tokenizer_config.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"from this directory .*Cause: .*\(3\) .*") as info:
        load_tokenizer(str(empty))
    assert "\n" not in str(info.value)
    # a directory holding only tokenizer.json: EOS taken from its end-of-text token, as for the bare file
    lone = tmp_path / "lone"
    lone.mkdir()
    lm.tokenizer.backend_tokenizer.save(str(lone / "tokenizer.json"))
    for where in (lone, lone / "tokenizer.json"):
        tok = load_tokenizer(str(where))
        assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0


class _FakeAutoTokenizer:
    """Records from_pretrained calls; only ``cached`` names load, and only from the local cache."""

    def __init__(self, cached: dict):
        self.cached = cached
        self.calls: list[tuple[str, bool]] = []

    def from_pretrained(self, name, local_files_only=False, **kwargs):
        self.calls.append((str(name), bool(local_files_only)))
        if not local_files_only:
            raise AssertionError("the network was tried")
        if name in self.cached:
            return self.cached[name]
        raise OSError(f"{name} is not in the cache")


def test_load_tokenizer_hub_name_cache_first_and_no_retry_loop_offline(monkeypatch):
    """A hub name: the HF cache first; not cached and the hub unreachable -> fails at once, no ~50 s of retries."""
    import types

    import huggingface_hub
    import transformers

    from openlm_mamba.commands import generate

    cached = types.SimpleNamespace(eos_token="</s>")
    fake = _FakeAutoTokenizer({"org/cached": cached})
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake.from_pretrained)
    probes = []

    class DeadSession:
        def head(self, url, **kwargs):
            probes.append(url)
            raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "get_session", DeadSession)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    assert generate.load_tokenizer("org/cached") is cached
    assert fake.calls == [("org/cached", True)] and probes == []  # from the cache, the network untouched
    fake.calls.clear()
    with pytest.raises(SystemExit, match=r"'org/missing': not in the local HF cache, and the hub .* cannot be reached"):
        generate.load_tokenizer("org/missing")
    assert fake.calls == [("org/missing", True)] and len(probes) == 1


def test_bench_eval_quick_runs(capsys):
    """benchmarks/bench_eval.py on a tiny model: both workloads' rows, and the HF columns where lm-eval's HFLM
    (it needs accelerate) can run."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_eval.py"
    spec = importlib.util.spec_from_file_location("bench_eval", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with_hf = has_module("accelerate") and has_module("transformers")
    argv = ["--d-model", "32", "--n-layer", "1", "--vocab", "300", "--questions", "2", "--repeats", "1"]
    assert bench.main(argv + ([] if with_hf else ["--no-hf"])) == 0
    out = capsys.readouterr().out
    assert "| mmlu | 8 |" in out and "| hellaswag | 8 |" in out, out
    if with_hf:
        assert "x** |" in out, out


def test_evaluate_passes_bootstrap_iters_through(setup, monkeypatch):
    """evaluate() computes no standard errors by default (bootstrap_iters 0), but a caller can ask for them."""
    import lm_eval

    from openlm_mamba import evaluation

    seen = []
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kw: seen.append(kw["bootstrap_iters"]) or {"results": {}})
    monkeypatch.setattr(evaluation, "check_tasks", lambda tasks, manager: None)
    _, lm, _ = setup
    evaluation.evaluate(lm, ["x"], task_manager=object())
    evaluation.evaluate(lm, ["x"], task_manager=object(), bootstrap_iters=1000)
    assert seen == [0, 1000]
