"""Recurrent decoding (cache, step path) and generate(): against the full forward and transformers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from openlm_mamba import MambaCache, MambaConfig, MambaLM, generate

from .conftest import has_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny decode steps gain nothing from threads; on a busy 2-core box extra threads only add waiting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(vocab_size: int = 512, seed: int = 0, **overrides) -> MambaLM:
    torch.manual_seed(seed)
    cfg = MambaConfig.load("mamba_tiny").replace(vocab_size=vocab_size, **overrides)
    return MambaLM(cfg).eval()


@pytest.fixture(scope="module")
def model() -> MambaLM:
    return tiny_model()


def prompt(batch: int, length: int, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def decode_vs_full(model: MambaLM, backend: str | None = None, steps: int = 66, batch: int = 2, mixed: bool = True):
    """Max |logit diff| against the full forward of token-by-token decoding, and (``mixed``) of
    prefill, a second prefill chunk, single steps, another chunk, single steps."""
    ids = prompt(batch, steps, model.cfg.vocab_size)
    with torch.no_grad():
        full = model(ids)[0]
        cache = model.allocate_cache(batch, backend=backend)
        step = torch.cat([model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)[0] for t in range(steps)], 1)
        assert cache.seqlen_offset == steps
        if not mixed:
            return (step - full).abs().max().item(), 0.0
        cache = model.allocate_cache(batch, backend=backend)
        parts = [model(ids[:, :20], past_key_values=cache)[0], model(ids[:, 20:33], past_key_values=cache)[0]]
        parts += [model(ids[:, t : t + 1], past_key_values=cache)[0] for t in range(33, 50)]
        parts.append(model(ids[:, 50:58], past_key_values=cache)[0])  # a chunk after single steps
        parts += [model(ids[:, t : t + 1], past_key_values=cache)[0] for t in range(58, steps)]
        mixed_logits = torch.cat(parts, 1)
    return (step - full).abs().max().item(), (mixed_logits - full).abs().max().item()


# -- acceptance 1: step-by-step decode == full forward ----------------------------------------------
def test_decode_logits_equal_full_forward_torch(model):
    step_diff, mixed_diff = decode_vs_full(model, backend="torch")
    assert step_diff < 1e-4 and mixed_diff < 1e-4, (step_diff, mixed_diff)


def test_decode_logits_equal_full_forward_python_step(model, monkeypatch):
    """The same with the per-layer Python step (the fused C++ step disabled)."""
    from openlm_mamba import generation

    monkeypatch.setattr(generation, "model_step_args", lambda model, params: None)
    step_diff, mixed_diff = decode_vs_full(model, backend="torch")
    assert step_diff < 1e-4 and mixed_diff < 1e-4, (step_diff, mixed_diff)


FUSED_CONFIGS = [
    {},
    {"bias": True, "conv_bias": False, "d_state": 4, "norm_epsilon": 1e-6},
    {"dt_rank": 3, "n_layer": 3, "d_conv": 2, "expand": 3},
    {"d_model": 1024, "n_layer": 1},  # batch 3 x d_inner 2048 x 16 states: the rows run in parallel
]


@pytest.mark.parametrize("overrides", FUSED_CONFIGS)
def test_fused_cpu_step_equals_python_step(overrides):
    """openlm_mamba_cpu::model_step (every layer in one C++ call) == MambaMixer.step layer by layer:
    logits and both states after every step, batch 3, biases made non-zero."""
    from openlm_mamba.ops.cpp import load_extension

    if not load_extension():
        pytest.skip("the C++ CPU kernels are not built")
    m = tiny_model(seed=1, **overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the module runs on one thread; the wide case should really split its rows
    try:
        with torch.no_grad():
            for lin in (m.layers[0].mixer.in_proj, m.layers[-1].mixer.out_proj):
                if lin.bias is not None:
                    lin.bias.normal_(0, 0.1)
            ids = prompt(3, 14, m.cfg.vocab_size, seed=2)
            fused, plain = m.allocate_cache(3, backend="torch"), m.allocate_cache(3, backend="torch")
            assert fused.fused is not None
            plain.fused = None
            m(ids[:, :6], past_key_values=fused)
            m(ids[:, :6], past_key_values=plain)
            for t in range(6, 14):
                a = m(ids[:, t : t + 1], past_key_values=fused)[0]
                b = m(ids[:, t : t + 1], past_key_values=plain)[0]
                assert (a - b).abs().max().item() < 1e-5, t
                for sa, sb in zip(fused.ssm_states + fused.conv_states, plain.ssm_states + plain.conv_states):
                    assert (sa - sb).abs().max().item() < 1e-6, t
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("overrides", FUSED_CONFIGS[:3])
def test_fused_cpu_prefill_equals_module_prefill(overrides, monkeypatch):
    """openlm_mamba_cpu::model_prefill (every layer in one C++ call, in slices of PREFILL_ROWS rows)
    == the per-layer module prefill: all logits and the last-only logits, both states, for a first
    prompt cut into slices, chunks shorter than the conv window, and a chunk after single steps."""
    from openlm_mamba import model as model_mod
    from openlm_mamba.ops.cpp import load_extension

    if not load_extension():
        pytest.skip("the C++ CPU kernels are not built")
    monkeypatch.setattr(model_mod, "PREFILL_ROWS", 192)  # batch 3: slices of 64 tokens
    m = tiny_model(seed=3, **overrides)
    with torch.no_grad():
        for lin in (m.layers[0].mixer.in_proj, m.layers[-1].mixer.out_proj):
            if lin.bias is not None:
                lin.bias.normal_(0, 0.1)
    ids = prompt(3, 175, m.cfg.vocab_size, seed=4)
    # 129 = two 64-token slices and a 1-token one; then chunks shorter than the conv window, a step
    chunks = [(0, 129), (129, 131), (131, 132), (132, 160), (160, 161), (161, 175)]
    for last_only in (False, True):
        fused, plain = m.allocate_cache(3, backend="torch"), m.allocate_cache(3, backend="torch")
        assert fused.fused is not None
        plain.fused = None
        with torch.inference_mode():
            for a, b in chunks:
                got = m.forward_with_cache(ids[:, a:b], fused, last_only=last_only)
                want = m.forward_with_cache(ids[:, a:b], plain, last_only=last_only)
                assert got[0].shape == want[0].shape and got[1].shape == want[1].shape
                assert (got[0] - want[0]).abs().max().item() < 1e-5, (a, b, last_only)
                for sa, sb in zip(fused.ssm_states + fused.conv_states, plain.ssm_states + plain.conv_states):
                    assert (sa - sb).abs().max().item() < 1e-5, (a, b, last_only)
        assert fused.seqlen_offset == plain.seqlen_offset == 175


@pytest.mark.parametrize("overrides", FUSED_CONFIGS[:3])
def test_no_grad_forward_takes_the_fused_prefill(overrides, monkeypatch):
    """MambaLM.forward without autograd (scoring, evaluation) runs model_prefill from zero states:
    the same logits and hidden as the module forward with autograd on, also in several slices."""
    from openlm_mamba import model as model_mod
    from openlm_mamba.ops.cpp import load_extension

    if not load_extension():
        pytest.skip("the C++ CPU kernels are not built")
    monkeypatch.setattr(model_mod, "PREFILL_ROWS", 128)  # batch 2: slices of 64 tokens
    m = tiny_model(seed=5, **overrides)
    ids = prompt(2, 150, m.cfg.vocab_size, seed=6)
    want_logits, want_hidden, _ = m(ids)  # autograd on: the module path
    with torch.no_grad(), torch.profiler.profile() as prof:
        logits, hidden, extra = m(ids)
    assert [e.count for e in prof.key_averages() if e.key == "openlm_mamba_cpu::model_prefill"] == [3]
    assert extra is None and logits.dtype == torch.float32 and logits.shape == want_logits.shape
    assert (logits - want_logits).abs().max().item() < 1e-4
    assert (hidden - want_hidden).abs().max().item() < 1e-4


def test_fused_cpu_prefill_runs_where_it_applies_and_keeps_its_workspace(model):
    """generate() prefills through model_prefill; autograd, float64 and LayerNorm models take the
    module path; the activation buffer is kept between calls and works in and out of inference mode."""
    from openlm_mamba import model as model_mod
    from openlm_mamba.ops.cpp import load_extension

    if not load_extension():
        pytest.skip("the C++ CPU kernels are not built")
    with torch.profiler.profile() as prof:
        generate(model, prompt(1, 40), max_new_tokens=2)
    assert [e.count for e in prof.key_averages() if e.key == "openlm_mamba_cpu::model_prefill"] == [1]
    buf = model_mod._prefill_workspace.buf
    size, ptr = buf.numel(), buf.data_ptr()
    assert size > 0
    generate(model, prompt(1, 30), max_new_tokens=2)  # smaller: the same buffer, not grown
    with torch.no_grad():  # outside inference mode too
        model(prompt(1, 20), past_key_values=model.allocate_cache(1))
        model(prompt(20, 70))  # 20 x 64-token slices > PREFILL_ROWS: a buffer of its own, not kept
    assert model_mod._prefill_workspace.buf is buf
    assert (buf.numel(), buf.data_ptr()) == (size, ptr)
    cache = model.allocate_cache(1)
    with torch.profiler.profile() as prof:
        logits = model(prompt(1, 12), past_key_values=cache)[0]  # autograd on: the module path
    assert logits.requires_grad
    assert not any(e.key == "openlm_mamba_cpu::model_prefill" for e in prof.key_averages())


def test_generate_under_cpu_autocast(model):
    """Under CPU autocast generate takes the module path (which honours autocast) instead of the
    fused ops, and the fused ops themselves stay float32 if called under autocast."""
    from openlm_mamba.ops.cpp import load_extension

    if not load_extension():
        pytest.skip("the C++ CPU kernels are not built")
    ids = prompt(1, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.profiler.profile() as prof:
        out = generate(model, ids, max_new_tokens=4)
    assert out.shape == (1, 24)
    fused_ops = ("openlm_mamba_cpu::model_step", "openlm_mamba_cpu::model_prefill")
    assert not any(e.key in fused_ops for e in prof.key_averages())
    with torch.no_grad():
        emb = model.model.backbone.embedding(ids)
        results = []
        for autocast in (False, True):
            cache = model.allocate_cache(1)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                a = torch.ops.openlm_mamba_cpu.model_prefill(
                    emb, cache.conv_states, cache.ssm_states, *cache.fused, True, True, torch.empty(0)
                )
                b = torch.ops.openlm_mamba_cpu.model_step(a, cache.conv_states, cache.ssm_states, *cache.fused)
            results.append((a, b))
        assert all(t.dtype == torch.float32 for t in results[1])
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_fused_cpu_step_runs_in_generate_and_only_where_it_applies(model):
    from openlm_mamba.ops.cpp import load_extension

    if not load_extension():
        pytest.skip("the C++ CPU kernels are not built")
    with torch.profiler.profile() as prof:
        generate(model, prompt(1, 5), max_new_tokens=3)
    calls = [e.count for e in prof.key_averages() if e.key == "openlm_mamba_cpu::model_step"]
    assert calls == [2], calls  # the first new token comes from the prefill, then two steps
    assert tiny_model().double().allocate_cache(1).fused is None  # float64: the Python step
    assert tiny_model(rms_norm=False).allocate_cache(1).fused is None  # LayerNorm: the Python step
    # with autograd on, the Python step runs (the fused op has no backward), same logits
    ids = prompt(1, 4)
    cache = model.allocate_cache(1)
    model(ids[:, :3], past_key_values=cache)
    with torch.profiler.profile() as prof:
        logits = model(ids[:, 3:], past_key_values=cache)[0]
    assert not any(e.key == "openlm_mamba_cpu::model_step" for e in prof.key_averages())
    with torch.no_grad():
        assert (logits - model(ids)[0][:, 3:]).abs().max().item() < 1e-4


TRITON_DECODE = textwrap.dedent(
    """
    from tests.test_generation import decode_vs_full, tiny_model
    m = tiny_model(n_layer=1)  # the interpreter is slow: one layer, 64 single-token steps
    step_diff, mixed_diff = decode_vs_full(m, backend="triton", steps=64, batch=1, mixed=False)
    assert step_diff < 1e-4 and mixed_diff < 1e-4, (step_diff, mixed_diff)
    cache = m.allocate_cache(1, backend="triton")
    assert cache.backend == "triton", cache.backend
    # a left-padded prompt through the Triton conv and scan (masking around them), against the row alone
    import torch
    from tests.test_generation import padded_batch
    ids, mask, rows = padded_batch([10, 4], 10)
    m.set_backend("triton")
    with torch.no_grad():
        got = m(ids, attention_mask=mask, use_cache=True)[0]
        m.set_backend("torch")
        pad_diff = max((got[i, 10 - len(r):] - m(r[None])[0][0]).abs().max().item() for i, r in enumerate(rows))
    assert pad_diff < 1e-4, pad_diff
    print("TRITON_DECODE_OK", step_diff, mixed_diff, pad_diff)
    """
)


def test_decode_logits_equal_full_forward_triton_interpreted():
    """Same check with the Triton state-update kernel (TRITON_INTERPRET=1 set before triton loads)."""
    if not has_module("triton"):
        pytest.skip("triton is not installed")
    env = dict(
        os.environ,
        TRITON_INTERPRET="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [sys.executable, "-c", TRITON_DECODE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "TRITON_DECODE_OK" in proc.stdout, proc.stdout + proc.stderr


# -- the OpenLM forward contract ---------------------------------------------------------------------
def test_training_forward_unchanged_and_cache_returned(model):
    ids = prompt(2, 10)
    with torch.no_grad():
        logits, _, cache = model(ids)
        assert cache is None and logits.dtype == torch.float32 and logits.shape == (2, 10, model.vocab_size)
        logits2, _, cache2 = model(ids, use_cache=True)  # OpenLM: use_cache without past -> new cache
        assert isinstance(cache2, MambaCache) and cache2.seqlen_offset == 10 and len(cache2) == model.cfg.n_layer
        torch.testing.assert_close(logits2, logits, rtol=0, atol=1e-5)
        conv, ssm = cache2[0]
        assert conv.shape == (2, model.cfg.d_inner, model.cfg.d_conv)
        assert ssm.shape == (2, model.cfg.d_inner, model.cfg.d_state) and ssm.dtype == torch.float32
        # inputs_embeds and an all-ones attention mask give the same logits
        emb = model.model.backbone.embedding(ids)
        logits3, _, none = model(inputs_embeds=emb, attention_mask=torch.ones(2, 10))
        assert none is None
        torch.testing.assert_close(logits3, logits, rtol=0, atol=1e-5)


def test_state_size_is_constant_while_decoding(model):
    with torch.no_grad():
        _, _, cache = model(prompt(1, 8), use_cache=True)
        shapes = [t.shape for t in cache.conv_states + cache.ssm_states]
        tok = prompt(1, 1)
        for _ in range(40):
            model(tok, past_key_values=cache)
        assert [t.shape for t in cache.conv_states + cache.ssm_states] == shapes and cache.seqlen_offset == 48
        cache.reset()
        assert cache.seqlen_offset == 0 and all(not t.any() for t in cache.ssm_states)


def test_cache_backend_choice():
    """An explicit backend that cannot run the prompt's ops here is an error up front, as in training; "cuda"
    (mamba_ssm's scan) leaves the step op, which has no such backend, to auto."""
    from openlm_mamba.ops.dispatch import BackendUnavailableError, available_backends

    m = tiny_model(n_layer=1)
    assert m.allocate_cache(1).backend == "torch"
    assert m.allocate_cache(1, backend="torch").fused is not None
    m.set_backend("cuda")
    if "cuda" in available_backends("selective_scan") and "cuda" in available_backends("causal_conv1d"):
        assert m.allocate_cache(1).backend == "torch"
    else:  # no mamba_ssm / causal-conv1d: generate and the no-grad forward refuse, as the training forward does
        with pytest.raises(BackendUnavailableError, match="causal_conv1d: backend 'cuda' is unavailable on cpu"):
            m.allocate_cache(1)
        with pytest.raises(BackendUnavailableError, match="backend 'cuda' is unavailable on cpu"):
            generate(m, prompt(1, 4, vocab=64), max_new_tokens=2)
        with pytest.raises(BackendUnavailableError, match="backend 'cuda' is unavailable on cpu"), torch.no_grad():
            m(prompt(1, 4, vocab=64))
    m.set_backend(None)
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="selective_state_update: backend 'triton' is unavailable"):
            m.allocate_cache(1, backend="triton")  # the step's backend
        m.set_backend("triton")  # the model's: its prompt ops
        with pytest.raises(BackendUnavailableError, match="causal_conv1d: backend 'triton' is unavailable on cpu"):
            m.allocate_cache(1)


def test_forward_with_cache_rejects_bad_input(model):
    cache = model.allocate_cache(2)
    with pytest.raises(ValueError, match=r"row 0 is \[1, 1, 1, 0\]; .* padding only before the tokens"):
        model(prompt(2, 4), attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]), use_cache=True)
    with pytest.raises(ValueError, match="allocated for batch 2, got batch 3"):
        model(prompt(3, 4), past_key_values=cache)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(prompt(2, 4), inputs_embeds=torch.zeros(2, 4, 64), use_cache=True)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.full((2, 1), 10_000), past_key_values=cache)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        model.allocate_cache(0)


# -- acceptance 2: equality with transformers --------------------------------------------------------
@pytest.fixture(scope="module")
def hf_pair(model):
    if not has_module("transformers"):
        pytest.skip("transformers is not installed")
    from openlm_mamba.convert import to_transformers

    assert model.cfg.vocab_size == model.cfg.padded_vocab_size  # so both sample over the same vocabulary
    hf = to_transformers(model)
    return model, hf


def hf_generate(hf, ids, **kw):
    with torch.no_grad():
        return hf.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, **kw)


def test_greedy_equals_transformers(hf_pair):
    model, hf = hf_pair
    ids = prompt(2, 12, seed=3)
    for penalty in (1.0, 1.3):
        theirs = hf_generate(hf, ids, max_new_tokens=32, do_sample=False, repetition_penalty=penalty)
        ours = generate(model, ids, max_new_tokens=32, repetition_penalty=penalty, eos_token_id=hf.config.eos_token_id)
        assert ours.shape == theirs.shape and ours.shape[1] > 30
        assert torch.equal(ours, theirs), penalty


def test_model_card_sampling_equals_transformers_with_same_seed(hf_pair):
    """Same processing order and RNG use as transformers: identical samples for the same seed."""
    model, hf = hf_pair
    ids = prompt(2, 12, seed=4)
    kw = {"do_sample": True, "temperature": 0.8, "top_p": 0.8, "top_k": 50, "repetition_penalty": 1.1}
    torch.manual_seed(7)
    theirs = hf_generate(hf, ids, max_new_tokens=24, **kw)
    ours = generate(model, ids, max_new_tokens=24, seed=7, eos_token_id=hf.config.eos_token_id, **kw)
    assert ours.shape[1] > 20  # no early EOS, so the comparison covers many sampled steps
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    "do_sample,temperature,top_k,top_p,penalty,vocab,ties",
    [
        (True, 0.8, 50, 0.8, 1.1, 300, False),
        (True, 1.3, 0, 0.5, 1.0, 300, False),
        (True, 0.5, 7, 1.0, 0.8, 300, False),
        (False, 1.0, 0, 1.0, 1.2, 300, False),
        (True, 0.8, 50, 0.8, 1.1, 50277, False),  # the model card's settings at the real vocabulary
        (True, 1.0, 20, 0.9, 1.0, 300, True),  # tied logits: the whole-vocabulary sort decides
        (True, 1.0, 5, 0.95, 1.0, 40, True),
    ],
)
def test_token_choice_equals_transformers_processors(do_sample, temperature, top_k, top_p, penalty, vocab, ties):
    """On identical logits our sampler picks what transformers' processors + multinomial pick (same
    seed): 8 rows x 5 draws, with top-k + top-p taking the k-survivor sort, or (ties) the full one."""
    if not has_module("transformers"):
        pytest.skip("transformers is not installed")
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from openlm_mamba.generation import _Sampler

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, vocab, generator=g) * 3
    if ties:  # few distinct values: ties inside the top k and at its boundary
        logits = logits.round()
    history = torch.randint(0, vocab, (8, 20), generator=g)
    procs = LogitsProcessorList()
    if penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(penalty))
    if do_sample:
        procs += [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
        procs += [TopKLogitsWarper(top_k)] if top_k else []
        procs += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
    scores = procs(history, logits.clone())
    torch.manual_seed(11)
    theirs = [torch.multinomial(scores.softmax(-1), 1).squeeze(1) if do_sample else scores.argmax(-1) for _ in range(5)]
    sampler = _Sampler(do_sample, temperature, top_k, top_p, penalty, vocab, torch.Generator().manual_seed(11))
    sampler.observe(history[:, :12])
    sampler.observe(history[:, 12:])
    for want in theirs:
        assert torch.equal(sampler(logits.clone()), want)


# -- generate() behaviour ------------------------------------------------------------------------------
def test_fixed_seed_reproduces_sampling(model):
    ids = prompt(2, 5)
    kw = {"max_new_tokens": 30, "do_sample": True, "temperature": 1.5, "top_p": 0.95, "top_k": 0}
    a, b = generate(model, ids, seed=123, **kw), generate(model, ids, seed=123, **kw)
    c = generate(model, ids, seed=124, **kw)
    d = generate(model, ids, generator=torch.Generator().manual_seed(123), **kw)
    assert torch.equal(a, b) and torch.equal(a, d)
    assert not torch.equal(a, c)


def test_top_k_one_is_greedy_and_batch_equals_single(model):
    ids = prompt(3, 7)
    greedy = generate(model, ids, max_new_tokens=20)
    assert torch.equal(generate(model, ids, max_new_tokens=20, do_sample=True, top_k=1, seed=0), greedy)
    for i in range(3):
        assert torch.equal(generate(model, ids[i], max_new_tokens=20), greedy[i : i + 1])


def test_eos_stops_each_sequence(model):
    ids = prompt(2, 6, seed=5)
    free = generate(model, ids, max_new_tokens=24)[:, 6:]
    eos = int(free[0, 3])  # row 0 emits this token at step 3 (or earlier)
    first0 = int((free[0] == eos).nonzero()[0])
    hits1 = (free[1] == eos).nonzero()
    out = generate(model, ids, max_new_tokens=24, eos_token_id=eos, pad_token_id=0)[:, 6:]
    assert torch.equal(out[0, : first0 + 1], free[0, : first0 + 1])
    assert (out[0, first0 + 1 :] == 0).all()
    stop1 = int(hits1[0]) if len(hits1) else 23
    assert torch.equal(out[1, : stop1 + 1], free[1, : stop1 + 1])
    assert out.shape[1] == max(first0, stop1) + 1  # stops as soon as every row is done


def test_streamer_and_zero_new_tokens(model):
    ids = prompt(2, 4)
    seen = []
    out = generate(model, ids, max_new_tokens=5, streamer=lambda t: seen.append(t.clone()))
    assert torch.equal(torch.stack(seen, 1), out[:, 4:])
    assert torch.equal(generate(model, ids, max_new_tokens=0), ids)


def test_padded_vocab_rows_are_never_chosen(model, monkeypatch):
    small = tiny_model(vocab_size=500)  # padded to 504
    real = small.forward_with_cache

    def boosted(*a, **k):
        logits, hidden = real(*a, **k)
        logits[..., 500:] = 1e4
        return logits, hidden

    monkeypatch.setattr(small, "forward_with_cache", boosted)
    out = generate(small, prompt(2, 3, 500), max_new_tokens=8)
    assert (out < 500).all()
    out = generate(small, prompt(2, 3, 500), max_new_tokens=8, do_sample=True, seed=0)
    assert (out < 500).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"do_sample": True, "temperature": 0.0}, r"temperature must be in \(0.0, inf\)"),
        ({"do_sample": True, "temperature": -1}, "temperature"),
        ({"do_sample": True, "top_p": 0.0}, r"top_p must be in \(0.0, 1.0\]"),
        ({"do_sample": True, "top_p": 1.5}, "top_p"),
        ({"top_p": 1.5}, r"top_p must be in \(0.0, 1.0\]"),  # greedy ignores it, but 1.5 is never valid
        ({"temperature": -1}, r"temperature must be in \[0.0, inf\)"),  # greedy: 0 is allowed, negative is not
        ({"top_k": -1}, "top_k must be an int >= 0"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"max_new_tokens": -1}, "max_new_tokens must be an int >= 0"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"eos_token_id": 99999}, r"eos_token_id must be an int .* in \[0, 512\)"),
        ({"pad_token_id": 512}, r"pad_token_id must be an int in \[0, 512\)"),
        ({"seed": 1, "generator": torch.Generator()}, "either seed or generator"),
        ({"attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}, r"row 0 is \[1, 1, 0\]; .*padding_side='left'"),
        ({"attention_mask": torch.tensor([[1, 0, 1], [1, 1, 1]])}, "a pad between tokens would still decay"),
        ({"attention_mask": torch.tensor([[0, 0, 0], [1, 1, 1]])}, "row 0 is all padding"),
        ({"attention_mask": torch.tensor([[2, 1, 1], [1, 1, 1]])}, r"values must be 0 \(padding\) or 1"),
        ({"attention_mask": torch.ones(2, 4)}, r"attention_mask must have shape \(2, 3\)"),
        ({"do_sample": 1}, "do_sample must be a bool"),
        ({"cuda_graph": "yes"}, "cuda_graph must be True, False or None"),
        ({"cuda_graph": True}, "cuda_graph=True needs input_ids on a CUDA device, got cpu"),
    ],
)
def test_invalid_settings_raise_clear_errors(model, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        generate(model, prompt(2, 3), max_new_tokens=kwargs.pop("max_new_tokens", 2), **kwargs)


def test_greedy_accepts_temperature_zero(model):
    """temperature=0 is the usual way to ask for greedy decoding: accepted (and ignored) when not sampling."""
    ids = prompt(2, 3)
    assert torch.equal(generate(model, ids, max_new_tokens=4, temperature=0.0), generate(model, ids, max_new_tokens=4))


def test_invalid_inputs_raise_clear_errors(model):
    with pytest.raises(TypeError, match=r"input_ids must be a torch\.Tensor or a list of prompts, got str"):
        generate(model, "the prompt")
    with pytest.raises(TypeError, match="integer tensor"):
        generate(model, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(TypeError, match="must be an openlm_mamba MambaLM"):
        generate(torch.nn.Linear(2, 2), prompt(1, 2))


def test_bench_generate_quick_runs(capsys):
    """benchmarks/bench_generate.py on a tiny model: the table (and, with transformers, the ratios) come out."""
    import importlib.util
    from pathlib import Path

    path = Path(ROOT) / "benchmarks" / "bench_generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with_hf = has_module("transformers")
    argv = ["--d-model", "32", "--n-layer", "1", "--vocab", "64", "--contexts", "4,8", "--new-tokens", "3"]
    argv += ["--repeats", "1", "--hf-repeats", "1", "--device", "cpu"] + ([] if with_hf else ["--no-hf"])
    grad = torch.is_grad_enabled()
    try:
        bench.main(argv)
    finally:
        torch.set_grad_enabled(grad)  # the benchmark turns autograd off for its process
    out = capsys.readouterr().out
    assert "| 4 |" in out and "| 8 |" in out, out
    if with_hf:
        assert "TTFT speedup" in out and "# fastest TTFT at context 8 (of 1 and 1 runs): ours" in out, out


def test_bench_prefill_quick_runs(capsys, monkeypatch):
    """benchmarks/bench_prefill.py on a tiny model: TTFT, each bare kernel, their sum and the ratios come out,
    and the matmul FLOPs it reports are the prefill's (the last layer projects only what it needs)."""
    import importlib.util
    import re
    from pathlib import Path

    from openlm_mamba.ops.cpp import load_extension

    if not load_extension():
        pytest.skip("the C++ CPU kernels are unavailable (no compiler, or OPENLM_MAMBA_DISABLE_CPP)")
    bench_dir = Path(ROOT) / "benchmarks"
    monkeypatch.syspath_prepend(str(bench_dir))  # it imports bench_generate, as when run as a script
    spec = importlib.util.spec_from_file_location("bench_prefill", bench_dir / "bench_prefill.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with_hf = has_module("transformers")
    argv = ["--d-model", "32", "--n-layer", "2", "--vocab", "64", "--context", "8", "--rounds", "2", "--calls", "1"]
    grad = torch.is_grad_enabled()
    try:
        bench.main(argv + ["--hf-rounds", "1"] + ([] if with_hf else ["--no-hf"]))
    finally:
        torch.set_grad_enabled(grad)  # the benchmark turns autograd off for its process
    out = capsys.readouterr().out
    for row in ("ours: TTFT", "matmuls", "scan", "conv", "floor: sum of the bare kernels"):
        assert re.search(rf"^\|\s+{row} \| [\d.]+ \| [\d.]+ \|$", out, re.M), (row, out)
    assert re.search(r"^matmuls: [\d.]+ GFLOP, \d+ GFLOP/s at their fastest$", out, re.M), out
    # the FLOPs it counts are the fused prefill's: the module prefill's, less the last layer's z half and
    # output projection at the one position the fused prefill runs them for
    from torch.utils.flop_counter import FlopCounterMode

    m = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=64, seq_len=64, name="t"))
    with FlopCounterMode(display=False) as counter:  # autograd on: the module path, which it can see
        m.forward_with_cache(prompt(1, 8, vocab=64), m.allocate_cache(1), last_only=True)
    blocks = sum(counter.get_flop_counts()["ResidualBlock"].values())
    assert bench.kernel_parts(m, 8)[1] == blocks - 2 * 2 * 32 * 64
    assert ("HF / floor:" in out) == with_hf, out


# -- autograd through cached decoding ---------------------------------------------------------------------
def grads_through_cache(m: MambaLM, ids: torch.Tensor, weights: torch.Tensor, plan) -> tuple[torch.Tensor, dict]:
    """Logits and every parameter's gradient of sum(logits * weights), with the logits from
    ``plan``: [(start, end), ...] chunks through one cache (first use_cache=True), or None: the full forward."""
    m.zero_grad()
    if plan is None:
        logits = m(ids)[0]
    else:
        (a, b), cache, parts = plan[0], None, []
        logits, _, cache = m(ids[:, a:b], use_cache=True)
        parts.append(logits)
        for a, b in plan[1:]:
            parts.append(m(ids[:, a:b], past_key_values=cache, use_cache=True)[0])
        logits = torch.cat(parts, 1)
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


# prefill, single steps, a second prefill chunk after steps (shorter than the conv window), more steps
GRAD_PLAN = [(0, 5), (5, 6), (6, 7), (7, 8), (8, 10), (10, 11), (11, 12)]


@pytest.mark.parametrize(
    "dtype,overrides",
    [
        (torch.float32, {}),
        (torch.float64, {}),
        (torch.float32, {"rms_norm": False, "bias": True, "d_conv": 2}),
    ],
    ids=["fp32", "fp64", "layernorm-bias"],
)
def test_gradients_through_cached_decoding_equal_full_forward(dtype, overrides):
    """Backprop through prefill(use_cache) + one-token steps + another chunk gives the full forward's gradients
    for every parameter (the one-token C++ step kernels have no backward: with autograd on, the step runs
    differentiable ops and stores new states in the cache instead of writing them in place)."""
    import warnings

    m = tiny_model(seed=2, **overrides).to(dtype).train()
    with torch.no_grad():  # non-zero biases, so their gradients are exercised too
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    ids = prompt(2, 12, m.cfg.vocab_size, seed=3)
    weights = torch.randn(2, 12, m.vocab_size, generator=torch.Generator().manual_seed(4))
    want_logits, want = grads_through_cache(m, ids, weights, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "autograd kernel was not registered" op in the graph
        got_logits, got = grads_through_cache(m, ids, weights, GRAD_PLAN)
    tol = 1e-4 if dtype == torch.float32 else 1e-6  # fp64: the cache's ssm states are float32
    assert (got_logits - want_logits).abs().max().item() < tol
    assert got.keys() == want.keys()
    for name in want:
        err = ((got[name] - want[name]).norm() / want[name].norm()).item()
        assert want[name].norm() > 0 and err < tol, (name, err)


def test_gradients_through_cached_steps_python_step_and_inputs_embeds(monkeypatch):
    """The same through the per-layer step (no fused args) and with inputs_embeds, including the embeddings'
    gradient; the cache's states are new tensors of the same shapes and dtypes; reset() detaches them."""
    from openlm_mamba import generation

    monkeypatch.setattr(generation, "model_step_args", lambda model, params: None)
    m = tiny_model(seed=5)
    ids = prompt(1, 7, seed=6)
    emb = m.model.backbone.embedding(ids).detach()
    grads = []
    for cached in (False, True):
        x = emb.clone().requires_grad_()
        m.zero_grad()
        if cached:
            cache = m.allocate_cache(1)
            states = [(t.shape, t.dtype) for t in cache.conv_states + cache.ssm_states]
            parts = [m(inputs_embeds=x[:, :3], past_key_values=cache)[0]]
            parts += [m(inputs_embeds=x[:, t : t + 1], past_key_values=cache)[0] for t in range(3, 7)]
            logits = torch.cat(parts, 1)
            assert [(t.shape, t.dtype) for t in cache.conv_states + cache.ssm_states] == states
            assert all(t.requires_grad for t in cache.ssm_states)
        else:
            logits = m(inputs_embeds=x)[0]
        logits.square().mean().backward()
        grads.append((x.grad, m.layers[0].mixer.A_log.grad.clone(), m.layers[1].mixer.in_proj.weight.grad.clone()))
    for a, b in zip(*grads):
        assert ((a - b).norm() / b.norm()).item() < 1e-4
    cache.reset()
    assert cache.seqlen_offset == 0 and not any(
        t.requires_grad or t.any() for t in cache.conv_states + cache.ssm_states
    )
    with torch.no_grad():  # decoding without autograd continues on the same cache
        m(ids[:, :1], past_key_values=cache)


def test_decoding_continues_without_autograd_after_autograd_steps(model):
    """A cache filled with autograd on (prefill, a step) continues without it (the fused C++ step, which reads
    the states as contiguous tensors) to the full forward's logits."""
    ids = prompt(2, 12, seed=7)
    with torch.no_grad():
        full = model(ids)[0]
    for grad_steps in (0, 2):
        _, _, cache = model(ids[:, :5], use_cache=True)
        parts = [model(ids[:, t : t + 1], past_key_values=cache)[0] for t in range(5, 5 + grad_steps)]
        assert all(t.requires_grad and t.is_contiguous() for t in cache.conv_states + cache.ssm_states)
        with torch.no_grad():
            parts += [model(ids[:, t : t + 1], past_key_values=cache)[0] for t in range(5 + grad_steps, 12)]
        assert (torch.cat(parts, 1) - full[:, 5:]).abs().max().item() < 1e-4, grad_steps


def test_no_grad_decoding_keeps_the_fast_paths(model):
    """Without autograd (or with no tensor requiring grad) the cached path writes the states in place and the
    steps run the C++ kernels, as before."""
    from openlm_mamba.ops.cpp import load_extension

    if not load_extension():
        pytest.skip("the C++ CPU kernels are not built")
    cache = model.allocate_cache(1)
    ids_before = [id(t) for t in cache.conv_states + cache.ssm_states]
    with torch.no_grad():
        model(prompt(1, 4), past_key_values=cache)
        model(prompt(1, 1), past_key_values=cache)
    assert [id(t) for t in cache.conv_states + cache.ssm_states] == ids_before
    frozen = tiny_model(seed=1).requires_grad_(False)
    cache = frozen.allocate_cache(1)
    frozen(prompt(1, 4), past_key_values=cache)
    with torch.profiler.profile() as prof:
        logits = frozen(prompt(1, 1), past_key_values=cache)[0]  # autograd on, nothing requires grad
    assert not logits.requires_grad
    assert "openlm_mamba_cpu::state_step" in {e.key for e in prof.key_averages()}


# -- argument handling ---------------------------------------------------------------------------------------
def test_past_key_values_must_be_a_cache(model):
    with pytest.raises(TypeError, match=r"past_key_values must be a MambaCache \(from model.allocate_cache or "):
        model(prompt(1, 1), past_key_values=[(torch.zeros(1), torch.zeros(1))])
    with pytest.raises(TypeError, match="got dict"):
        model(prompt(1, 1), inference_params={})


def test_inputs_embeds_of_another_dtype_is_a_clear_error(model):
    emb = model.model.backbone.embedding(prompt(1, 3)).detach()
    with pytest.raises(TypeError, match=r"inputs_embeds has dtype torch.float64 but the model's weights are torch.fl"):
        model(inputs_embeds=emb.double())
    with pytest.raises(TypeError, match=r"inputs_embeds must be a torch\.Tensor"):
        model(inputs_embeds=emb.tolist())
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():  # autocast mixes dtypes by design
        assert model(inputs_embeds=emb.bfloat16())[0].shape == (1, 3, model.vocab_size)


def test_inputs_embeds_and_mask_without_cache_take_the_plain_forward(model):
    """Without a cache asked for, inputs_embeds / attention_mask run the plain forward: also empty batches
    and sequences, as input_ids do."""
    ids = prompt(2, 6)
    emb = model.model.backbone.embedding(ids).detach()
    with torch.no_grad():
        want = model(ids)[0]
        torch.testing.assert_close(model(inputs_embeds=emb)[0], want, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(ids, attention_mask=torch.ones(2, 6))[0], want, rtol=0, atol=1e-5)
        assert model(inputs_embeds=emb[:0])[0].shape == (0, 6, model.vocab_size)
        assert model(inputs_embeds=emb[:, :0])[0].shape == (2, 0, model.vocab_size)


@pytest.mark.parametrize(
    "eos",
    [7, torch.tensor(7), torch.tensor([7]), torch.tensor([7, 9]), [7, 9], (7,), "numpy", "numpy-array"],
    ids=["int", "tensor0d", "tensor1d", "tensor2", "list", "tuple", "np.int64", "np.array"],
)
def test_eos_token_id_accepts_integer_likes(model, eos):
    """transformers accepts an int, a list or a tensor of ids (and numpy integers, via operator.index)."""
    if isinstance(eos, str):
        np = pytest.importorskip("numpy")
        eos = np.int64(7) if eos == "numpy" else np.array([7, 9])
    from openlm_mamba.generation import _eos_tensor

    got = _eos_tensor(eos, 512, "cpu").tolist()
    assert got[0] == 7 and len(got) in (1, 2)
    assert generate(model, prompt(1, 3), max_new_tokens=3, eos_token_id=eos).shape[1] >= 4


@pytest.mark.parametrize(
    "eos", [True, 1.0, torch.tensor(1.0), torch.tensor([[1]]), "7", [7, None], torch.tensor(True), -1, 512]
)
def test_bad_eos_token_id_is_a_clear_error(model, eos):
    with pytest.raises(ValueError, match=r"eos_token_id must be an int \(or a list / 1-D tensor of ints\)"):
        generate(model, prompt(1, 3), max_new_tokens=2, eos_token_id=eos)


def test_explicit_step_backend_that_cannot_run_is_an_error():
    """generate(backend=...) / allocate_cache(backend=...) name the decoding step's backend: one the step op lacks
    ("cuda") or that cannot run here raises, as "triton" does on CPU; the model's own "cuda" (mamba_ssm's scan
    for the prompt) still leaves the step to auto."""
    from openlm_mamba.ops.dispatch import BackendUnavailableError

    m = tiny_model(n_layer=1)
    for call in (
        lambda: generate(m, prompt(1, 3), max_new_tokens=2, backend="cuda"),
        lambda: m.allocate_cache(1, backend="cuda"),
    ):
        with pytest.raises(BackendUnavailableError, match=r"selective_state_update: backend 'cuda' is not implemented"):
            call()
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="selective_state_update: backend 'triton' is unavailable"):
            generate(m, prompt(1, 3), max_new_tokens=2, backend="triton")
    assert generate(m, prompt(1, 3), max_new_tokens=2, backend="auto").shape == (1, 5)
    assert generate(m, prompt(1, 3), max_new_tokens=2, backend="torch").shape == (1, 5)


def test_output_grows_in_chunks(model, monkeypatch):
    """max_new_tokens is a limit, not an allocation: 10**11 with an immediate EOS returns at once; outputs longer
    than the first chunk (and than its doublings) equal the unchunked result."""
    from openlm_mamba import generation

    every = list(range(model.cfg.vocab_size))
    out = generate(model, prompt(2, 3), max_new_tokens=10**11, eos_token_id=every)
    assert out.shape == (2, 4)
    ids = prompt(2, 3, seed=1)
    want = generate(model, ids, max_new_tokens=11)
    monkeypatch.setattr(generation, "OUT_CHUNK", 2)  # 2 -> 4 -> 8 -> 11 columns
    assert torch.equal(generate(model, ids, max_new_tokens=11), want)
    assert torch.equal(generate(model, ids, max_new_tokens=1), want[:, :4])


def test_transformers_streamers(model, capsys):
    """A transformers BaseStreamer (put / end, e.g. TextStreamer) works: as transformers' generate does, put() gets
    the prompt first, then each new token, on the CPU, then end(); plain callables get the new tokens only, and
    an object that is both (benchmarks' clocks) is called."""
    ids = prompt(1, 4)
    want = generate(model, ids, max_new_tokens=5)

    class Recorder:
        def __init__(self):
            self.calls = []

        def put(self, value):
            self.calls.append(("put", value.clone()))

        def end(self):
            self.calls.append(("end", None))

    rec = Recorder()
    assert torch.equal(generate(model, ids, max_new_tokens=5, streamer=rec), want)
    assert [c[0] for c in rec.calls] == ["put"] * 6 + ["end"]
    assert torch.equal(rec.calls[0][1], ids) and all(c[1].shape == (1,) for c in rec.calls[1:6])
    assert torch.equal(torch.cat([c[1] for c in rec.calls[1:6]]), want[0, 4:])
    rec = Recorder()
    generate(model, ids, max_new_tokens=0, streamer=rec)
    assert [c[0] for c in rec.calls] == ["put", "end"]

    class Both(Recorder):
        def __call__(self, tok):
            self.calls.append(("call", tok.clone()))

    both = Both()
    generate(model, ids, max_new_tokens=3, streamer=both)
    assert [c[0] for c in both.calls] == ["call"] * 3
    with pytest.raises(TypeError, match=r"streamer must be a callable .* or an object with put"):
        generate(model, ids, max_new_tokens=2, streamer=object())
    if not has_module("transformers"):
        return
    from transformers import TextStreamer

    class Tok:  # the one method TextStreamer uses
        def decode(self, ids, **kw):
            return "".join(f"<{i}> " for i in ids)

    generate(model, ids, max_new_tokens=5, streamer=TextStreamer(Tok()))
    assert capsys.readouterr().out == "".join(f"<{i}> " for i in want[0].tolist()) + "\n"
    generate(model, ids, max_new_tokens=5, streamer=TextStreamer(Tok(), skip_prompt=True))
    assert capsys.readouterr().out == "".join(f"<{i}> " for i in want[0, 4:].tolist()) + "\n"


def test_generate_accepts_other_integer_id_dtypes(model):
    ids = prompt(1, 4)
    want = generate(model, ids, max_new_tokens=3)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        small = ids % 200  # fits uint8
        assert torch.equal(generate(model, small.to(dtype), max_new_tokens=3), generate(model, small, max_new_tokens=3))
    assert want.dtype == torch.long


# -- CUDA-graph decoding: the choice and the fallback (the capture itself runs in tests/test_gpu.py) ---------
def test_graph_wanted_by_default_only_where_it_pays_and_is_safe(model):
    from types import SimpleNamespace

    from openlm_mamba.generation import GRAPH_MIN_TOKENS, _graph_wanted

    cuda, cache = torch.device("cuda"), SimpleNamespace(fused=None)
    assert _graph_wanted(None, cuda, cache, GRAPH_MIN_TOKENS, model)
    assert not _graph_wanted(None, cuda, cache, GRAPH_MIN_TOKENS - 1, model)  # too short to pay for the capture
    assert not _graph_wanted(None, torch.device("cpu"), cache, 100, model)
    assert not _graph_wanted(None, cuda, SimpleNamespace(fused=()), 100, model)  # the fused C++ CPU step
    assert _graph_wanted(True, cuda, cache, 2, model) and not _graph_wanted(False, cuda, cache, 100, model)
    handle = model.model.lm_head.register_forward_hook(lambda *a: None)  # a replay would skip the hook
    try:
        assert not _graph_wanted(None, cuda, cache, 100, model)
        assert _graph_wanted(True, cuda, cache, 100, model)
    finally:
        handle.remove()


def test_failed_capture_falls_back_to_eager_unless_the_graph_was_asked_for(monkeypatch):
    from openlm_mamba import generation

    def broken(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(generation, "_GraphedStep", broken)
    with pytest.warns(RuntimeWarning, match="CUDA graph failed .*operation not permitted.*decoding eagerly"):
        assert generation._graphed_step_or_none(None, None, 1, torch.device("cuda"), None) is None
    with pytest.raises(RuntimeError, match="operation not permitted"):
        generation._graphed_step_or_none(None, None, 1, torch.device("cuda"), True)


def test_graphed_step_refuses_autograd(model):
    from openlm_mamba.generation import _GraphedStep

    with torch.enable_grad(), pytest.raises(RuntimeError, match="autograd off"):
        _GraphedStep(model, None, 1, torch.device("cuda"))


# -- prompts of different lengths (left padding) -----------------------------------------------------
def padded_batch(lengths: list[int], width: int, vocab: int = 512, seed: int = 5, pad: int = 0):
    """Rows of the given lengths, left-padded to ``width`` with ``pad``: (ids, mask, the unpadded rows)."""
    rows = [prompt(1, n, vocab, seed + i)[0] for i, n in enumerate(lengths)]
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    return ids, mask, rows


@pytest.mark.parametrize("backend", ["torch", None])  # None: auto, the C++ kernels on CPU
def test_padded_forward_equals_each_row_alone(model, backend):
    """Logits at real positions of a left- or right-padded batch equal each row's own forward, with autograd
    and gradient checkpointing too (padding zeroes the pads' conv and SSM inputs)."""
    model.set_backend(backend)
    try:
        ids, mask, rows = padded_batch([11, 4, 1], 11)
        right = torch.tensor([[1] * 7 + [0] * 4, [0, 0] + [1] * 5 + [0] * 4, [1] * 11])  # right and both sides
        with torch.no_grad():
            alone = [model(r[None])[0][0] for r in rows]
            got = model(ids, attention_mask=mask)[0]
            for i, r in enumerate(rows):
                torch.testing.assert_close(got[i, ids.shape[1] - len(r) :], alone[i], rtol=0, atol=1e-5)
            both = model(prompt(3, 11, seed=9), attention_mask=right)[0]
            for i in range(3):
                keep = right[i].bool()
                want = model(prompt(3, 11, seed=9)[i : i + 1, keep])[0][0]
                torch.testing.assert_close(both[i, keep], want, rtol=0, atol=1e-5)
        model.set_grad_checkpointing(True)
        got = model(ids, attention_mask=mask)[0]
        got[mask.bool()].sum().backward()
        assert model.model.backbone.layers[0].mixer.A_log.grad is not None
        torch.testing.assert_close(got[1, -4:].detach(), alone[1], rtol=0, atol=1e-5)
    finally:
        model.set_grad_checkpointing(False)
        model.zero_grad(set_to_none=True)
        model.set_backend(None)


def test_padded_prompts_take_the_fused_prefill_across_slices(model):
    """On CPU a padded prompt still runs model_prefill (masking inside it), and rows padded past the first
    slice of PREFILL_ROWS stay exact: their state is zero until their first token."""
    from openlm_mamba.model import PREFILL_ROWS

    width = PREFILL_ROWS // 2  # batch 3: slices of PREFILL_ROWS // 3 tokens, so padding spans two slices
    ids, mask, rows = padded_batch([width, 10, width - PREFILL_ROWS // 3 - 5], width)
    with torch.no_grad(), torch.profiler.profile() as prof:
        cache = model.allocate_cache(3)
        last = model.forward_with_cache(ids, cache, last_only=True, mask=mask.bool())[0][:, -1]
        full = model(ids, attention_mask=mask)[0]
    assert [e.count for e in prof.key_averages() if e.key == "openlm_mamba_cpu::model_prefill"] == [4]
    with torch.no_grad():
        for i, r in enumerate(rows):
            alone_cache = model.allocate_cache(1)
            want = model.forward_with_cache(r[None], alone_cache, last_only=True)[0][0, -1]
            torch.testing.assert_close(last[i], want, rtol=0, atol=1e-5)
            torch.testing.assert_close(full[i, width - len(r) :], model(r[None])[0][0], rtol=0, atol=1e-5)
            torch.testing.assert_close(cache.ssm_states[1][i], alone_cache.ssm_states[1][0], rtol=0, atol=1e-5)
            torch.testing.assert_close(cache.conv_states[0][i], alone_cache.conv_states[0][0], rtol=0, atol=1e-6)


def test_left_padded_prefill_then_decoding_equals_each_row_alone(model):
    """OpenLM's interface: a left-padded prompt with use_cache=True, then single steps given transformers'
    growing full-length mask: every row's logits match its own unpadded decoding."""
    ids, mask, rows = padded_batch([9, 3], 9)
    nxt = prompt(2, 12, seed=11)
    with torch.no_grad():
        logits, _, cache = model(ids, attention_mask=mask, use_cache=True)
        steps = []
        for t in range(nxt.shape[1]):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            steps.append(model(nxt[:, t : t + 1], past_key_values=cache, attention_mask=mask)[0])
        steps = torch.cat(steps, 1)
        for i, r in enumerate(rows):
            want = model(torch.cat([r, nxt[i]])[None])[0][0]
            torch.testing.assert_close(logits[i, 9 - len(r) :], want[: len(r)], rtol=0, atol=1e-5)
            torch.testing.assert_close(steps[i], want[len(r) :], rtol=0, atol=1e-4)
        with pytest.raises(ValueError, match="pads tokens that continue a cached sequence"):
            model(nxt[:, :2], past_key_values=cache, attention_mask=torch.tensor([[0, 1], [1, 1]]))


def test_generate_padded_batch_equals_each_prompt_alone(model):
    """A list of prompts of different lengths, or the left-padded tensor and its mask: each row continues as its
    prompt alone does (greedy, with a repetition penalty that must not see the pads); seeded sampling repeats."""
    ids, mask, rows = padded_batch([10, 3, 1, 6], 10, pad=7)
    listed = generate(model, [r.tolist() for r in rows], max_new_tokens=16, repetition_penalty=1.3, pad_token_id=7)
    masked = generate(model, ids, attention_mask=mask, max_new_tokens=16, repetition_penalty=1.3)
    assert torch.equal(listed, masked) and listed.shape == (4, 26)
    assert torch.equal(listed[:, :10], ids)  # the pads stay in the output, as transformers keeps them
    for i, r in enumerate(rows):
        alone = generate(model, r[None], max_new_tokens=16, repetition_penalty=1.3)
        assert torch.equal(listed[i, 10 - len(r) :], alone[0]), i
    kw = {"do_sample": True, "top_p": 0.9, "temperature": 0.8, "max_new_tokens": 8, "seed": 3}
    assert torch.equal(generate(model, rows, **kw), generate(model, rows, **kw))
    # equal lengths: no mask at all, the same as the stacked tensor
    assert torch.equal(
        generate(model, [rows[0], rows[0]], max_new_tokens=4), generate(model, ids[[0, 0]], max_new_tokens=4)
    )


@pytest.mark.parametrize(
    "prompts,kwargs,match",
    [
        ([[1, 2], []], {}, r"prompt 1 must be a non-empty 1-D sequence"),
        ([[1, 2], [[3]]], {}, r"prompt 1 must be a non-empty 1-D sequence of token ids .*, got \(1, 1\) torch.int64"),
        ([[1.5, 2.0]], {}, "prompt 0 must be a non-empty 1-D sequence of token ids"),
        ([], {}, "the list of prompts is empty"),
        ([[1, 2], [3]], {"attention_mask": torch.ones(2, 2)}, "pass it without an attention_mask"),
        ([[1, 2], [3, 600]], {}, r"token id 600 is outside the vocabulary \[0, 512\)"),
        (["hello", "hi"], {}, r"prompt 0 must be .* \(tokenize text first\), got str"),
        ([[5, 6], None], {}, r"prompt 1 must be a non-empty 1-D sequence of token ids .*got NoneType"),
        ([[5, [6]], [7]], {}, "prompt 0 must be a non-empty 1-D sequence of token ids"),
        ([5, 6, 7], {}, r"got the single id 5: one prompt is \[\[...\]\] or a tensor, not a flat list"),
    ],
)
def test_prompt_list_errors(model, prompts, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        generate(model, prompts, max_new_tokens=2, **kwargs)


def test_prompts_of_different_lengths_cannot_continue_a_cache(model):
    """The padding mask is made here from the list's lengths: the error says so, not that an attention_mask
    (which the caller never passed) pads tokens."""
    cache = model.allocate_cache(2)
    generate(model, prompt(2, 3), max_new_tokens=1, cache=cache)
    with pytest.raises(ValueError, match="prompts of different lengths continue a cache that already holds tokens"):
        generate(model, [[1, 2], [3]], max_new_tokens=1, cache=cache)


def test_numpy_integers_are_accepted_as_counts_and_seeds(model):
    """max_new_tokens, top_k and seed take numpy integers (and 0-d integer tensors), as eos_token_id does."""
    np = pytest.importorskip("numpy")
    ids = prompt(2, 3)
    want = generate(model, ids, max_new_tokens=3, do_sample=True, top_k=5, seed=7)
    got = generate(model, ids, max_new_tokens=np.int64(3), do_sample=True, top_k=np.int32(5), seed=np.int64(7))
    assert torch.equal(got, want)
    assert torch.equal(generate(model, ids, max_new_tokens=torch.tensor(3)), generate(model, ids, max_new_tokens=3))
    for bad in (np.float64(3.0), np.bool_(True)):
        with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
            generate(model, ids, max_new_tokens=bad)


def test_mask_edge_cases(model):
    """One-column masks, masks wider than the input, 1-D prompt + 1-D mask, a mask of the wrong type."""
    ids = prompt(2, 1)
    with torch.no_grad():
        got = model(ids, attention_mask=torch.tensor([[0], [1]]))[0]  # a lone pad: accepted by the forward
        torch.testing.assert_close(got[1], model(ids[1:])[0][0], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="row 0 is all padding"):
        generate(model, ids, attention_mask=torch.tensor([[0], [1]]), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(2, 5\), got \(2, 7\)"):
        model(prompt(2, 5), attention_mask=torch.ones(2, 7))
    with pytest.raises(ValueError, match=r"must have shape \(2, 5\), got \(2, 7\)"):
        model(prompt(2, 5), attention_mask=torch.ones(2, 7), use_cache=True)  # a fresh cache: nothing cached
    with torch.no_grad():
        _, _, cache = model(prompt(2, 3), use_cache=True)
        model(prompt(2, 2), past_key_values=cache, attention_mask=torch.ones(2, 5))  # cached + new: accepted
        with pytest.raises(ValueError, match=r"\(2, 1\) or \(2, 6\): cached \+ new tokens, got \(2, 4\)"):
            model(prompt(2, 1), past_key_values=cache, attention_mask=torch.ones(2, 4))
    one = prompt(1, 4)[0]
    assert torch.equal(
        generate(model, one, attention_mask=torch.tensor([1, 1, 1, 1]), max_new_tokens=3),
        generate(model, one, max_new_tokens=3),
    )
    with pytest.raises(TypeError, match=r"attention_mask must be a torch\.Tensor, got list"):
        generate(model, prompt(2, 3), attention_mask=[[1, 1, 1], [1, 1, 1]], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"row 0 is \[1, 1, 0\]; .*pads after them would decay the state"):
        generate(model, prompt(2, 3), attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]), max_new_tokens=2)


# -- continuing from a cache (a conversation, a shared prefix) ----------------------------------------
def test_generate_continues_a_conversation_from_its_cache(model):
    """Turn by turn through one cache: each turn's new tokens equal a fresh generate over the whole
    conversation so far (the cache holds every returned token, the last new one included)."""
    cache = model.allocate_cache(2)
    history = torch.empty(2, 0, dtype=torch.long)
    for turn, length in enumerate((9, 3, 1)):
        user = prompt(2, length, seed=30 + turn)
        out = generate(model, user, max_new_tokens=7, cache=cache)
        fresh = generate(model, torch.cat([history, user], 1), max_new_tokens=7)
        assert out.shape == (2, length + 7) and torch.equal(out[:, length:], fresh[:, -7:]), turn
        history = torch.cat([history, out], 1)
        assert cache.seqlen_offset == history.shape[1]
    with torch.no_grad():  # the cached state is that of the whole history
        want = model(history)[0][:, -1]
        got = model(prompt(2, 1, seed=40), past_key_values=cache)[0][:, -1]
        ref = model(torch.cat([history, prompt(2, 1, seed=40)], 1))[0][:, -1]
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
        assert not torch.allclose(got, want)


def test_shared_prefix_read_once_and_forked(model):
    """max_new_tokens=0 reads a prompt into the cache; clone(repeat=n) forks it: each continuation equals a
    fresh generate over prefix + its own tokens, and the original cache is untouched."""
    prefix = prompt(1, 12, seed=50)
    cache = model.allocate_cache(1)
    assert torch.equal(generate(model, prefix, max_new_tokens=0, cache=cache), prefix)
    assert cache.seqlen_offset == 12
    saved = [t.clone() for t in cache.ssm_states]
    users = prompt(3, 4, seed=51)
    forked = cache.clone(repeat=3)
    assert forked.batch_size == 3 and forked.params is cache.params
    out = generate(model, users, max_new_tokens=8, cache=forked)
    for i in range(3):
        alone = generate(model, torch.cat([prefix[0], users[i]])[None], max_new_tokens=8)
        assert torch.equal(out[i], alone[0, 12:]), i
    assert all(torch.equal(a, b) for a, b in zip(saved, cache.ssm_states)) and cache.seqlen_offset == 12
    twin = cache.clone()
    assert twin.ssm_states[0].data_ptr() != cache.ssm_states[0].data_ptr()
    with pytest.raises(ValueError, match="repeat must be a positive int, got 0"):
        cache.clone(repeat=0)
    picked = forked.select([2, 0, 2])  # any order, repeats allowed: copies of those rows
    for a, b in zip(picked.ssm_states + picked.conv_states, forked.ssm_states + forked.conv_states):
        assert torch.equal(a, b[[2, 0, 2]]) and a.data_ptr() != b.data_ptr()
    with pytest.raises(ValueError, match=r"rows must be a 1-D list of indices in \[0, 3\), got \[3\]"):
        forked.select([3])
    with pytest.raises(ValueError, match="rows is empty"):
        forked.select([])
    for rows, dtype in (([True, False, True], "bool"), ([0.9, 1.7], "float32")):
        with pytest.raises(ValueError, match=f"rows must be integer indices, got torch.{dtype}"):
            forked.select(rows)  # not a mask, not rounded


def test_generate_cache_errors(model):
    ids = prompt(2, 3)
    with pytest.raises(TypeError, match="cache must be a MambaCache"):
        generate(model, ids, cache=[], max_new_tokens=2)
    with pytest.raises(ValueError, match="generate: cache was allocated for batch 1, got batch 2"):
        generate(model, ids, cache=model.allocate_cache(1), max_new_tokens=2)
    cache = model.allocate_cache(2)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    a = generate(model, ids, attention_mask=mask, cache=cache, max_new_tokens=2)  # an empty cache: padding is fine
    assert torch.equal(a, generate(model, ids, attention_mask=mask, max_new_tokens=2))
    with pytest.raises(ValueError, match="generate: attention_mask pads tokens that continue a cached sequence"):
        generate(model, ids, attention_mask=mask, cache=cache, max_new_tokens=2)
    _, _, grad_cache = model(ids, use_cache=True)  # autograd on: states in a graph
    with pytest.raises(ValueError, match="cache holds states recorded by autograd"):
        generate(model, ids, cache=grad_cache, max_new_tokens=2)
    other = tiny_model(seed=1)  # same config, other weights: its cache would decode with them
    with pytest.raises(ValueError, match="generate: this cache was allocated by another model"):
        generate(model, ids, cache=other.allocate_cache(2), max_new_tokens=2)
    with pytest.raises(ValueError, match="past_key_values: this cache was allocated by another model"):
        model(ids, past_key_values=other.allocate_cache(2))
    wrapped = torch.nn.Module()  # a wrapper holding the model as .module (DDP, FSDP) still owns its caches
    wrapped.module, wrapped.cfg = model, model.cfg
    model.allocate_cache(2).check(wrapped, 2)
    with pytest.raises(ValueError, match=r"backend='triton', but the cache decodes with 'torch'"):
        generate(model, ids, cache=model.allocate_cache(2), backend="triton", max_new_tokens=2)
    # transformers' full-width mask (cached + new columns) on a continued cache
    cache = model.allocate_cache(2)
    generate(model, ids, cache=cache, max_new_tokens=2)
    full = torch.ones(2, cache.seqlen_offset + 3)
    assert generate(model, ids, attention_mask=full, cache=cache, max_new_tokens=2).shape == (2, 5)


def test_a_cache_left_part_way_by_a_failed_generate_is_refused_until_reset(model):
    """A generate() that raises after reading into the caller's cache (here: its streamer, on the 3rd token)
    leaves an unknown part of that call in it: using the cache again is an error naming that, until reset();
    errors raised before the cache is touched leave it usable."""
    ids = prompt(1, 4)
    cache = model.allocate_cache(1)
    with pytest.raises(ValueError, match="top_p"):  # refused before anything is read: the cache stays usable
        generate(model, ids, cache=cache, do_sample=True, top_p=2.0, max_new_tokens=3)
    assert cache.broken is None and cache.seqlen_offset == 0
    seen = []

    def streamer(tok):
        seen.append(tok)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(model, ids, cache=cache, streamer=streamer, max_new_tokens=8)
    with pytest.raises(ValueError, match=r"left part-way by a generate\(\) call that stopped with KeyboardInterrupt"):
        generate(model, ids, cache=cache, max_new_tokens=2)
    with pytest.raises(ValueError, match="left part-way"):
        model(ids, past_key_values=cache.clone())
    cache.reset()
    assert torch.equal(generate(model, ids, cache=cache, max_new_tokens=3), generate(model, ids, max_new_tokens=3))
    cache.reset()  # reading a prefix only (max_new_tokens=0) is marked the same way when it stops part-way
    real = model.forward_with_cache

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    model.forward_with_cache = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            generate(model, ids, cache=cache, max_new_tokens=0)
    finally:
        del model.forward_with_cache
    assert cache.broken and "KeyboardInterrupt" in cache.broken


def test_a_tiny_temperature_samples_the_argmax_instead_of_failing(model):
    """logits / 1e-45 overflows to inf (softmax NaN, and torch.multinomial fails): such rows take the
    max-subtracted form, which samples the most likely token."""
    ids = prompt(2, 5)
    greedy = generate(model, ids, max_new_tokens=4)
    for t in (1e-45, 1e-30):
        assert torch.equal(generate(model, ids, do_sample=True, temperature=t, seed=0, max_new_tokens=4), greedy)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_cache_of_another_dtype_decodes(model, dtype):
    """A cache allocated in another dtype than the float32 model's takes the per-layer path instead of the fused
    float32 C++ kernels (which would refuse it mid-way), and continues like a float32 one (bf16: loosely)."""
    ids = prompt(1, 6)
    cache = model.allocate_cache(1, dtype=dtype)
    assert cache.fused is None
    out = generate(model, ids, max_new_tokens=4, cache=cache)
    assert cache.seqlen_offset == 10 and cache.conv_states[0].dtype == dtype
    if dtype == torch.float64:
        assert torch.equal(out, generate(model, ids, max_new_tokens=4))


def test_left_padded_greedy_equals_transformers(hf_pair):
    """transformers' generate with a left-padded batch and its mask picks the same tokens (no repetition
    penalty: transformers' penalises the pad token too, ours ignores pads)."""
    model, hf = hf_pair
    ids, mask, _ = padded_batch([12, 5, 1], 12, seed=21)
    with torch.no_grad():
        real = mask.bool()
        torch.testing.assert_close(
            model(ids, attention_mask=mask)[0][real], hf(ids, attention_mask=mask).logits[real], rtol=0, atol=1e-4
        )
        theirs = hf.generate(ids, attention_mask=mask, pad_token_id=0, max_new_tokens=24, do_sample=False)
    ours = generate(model, ids, attention_mask=mask, max_new_tokens=24, eos_token_id=hf.config.eos_token_id)
    assert ours.shape == theirs.shape and torch.equal(ours, theirs)


# -- wrapped and hooked projections (LoRA, quantized layers, forward hooks) ------------------------------
class _LoRA(torch.nn.Module):
    """A peft-style low-rank adapter around an nn.Linear: exposes its weight / bias, adds x A B."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base = base
        g = torch.Generator().manual_seed(base.in_features)
        self.a = torch.nn.Parameter(torch.randn(base.in_features, rank, generator=g) * 0.3)
        self.b = torch.nn.Parameter(torch.randn(rank, base.out_features, generator=g) * 0.3)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.a @ self.b


def _greedy_by_full_forward(model: MambaLM, ids: torch.Tensor, n: int) -> torch.Tensor:
    with torch.enable_grad():  # the plain module path, token by token
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wrapped_projections_are_called_by_every_inference_path(dtype):
    """A LoRA-style wrapper on in_proj / x_proj / out_proj (it keeps .weight and .bias, as peft's do): the no-grad
    forward, the cached prefill and the decoding steps call it, as the training forward does, instead of reading
    the base weights (which silently dropped the adapter: logits 0.1 off, other tokens)."""
    model = tiny_model().to(dtype)
    ids = prompt(2, 7)
    plain_cache = model.allocate_cache(2)
    for layer in model.layers:
        mixer = layer.mixer
        mixer.in_proj, mixer.x_proj, mixer.out_proj = (
            _LoRA(mixer.in_proj).to(dtype),
            _LoRA(mixer.x_proj).to(dtype),
            _LoRA(mixer.out_proj).to(dtype),
        )
    with torch.no_grad():
        fast = model(ids)[0]
    with torch.enable_grad():
        slow = model(ids)[0]
    torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=1e-5 if dtype == torch.float32 else 2e-2)
    assert torch.equal(generate(model, ids, max_new_tokens=6), _greedy_by_full_forward(model, ids, 6))
    if plain_cache.fused is not None:  # the fused C++ paths read raw weights: not for wrapped layers
        assert model.allocate_cache(2).fused is None


def test_forward_hooks_on_projections_run_in_inference():
    """A forward hook on a projection runs in the no-grad forward and while generating, as with autograd on."""
    model = tiny_model()
    ids = prompt(1, 5)
    calls = []

    def halve(module, args, out):
        calls.append(out.shape[1])
        return out * 0.5

    handle = model.layers[1].mixer.out_proj.register_forward_hook(halve)
    try:
        with torch.no_grad():
            fast = model(ids)[0]
        with torch.enable_grad():
            slow = model(ids)[0]
        torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=1e-5)
        calls.clear()
        out = generate(model, ids, max_new_tokens=4)
        assert len(calls) == 4  # the prefill's last position, then 3 steps
        assert torch.equal(out, _greedy_by_full_forward(model, ids, 4))
    finally:
        handle.remove()
    from openlm_mamba.ops.cpp import use_cpp

    if use_cpp(ids.float()):  # the fused C++ paths again once the hook is gone
        assert model.allocate_cache(1).fused is not None


def test_instance_forward_and_block_hooks():
    """An instance-level ``forward`` on a projection (accelerate's hooks) counts as a wrapper; a hook on a mixer
    runs in the plain no-grad forward (which then skips the fused call) as with autograd on."""
    model = tiny_model()
    ids = prompt(1, 5)
    out_proj = model.layers[0].mixer.out_proj
    original = out_proj.forward
    out_proj.forward = lambda x: original(x) * 0.5
    try:
        with torch.no_grad():
            fast = model(ids)[0]
        torch.testing.assert_close(fast, model(ids)[0].detach(), rtol=0, atol=1e-5)
        assert torch.equal(generate(model, ids, max_new_tokens=4), _greedy_by_full_forward(model, ids, 4))
    finally:
        del out_proj.forward
    handle = model.layers[1].mixer.register_forward_hook(lambda m, a, o: o * 0.5)
    try:
        with torch.no_grad():
            fast = model(ids)[0]
        torch.testing.assert_close(fast, model(ids)[0].detach(), rtol=0, atol=1e-5)
    finally:
        handle.remove()


@pytest.mark.parametrize("where", ["mixer", "block", "norm_f", "mixer_pre", "in_proj_wrapped"])
def test_hooks_on_layers_run_in_cached_decoding_and_generate(where):
    """A steering hook on a mixer, a block or the final norm changes what the model decodes, as it changes the
    plain forward: the cached prefill and the steps ignored it (generate gave the unhooked model's tokens)."""
    model = tiny_model()
    ids = prompt(1, 12, seed=5)
    if where == "in_proj_wrapped":  # a hook deep inside an activation-checkpoint wrapper (FSDP wraps the same way)
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        layers = model.model.backbone.layers
        for i in range(len(layers)):
            layers[i] = checkpoint_wrapper(layers[i])
    unhooked = generate(model, ids[:, :6], max_new_tokens=8)
    push = 3 * torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))  # a steering vector
    if where == "mixer_pre":  # the usual pre-hook form: new positional args, as the plain forward calls mixer(x)
        handle = model.layers[1].mixer.register_forward_pre_hook(lambda m, a: (a[0] * 3.0,))
    elif where == "in_proj_wrapped":
        handle = model.layers[0].mixer.in_proj.register_forward_hook(lambda m, a, o: o * 3.0)
    else:
        target = {"mixer": model.layers[1].mixer, "block": model.layers[1], "norm_f": model.model.backbone.norm_f}
        handle = target[where].register_forward_hook(
            lambda m, a, o: o + push if isinstance(o, torch.Tensor) else (o[0] + push, *o[1:])
        )
    try:
        with torch.no_grad():
            full = model(ids)[0]
            pre, _, cache = model(ids[:, :8], use_cache=True)
            steps = [model(ids[:, t : t + 1], past_key_values=cache)[0] for t in range(8, 12)]
        torch.testing.assert_close(torch.cat([pre, *steps], 1), full, rtol=0, atol=1e-4)
        hooked = generate(model, ids[:, :6], max_new_tokens=8)
        assert torch.equal(hooked, _greedy_by_full_forward(model, ids[:, :6], 8))
        assert not torch.equal(hooked, unhooked)  # the hook matters here
    finally:
        handle.remove()


def test_repetition_penalty_accepts_prompt_ids_in_the_vocabulary_padding():
    """Ids in [vocab_size, padded) are valid input; the penalty must not index past the sampled width."""
    model = tiny_model(vocab_size=500)  # padded to a multiple of 8
    assert model.cfg.padded_vocab_size > 502
    ids = torch.tensor([[5, 502, 7]])
    plain = generate(model, ids, max_new_tokens=6)
    penalised = generate(model, ids, max_new_tokens=6, repetition_penalty=1.2)
    assert penalised.shape == plain.shape and int(penalised[0, 3:].max()) < 500


def test_cpu_head_for_decoding_rows_equals_the_linear_layer():
    """The C++ head_rows (a decoding step's few rows; MKL's sgemv was 6x slower on AMD EPYC) gives F.linear's
    logits, and a model whose head takes it decodes as its full forward computes."""
    from openlm_mamba.ops.cpp import load_extension

    if not load_extension():
        pytest.skip("the C++ kernels are unavailable")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5000, 96, generator=g)
    for rows in (1, 2, 3, 16):
        x = torch.randn(rows, 2 * 96, generator=g)[:, ::2]  # strided rows too
        got = torch.ops.openlm_mamba_cpu.head_rows(x, w)
        torch.testing.assert_close(got, torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-4)
    model = tiny_model(vocab_size=4096)  # 4096 x 64 = 2^18 weights: the size from which the head takes it
    head = model.model.lm_head
    calls = []
    real = torch.ops.openlm_mamba_cpu.head_rows
    try:
        torch.ops.openlm_mamba_cpu.head_rows = lambda *a: calls.append(a[0].shape) or real(*a)
        with torch.no_grad():
            x = torch.randn(2, 1, 64, generator=g)
            torch.testing.assert_close(head(x), torch.nn.functional.linear(x, head.weight), rtol=1e-5, atol=1e-4)
            assert calls == [(2, 64)]
            head(torch.randn(3, 40, 64, generator=g))  # a prompt's logits: MKL's matmul, not the row kernel
            assert len(calls) == 1
        assert head(x).requires_grad  # with autograd: the linear layer
    finally:
        torch.ops.openlm_mamba_cpu.head_rows = real
    step_diff, mixed_diff = decode_vs_full(model)
    assert step_diff < 1e-4 and mixed_diff < 1e-4, (step_diff, mixed_diff)


def test_forward_mode_ad_through_the_cpu_head():
    """jvp under no_grad: the C++ row kernel has no forward-AD formula, so the head keeps the linear layer there
    (the tangent came back zero)."""
    from openlm_mamba.ops.cpp import load_extension

    if not load_extension():
        pytest.skip("the C++ kernels are unavailable")
    head = tiny_model(vocab_size=4096).model.lm_head
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 64, generator=g), torch.randn(2, 64, generator=g)
    with torch.no_grad():
        _, tangent = torch.func.jvp(head, (x,), (t,))
        import torch.autograd.forward_ad as fwAD

        with fwAD.dual_level():
            dual_tangent = fwAD.unpack_dual(head(fwAD.make_dual(x, t))).tangent
    want = torch.nn.functional.linear(t, head.weight.detach())
    torch.testing.assert_close(tangent, want)
    torch.testing.assert_close(dual_tangent, want)


def test_hook_added_after_the_cache_inside_a_wrapped_layer_still_runs():
    """A projection hooked after the cache was allocated (steering between calls), in a layer that a checkpoint (or
    FSDP) wrapper holds: the step must see it, as it does unwrapped (the hook check did not look inside)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    ids = prompt(1, 9, seed=2)
    steps = []
    for wrap, hook in ((False, True), (True, True), (True, False)):
        model = tiny_model()
        if wrap:
            layers = model.model.backbone.layers
            for i in range(len(layers)):
                layers[i] = checkpoint_wrapper(layers[i])
        with torch.no_grad():
            _, _, cache = model(ids[:, :8], use_cache=True)
            if hook:
                model.layers[0].mixer.in_proj.register_forward_hook(lambda m, a, o: o * 3.0)
            steps.append(model(ids[:, 8:], past_key_values=cache)[0])
    hooked, hooked_wrapped, unhooked = steps
    torch.testing.assert_close(hooked_wrapped, hooked, rtol=0, atol=1e-5)
    assert (hooked - unhooked).abs().max() > 0.1  # the hook matters


def test_a_one_argument_mixer_pre_hook_keeps_the_padding_mask():
    """A pre-hook of the form ``(args[0] * k,)`` replaced every positional argument: the padding mask went with it,
    so pads leaked into a left-padded row's state (padded rows decoded other tokens than the same prompt alone)."""
    model = tiny_model()
    prompts = [prompt(1, n, seed=n)[0] for n in (6, 1, 3)]
    handle = model.layers[0].mixer.register_forward_pre_hook(lambda m, a: (a[0] * 1.5,))
    try:
        out = generate(model, prompts, max_new_tokens=8)
        for i, p in enumerate(prompts):
            assert torch.equal(out[i, -8:], generate(model, p[None], max_new_tokens=8)[0, -8:]), i
    finally:
        handle.remove()
