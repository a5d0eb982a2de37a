"""MambaLM: parity with transformers' MambaForCausalLM, the OpenLM contract, init and checkpointing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from openlm_mamba import MambaConfig, MambaLM

from .conftest import has_module

requires_hf = pytest.mark.skipif(not has_module("transformers"), reason="transformers is not installed")


def tiny(**changes) -> MambaConfig:
    return MambaConfig.load("mamba_tiny").replace(**changes)


def hf_twin(model: MambaLM):
    """transformers' MambaForCausalLM with the same weights, through our HF config mapping."""
    from openlm_mamba.convert import to_transformers

    return to_transformers(model)


@requires_hf
def test_logits_loss_and_grads_match_transformers():
    torch.manual_seed(0)
    model = MambaLM(tiny(vocab_size=500))  # padded to 504
    with torch.no_grad():  # make the test sensitive to D, norms and biases too
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    hf = hf_twin(model)
    ids = torch.randint(0, 500, (3, 37))
    logits, _, cache = model(ids)
    assert cache is None and logits.dtype == torch.float32 and logits.shape == (3, 37, 504)
    ref = hf(ids).logits
    assert (logits - ref).abs().max().item() < 1e-4

    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 504), ids[:, 1:].reshape(-1))
    ref_loss = F.cross_entropy(ref[:, :-1].reshape(-1, 504), ids[:, 1:].reshape(-1))
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    loss.backward()
    ref_loss.backward()
    # transformers names the embedding "embeddings" (and accepts "embedding." when loading)
    ours = {k.removeprefix("model.").replace("embedding.", "embeddings."): p.grad for k, p in model.named_parameters()}
    theirs = dict(hf.named_parameters())
    assert set(ours) <= set(theirs)
    for name, grad in ours.items():
        torch.testing.assert_close(grad, theirs[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_state_dict_keys_follow_upstream_openlm_layout():
    model = MambaLM(tiny(n_layer=2))
    keys = set(model.state_dict())
    mixer = ["in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias"]
    mixer += ["A_log", "D", "out_proj.weight"]
    want = {"model.backbone.embedding.weight", "model.backbone.norm_f.weight", "model.lm_head.weight"}
    for i in range(2):
        want |= {f"model.backbone.layers.{i}.mixer.{k}" for k in mixer} | {f"model.backbone.layers.{i}.norm.weight"}
    assert keys == want
    assert model.model.lm_head.weight is model.model.backbone.embedding.weight


def test_openlm_contract_attributes():
    model = MambaLM("mamba_tiny")
    assert model.vocab_size == 512 and model.seq_len == 128
    logits, hidden, cache = model(torch.randint(0, 512, (2, 9)))
    assert logits.shape == (2, 9, 512) and hidden.shape == (2, 9, 64) and cache is None
    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            assert hasattr(module, "reset_parameters"), type(module).__name__


def test_forward_backward_bf16_autocast():
    model = MambaLM("mamba_tiny")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _, _ = model(torch.randint(0, 512, (2, 16)))
    assert logits.dtype == torch.float32
    logits.logsumexp(-1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = MambaLM(tiny(n_layer=3))
    ids = torch.randint(0, 512, (2, 20))

    def grads():
        model.zero_grad()
        logits, _, _ = model(ids)
        F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    plain = grads()
    model.set_grad_checkpointing(True)
    calls = []
    hook = model.layers[0].mixer.in_proj.register_forward_hook(lambda *a: calls.append(1))
    ckpt = grads()
    hook.remove()
    assert len(calls) == 2, "with checkpointing the block is recomputed in backward"
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=0, atol=0, msg=k)


def test_meta_device_materialisation_is_correctly_distributed():
    cfg = tiny(d_model=256, n_layer=2, vocab_size=4096)
    with torch.device("meta"):
        model = MambaLM(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.reset_parameters()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.model.lm_head.weight is model.model.backbone.embedding.weight, "tie restored"
    mixer = model.layers[0].mixer
    want_a = torch.log(torch.arange(1, cfg.d_state + 1, dtype=torch.float32)).expand(cfg.d_inner, -1)
    torch.testing.assert_close(mixer.A_log, want_a)
    torch.testing.assert_close(mixer.D, torch.ones(cfg.d_inner))
    dt = F.softplus(mixer.dt_proj.bias)  # log-uniform in [dt_min, dt_max]
    assert dt.min() >= cfg.dt_min * 0.999 and dt.max() <= cfg.dt_max * 1.001
    log_dt = dt.log()
    mid = (math.log(cfg.dt_min) + math.log(cfg.dt_max)) / 2
    assert abs(log_dt.mean().item() - mid) < 0.3
    emb = model.model.backbone.embedding.weight
    assert abs(emb.std().item() - 0.02) < 0.002
    bound = cfg.dt_rank_value**-0.5
    assert mixer.dt_proj.weight.abs().max() <= bound
    out_w = mixer.out_proj.weight  # kaiming-uniform(a=sqrt 5) bound 1/sqrt(fan_in), / sqrt(n_layer)
    assert out_w.abs().max() <= 1 / math.sqrt(cfg.d_inner) / math.sqrt(cfg.n_layer) + 1e-6
    assert out_w.abs().max() > 0.9 / math.sqrt(cfg.d_inner) / math.sqrt(cfg.n_layer)
    # mamba_ssm's markers survive materialisation: no weight decay on A_log and D, no re-init of dt's bias
    assert mixer.A_log._no_weight_decay and mixer.D._no_weight_decay and mixer.dt_proj.bias._no_reinit
    assert not hasattr(mixer.in_proj.weight, "_no_weight_decay")


def test_mamba_7b_on_meta_device():
    with torch.device("meta"):
        model = MambaLM("mamba_7b")
    n = model.num_parameters()
    assert abs(n - 6.95e9) / 6.95e9 < 0.01
    assert n == model.cfg.num_parameters()


@pytest.mark.parametrize(
    "ids,error,pattern",
    [
        (torch.tensor([[1, 2, 512]]), ValueError, r"token id 512 is outside the vocabulary \[0, 512\)"),
        (torch.tensor([[-1, 2]]), ValueError, r"token id -1 is outside the vocabulary"),
        (torch.tensor([[0.5, 1.0]]), TypeError, r"input_ids must be an integer tensor, got torch.float32"),
        (torch.tensor([1, 2, 3]), ValueError, r"input_ids must have shape \(batch, seq\), got \(3,\)"),
        (torch.tensor([[True, False]]), TypeError, r"input_ids must be an integer tensor, got torch.bool"),
        (torch.tensor([[1, 600]], dtype=torch.int16), ValueError, r"token id 600 is outside the vocabulary"),
        (torch.tensor([[2**63 + 5]], dtype=torch.uint64), ValueError, r"token id 9223372036854775813 is outside the"),
    ],
)
def test_bad_token_ids_give_clear_errors(ids, error, pattern):
    with pytest.raises(error, match=pattern):
        MambaLM("mamba_tiny")(ids)


def test_layernorm_variant_and_untied_head_run():
    model = MambaLM(tiny(rms_norm=False, tie_embeddings=False))
    assert model.model.lm_head.weight is not model.model.backbone.embedding.weight
    assert model.num_parameters() == model.cfg.num_parameters()
    logits, _, _ = model(torch.randint(0, 512, (1, 8)))
    logits.sum().backward()


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32])
def test_integer_id_dtypes_are_accepted(dtype):
    """Token ids of any integer dtype give the int64 ids' logits (int32 is taken as is, the others cast, as
    the embedding takes only int32 / int64), with and without autograd and through the cache."""
    torch.manual_seed(0)
    model = MambaLM("mamba_tiny")
    ids = torch.randint(0, 100, (2, 5))
    want = model(ids)[0]
    torch.testing.assert_close(model(ids.to(dtype))[0], want, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids.to(dtype), use_cache=True)[0], want, rtol=0, atol=1e-5)


def test_empty_batches_and_sequences_run_with_and_without_autograd():
    """A batch of 0 sequences (or sequences of 0 tokens) gives empty logits, also under no_grad, where the fused
    CPU prefill (which needs rows) is skipped; with autograd the backward runs."""
    model = MambaLM("mamba_tiny")
    for shape in ((0, 5), (2, 0), (0, 0)):
        ids = torch.zeros(shape, dtype=torch.long)
        with torch.no_grad():
            logits, hidden, _ = model(ids)
        assert logits.shape == (*shape, model.vocab_size) and hidden.shape == (*shape, model.cfg.d_model)
        logits = model(ids)[0]
        assert logits.shape == (*shape, model.vocab_size)
        logits.sum().backward()


def test_config_dict():
    """A dict is read as MambaConfig fields (MambaConfig.from_dict(d, require_all=False)); missing required
    fields and MambaConfig.load(dict) point at the ways to build one."""
    from openlm_mamba import ConfigError

    model = MambaLM({"d_model": 32, "n_layer": 2, "vocab_size": 100, "d_state": 4})
    assert model.cfg == MambaConfig(d_model=32, n_layer=2, vocab_size=100, d_state=4)
    assert model(torch.randint(0, 100, (1, 3)))[0].shape == (1, 3, 104)
    with pytest.raises(
        ConfigError, match=r"a config dict must give d_model, n_layer, vocab_size .*MambaConfig\(\*\*d\)"
    ):
        MambaLM({"d_model": 64})
    with pytest.raises(ConfigError, match="unknown field 'd_modle'"):
        MambaLM({"d_modle": 64, "d_model": 64, "n_layer": 1, "vocab_size": 10})
    with pytest.raises(ConfigError, match=r"use MambaConfig.from_dict\(d\) .* or MambaConfig\(\*\*d\)"):
        MambaConfig.load({"d_model": 64})


@pytest.mark.parametrize("cfg", [123, None, 1.5, ["mamba_tiny"]])
def test_config_of_another_type_is_a_type_error(cfg):
    """Not a config name looked up as one ("unknown model config '123'"): a TypeError saying what is accepted."""
    with pytest.raises(
        TypeError, match=r"^MambaLM: cfg must be a MambaConfig, a shipped config name .*, a JSON config"
    ):
        MambaLM(cfg)


def test_config_path_as_any_path_like(tmp_path):
    """A JSON config given as an os.PathLike that is not a pathlib.Path (os.DirEntry, a custom class) loads."""
    import os

    path = tmp_path / "my_tiny.json"
    MambaConfig.load("mamba_tiny").replace(d_model=32).save(path)

    class Where(os.PathLike):
        def __fspath__(self) -> str:
            return str(path)

    entry = next(e for e in os.scandir(tmp_path) if e.name == "my_tiny.json")
    for p in (Where(), entry):
        assert MambaConfig.load(p).d_model == 32
        assert MambaLM(p).cfg.d_model == 32


def test_public_api_has_docstrings_and_type_hints():
    import inspect

    from openlm_mamba.convert import to_transformers
    from openlm_mamba.generation import MambaCache
    from openlm_mamba.ops import selective_scan

    for item in (MambaLM.layers, MambaCache.batch_size, MambaConfig.save, MambaConfig.replace):
        assert (item.__doc__ or "").strip(), item
    for fn in (MambaLM.forward, MambaLM.allocate_cache, to_transformers, selective_scan):
        sig = inspect.signature(fn)
        assert sig.return_annotation is not inspect.Signature.empty, fn
        unhinted = [p for p in sig.parameters.values() if p.name != "self" and p.annotation is inspect.Parameter.empty]
        assert not unhinted, (fn, unhinted)


@requires_hf
def test_float64_model_is_float64_throughout():
    """A .double() model computes in float64 end to end (A, D and dt's bias are not rounded through float32):
    its output matches a float64 reference computed independently, and to_transformers copies it exactly."""
    from openlm_mamba.ops import selective_scan_ref

    torch.manual_seed(0)
    model = MambaLM(tiny(d_model=32, n_layer=1, vocab_size=64)).double()
    ids = torch.randint(0, 64, (2, 12))
    logits, hidden, _ = model(ids)
    assert logits.dtype == hidden.dtype == torch.float64
    mixer, norm = model.layers[0].mixer, model.layers[0].norm
    emb = model.model.backbone.embedding(ids)
    h = emb * torch.rsqrt(emb.square().mean(-1, keepdim=True) + norm.eps) * norm.weight
    x, z = mixer.in_proj(h).chunk(2, dim=-1)
    x = torch.nn.functional.conv1d(
        x.transpose(1, 2), mixer.conv1d.weight, mixer.conv1d.bias, padding=mixer.cfg.d_conv - 1, groups=x.shape[-1]
    )[..., :12]
    x = torch.nn.functional.silu(x)
    delta, A, B, C = mixer.ssm_inputs(x)
    y = selective_scan_ref(x, delta, A, B, C, mixer.D, z.transpose(1, 2), mixer.dt_proj.bias, delta_softplus=True)
    r = mixer.out_proj(y.transpose(1, 2)) + emb
    final = model.model.backbone.norm_f
    want = r * torch.rsqrt(r.square().mean(-1, keepdim=True) + final.eps) * final.weight
    torch.testing.assert_close(hidden, want, rtol=1e-12, atol=1e-12)
    hf = hf_twin(model)
    for name, p in hf.named_parameters():
        assert p.dtype == torch.float64, name
    torch.testing.assert_close(hf.backbone.layers[0].mixer.in_proj.weight, mixer.in_proj.weight, rtol=0, atol=0)
    torch.testing.assert_close(hf(ids).logits.double(), logits, rtol=1e-6, atol=1e-6)  # HF returns float32 logits


# -- loading into a model built on the meta device, tied heads ---------------------------------------------
def test_assign_load_and_to_empty_keep_the_head_tied_and_the_markers():
    """The README's meta-device build, then load_state_dict(assign=True) (or to_empty() then a plain load):
    the LM head is the embedding again, not a second parameter (one AdamW state, the right count), and A_log /
    D keep their _no_weight_decay markers."""
    src = MambaLM("mamba_tiny")
    for load in ("assign", "to_empty"):
        with torch.device("meta"):
            model = MambaLM("mamba_tiny")
        if load == "assign":
            model.load_state_dict(src.state_dict(), assign=True)
        else:
            model.to_empty(device="cpu")
            model.load_state_dict(src.state_dict())
        assert model.model.lm_head.weight is model.model.backbone.embedding.weight, load
        assert sum(p.numel() for p in model.parameters()) == src.cfg.num_parameters(), load
        mixer = model.layers[0].mixer
        assert mixer.A_log._no_weight_decay and mixer.D._no_weight_decay and mixer.dt_proj.bias._no_reinit, load
        ids = torch.randint(0, 512, (1, 6))
        torch.testing.assert_close(model(ids)[0], src(ids)[0], rtol=0, atol=0)


def test_untied_state_dict_into_a_tied_model_is_refused():
    src = MambaLM("mamba_tiny")
    state = src.state_dict()
    state["model.lm_head.weight"] = state["model.lm_head.weight"] + 1.0  # an untied checkpoint's head
    with pytest.raises(ValueError, match=r"model.lm_head.weight that differs from its model.backbone.embedding"):
        MambaLM("mamba_tiny").load_state_dict(state)
    MambaLM("mamba_tiny").load_state_dict(src.state_dict())  # tied: both keys, one tensor
    copies = {k: v.clone() for k, v in src.state_dict().items()}  # tied but saved as two copies, with a NaN
    copies["model.backbone.embedding.weight"][0, 0] = float("nan")
    copies["model.lm_head.weight"][0, 0] = float("nan")
    MambaLM("mamba_tiny").load_state_dict(copies)


@pytest.mark.skipif(not has_module("open_lm"), reason="OpenLM's model build needs open_lm")
def test_untied_state_dict_with_wrapper_prefixes_is_refused_too():
    """OpenLM's build strips module. / _orig_mod. prefixes in a hook that runs after the model's own."""
    from openlm_mamba.openlm import build_model

    state = MambaLM("mamba_tiny").state_dict()
    state["model.lm_head.weight"] = state["model.lm_head.weight"] + 1.0
    for wrapper in ("module.", "_orig_mod."):
        prefixed = {wrapper + k: v for k, v in state.items()}
        with pytest.raises(ValueError, match="differs from its"):
            build_model(MambaLM("mamba_tiny").cfg).load_state_dict(prefixed)


def test_meta_forward_gives_shapes_and_integer_cache_dtypes_are_refused():
    with torch.device("meta"):
        model = MambaLM("mamba_tiny")
        logits = model(torch.zeros(2, 8, dtype=torch.long))[0]
    assert logits.shape == (2, 8, 512) and logits.is_meta
    with pytest.raises(
        ValueError, match=r"dtype \(of the conv states\) must be a floating-point dtype, got torch\.int64"
    ):
        MambaLM("mamba_tiny").allocate_cache(1, dtype=torch.int64)
