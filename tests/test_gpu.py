"""Native GPU checks beyond the op grids: the step kernel, recurrent decoding, bf16 training and
gradient checkpointing with the Triton backend. Skipped without a CUDA device (CPU CI covers the
same paths through the interpreter); ``benchmarks/gpu_check.sh`` runs them on a lent GPU."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from openlm_mamba import MambaConfig, MambaLM, generate
from openlm_mamba.ops import selective_state_update, selective_state_update_ref

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by benchmarks/gpu_check.sh)"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
]

DEV = "cuda"


def tiny(n_layer: int = 2, vocab: int = 512, seed: int = 0) -> MambaLM:
    torch.manual_seed(seed)
    cfg = MambaConfig.load("mamba_tiny").replace(vocab_size=vocab, n_layer=n_layer)
    return MambaLM(cfg).to(DEV)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("batch,dim,dstate,groups", [(1, 8, 4, 0), (3, 300, 16, 0), (2, 64, 5, 4), (4, 8192, 16, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_update_kernel_matches_reference(batch, dim, dstate, groups, dtype):
    g = torch.Generator(device=DEV).manual_seed(1)

    def r(*shape, dt=torch.float32):
        return torch.randn(*shape, generator=g, device=DEV).to(dt)

    state = r(batch, dim, dstate)
    x, dt, z = r(batch, dim, dt=dtype), r(batch, dim, dt=dtype), r(batch, dim, dt=dtype)
    A = -torch.rand(dim, dstate, generator=g, device=DEV) - 0.1
    bc = (batch, groups, dstate) if groups else (batch, dstate)
    B, C = r(*bc, dt=dtype), r(*bc, dt=dtype)
    D, dt_bias = r(dim), r(dim) * 0.5
    s_ref, s_tri = state.clone(), state.clone()
    ref = selective_state_update_ref(s_ref, x, dt, A, B, C, D, z, dt_bias, True)
    out = selective_state_update(s_tri, x, dt, A, B, C, D, z, dt_bias, True, backend="triton")
    assert out.dtype == ref.dtype and out.shape == ref.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 output rounding (8 significant bits)
    assert rel_err(out, ref) < tol and rel_err(s_tri, s_ref) < 1e-5


def test_decode_equals_full_forward_triton():
    model = tiny().eval()
    model.set_backend("triton")
    ids = torch.randint(0, 512, (2, 70), device=DEV, generator=torch.Generator(device=DEV).manual_seed(0))
    with torch.no_grad():
        full = model(ids)[0]
        cache = model.allocate_cache(2)
        assert cache.backend == "triton", cache.backend
        parts = [model(ids[:, :5], past_key_values=cache)[0]]
        parts += [model(ids[:, t : t + 1], past_key_values=cache)[0] for t in range(5, 70)]
    diff = (torch.cat(parts, 1) - full).abs().max().item()
    assert diff < 1e-4, diff


def test_generate_greedy_matches_transformers():
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed")
    from openlm_mamba.convert import to_transformers

    model = tiny().eval()
    hf = to_transformers(model).to(DEV).eval()
    ids = torch.randint(0, 512, (1, 16), device=DEV, generator=torch.Generator(device=DEV).manual_seed(3))
    with torch.no_grad():
        theirs = hf.generate(
            ids, attention_mask=torch.ones_like(ids), pad_token_id=0, max_new_tokens=32, do_sample=False
        )
    ours = generate(model, ids, max_new_tokens=32, eos_token_id=hf.config.eos_token_id)
    assert ours.shape == theirs.shape and ours.shape[1] > 30
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_graphed_step_equals_eager_step(backend):
    from openlm_mamba.generation import _GraphedStep

    model = tiny(n_layer=3).eval()
    model.set_backend(backend)
    gen = torch.Generator(device=DEV).manual_seed(7)
    ids = torch.randint(0, 512, (2, 40), device=DEV, generator=gen)
    with torch.inference_mode():
        eager, graphed = model.allocate_cache(2), model.allocate_cache(2)
        model.forward_with_cache(ids[:, :8], eager)
        model.forward_with_cache(ids[:, :8], graphed)
        step = _GraphedStep(model, graphed, 2, torch.device(DEV))
        # the capture's warm-up step is undone: states and offset as after the prompt
        assert graphed.seqlen_offset == eager.seqlen_offset == 8
        for a, b in zip(eager.ssm_states + eager.conv_states, graphed.ssm_states + graphed.conv_states):
            assert torch.equal(a, b)
        for t in range(8, 40):
            want = model.forward_with_cache(ids[:, t : t + 1], eager)[0][:, -1].clone()
            got = step(ids[:, t : t + 1])
            assert (got - want).abs().max().item() < 1e-5, t
        assert graphed.seqlen_offset == eager.seqlen_offset == 40
        for a, b in zip(eager.ssm_states, graphed.ssm_states):
            assert (a - b).abs().max().item() < 1e-5


@pytest.mark.parametrize("sample", [False, True])
def test_generate_with_cuda_graph_equals_without(sample):
    model = tiny().eval()
    ids = torch.randint(0, 512, (3, 12), device=DEV, generator=torch.Generator(device=DEV).manual_seed(9))
    kw = {"do_sample": True, "temperature": 0.8, "top_p": 0.8, "repetition_penalty": 1.1, "seed": 4} if sample else {}
    from openlm_mamba import generation

    class Spy(generation._GraphedStep):  # counts captures and replays: the graph path really ran
        captures = replays = 0

        def __init__(self, *args):
            super().__init__(*args)
            Spy.captures += 1

        def __call__(self, tok):
            Spy.replays += 1
            return super().__call__(tok)

    runs = []
    for g in (False, True, None):
        Spy.captures = Spy.replays = 0
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(generation, "_GraphedStep", Spy)
            runs.append(generate(model, ids, max_new_tokens=40, cuda_graph=g, **kw))
        assert (Spy.captures, Spy.replays) == ((0, 0) if g is False else (1, 39)), (g, Spy.captures, Spy.replays)
    assert runs[0].shape == (3, 52)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    # EOS stopping per sequence through the graph: stop at a token the first row emits
    eos = int(runs[0][0, 20])
    a, b = (generate(model, ids, max_new_tokens=40, eos_token_id=eos, cuda_graph=g, **kw) for g in (False, True))
    assert torch.equal(a, b) and a.shape[1] <= 52


def test_conversation_through_a_cache_with_and_without_the_graph():
    """generate(cache=...) turn by turn: the graphed decode leaves the same states in the caller's cache as the
    eager one (the last new token included), and left padding on the first turn goes through the GPU kernels."""
    model = tiny().eval()
    gen = torch.Generator(device=DEV).manual_seed(11)
    turns = [torch.randint(0, 512, (2, n), device=DEV, generator=gen) for n in (10, 3, 6)]
    mask = torch.ones(2, 10, dtype=torch.long, device=DEV)
    mask[1, :4] = 0
    outs = {}
    for g in (False, True):
        cache = model.allocate_cache(2)
        outs[g] = [generate(model, turns[0], attention_mask=mask, max_new_tokens=16, cache=cache, cuda_graph=g)]
        outs[g] += [generate(model, t, max_new_tokens=16, cache=cache, cuda_graph=g) for t in turns[1:]]
        assert cache.seqlen_offset == sum(o.shape[1] for o in outs[g])
    for a, b in zip(outs[False], outs[True]):
        assert torch.equal(a, b)
    alone = generate(model, turns[0][1:, 4:], max_new_tokens=16, cuda_graph=False)
    assert torch.equal(outs[False][0][1, 4:], alone[0])


def test_cuda_graph_refused_under_autocast():
    model = tiny().eval()
    ids = torch.randint(0, 512, (1, 4), device=DEV)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with pytest.raises(ValueError, match="autocast"):
            generate(model, ids, max_new_tokens=10, cuda_graph=True)
        assert generate(model, ids, max_new_tokens=10).shape == (1, 14)  # None: eager under autocast


def _train_grads(model: MambaLM, ids: torch.Tensor, backend: str, ckpt: bool = False, bf16: bool = False):
    model.set_backend(backend)
    model.set_grad_checkpointing(ckpt)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        logits = model(ids)[0]
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.roll(-1, 1).flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_grad_checkpointing_matches_plain_backward():
    model = tiny(n_layer=3)
    ids = torch.randint(0, 512, (2, 300), device=DEV, generator=torch.Generator(device=DEV).manual_seed(5))
    loss, grads = _train_grads(model, ids, "triton")
    loss_ck, grads_ck = _train_grads(model, ids, "triton", ckpt=True)
    assert torch.equal(loss, loss_ck)
    for name, g in grads.items():
        assert rel_err(grads_ck[name], g) < 1e-6, name


def test_bf16_autocast_training_close_to_fp32_reference():
    model = tiny(n_layer=2)
    ids = torch.randint(0, 512, (2, 256), device=DEV, generator=torch.Generator(device=DEV).manual_seed(6))
    loss_ref, grads_ref = _train_grads(model, ids, "torch")
    loss, grads = _train_grads(model, ids, "triton", bf16=True)
    assert abs(loss.item() - loss_ref.item()) < 2e-2 * loss_ref.item()
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name
        assert rel_err(g, grads_ref[name]) < 5e-2, (name, rel_err(g, grads_ref[name]))


@pytest.mark.parametrize("launch", ["seq:1x128x4", "seq:2x64x2", "seq:1x256x4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seq_kernels_at_gpu_launch_shapes(launch, dtype, monkeypatch):
    """The plain-recurrence kernels at the channel blocks a GPU runs (the op grid uses 16), with the
    ex2.approx.ftz exp: forward and every gradient against the reference."""
    from openlm_mamba.ops import selective_scan
    from openlm_mamba.ops.selective_scan.reference import selective_scan_ref

    monkeypatch.setenv("OPENLM_MAMBA_SCAN_LAUNCH", f"fwd={launch},bwd={launch}")
    g = torch.Generator(device=DEV).manual_seed(2)
    b, d, L, N = 2, 640, 300, 16  # d not a multiple of the blocks; L over two chunks

    def r(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g, device=DEV) * scale).to(dt).requires_grad_()

    u, delta, z = r(b, L, d).transpose(1, 2), r(b, L, d, scale=0.5).transpose(1, 2), r(b, L, d).transpose(1, 2)
    A = (-(torch.rand(d, N, generator=g, device=DEV) + 0.5)).requires_grad_()
    B, C = r(b, N, L), r(b, N, L)
    D, bias = r(d, dt=torch.float32), r(d, scale=0.3, dt=torch.float32)
    h0 = r(b, d, N, dt=torch.float32)
    args = (u, delta, A, B, C, D, z, bias)
    kw = dict(delta_softplus=True, return_last_state=True, initial_state=h0)
    out, last = selective_scan(*args, **kw, backend="triton")
    ref, ref_last = selective_scan_ref(*args, **kw)
    tensors = [*args, h0]
    go = torch.randn(out.shape, generator=g, device=DEV)
    grads = torch.autograd.grad((out.float() * go).sum() + last.sum(), tensors)
    ref_grads = torch.autograd.grad((ref.float() * go).sum() + ref_last.sum(), tensors)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert rel_err(out, ref) < tol and rel_err(last, ref_last) < tol
    for name, got, want in zip(["u", "delta", "A", "B", "C", "D", "z", "bias", "h0"], grads, ref_grads):
        assert rel_err(got, want) < tol, name


def test_eval_shared_contexts_on_gpu():
    """lm-eval scoring on the GPU: shared contexts (left-padded prefill, forked states) give the same
    log-likelihoods as scoring every request whole."""
    pytest.importorskip("lm_eval")
    from openlm_mamba.evaluation import MambaEvalLM

    class Tok:  # all MambaEvalLM reads of a tokenizer here
        eos_token_id = 0

        def __len__(self) -> int:
            return 512

    model = tiny().eval()
    g = torch.Generator().manual_seed(3)
    ctxs = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (40, 9, 130)]
    reqs = [(None, c, torch.randint(1, 512, (k,), generator=g).tolist()) for c in ctxs for k in (1, 4, 2, 7)]
    lms = [MambaEvalLM(model=model, tokenizer=Tok(), batch_size=2, share_contexts=s) for s in (True, False)]
    shared, whole = (lm._loglikelihood_tokens(reqs, disable_tqdm=True) for lm in lms)
    assert max(abs(a[0] - b[0]) for a, b in zip(shared, whole)) < 1e-3
