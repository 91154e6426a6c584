"""Model parity with transformers (torch), checkpoint round trips, GGUF import, sharding."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from meljax.models import (
    ModelConfig,
    Transformer,
    cache_bytes,
    default_positions,
    from_pretrained,
    init_cache,
    layers,
    save_pretrained,
)
from meljax.runtime import sharding as shd

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
)

CASES = {
    "llama_untied": (transformers.LlamaConfig, dict(TINY, tie_word_embeddings=False)),
    "llama_tied_llama3rope": (
        transformers.LlamaConfig,
        dict(TINY, tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
    ),
    "qwen2": (transformers.Qwen2Config, dict(TINY, tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(TINY, head_dim=12, tie_word_embeddings=False)),
}


def torch_model(name: str, path: str):
    cls, kw = CASES[name]
    torch.manual_seed(0)
    cfg = cls(**kw)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval().float()
    with torch.no_grad():  # random biases/norms so that those code paths are really compared
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def padded_batch(vocab: int):
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, vocab, size=(3, 11)).astype(np.int32)
    mask = np.ones_like(tokens, dtype=bool)
    mask[1, :4] = False  # left padding
    mask[2, 8:] = False  # right padding
    return tokens, mask


def torch_logits(model, tokens, mask):
    pos = np.asarray(default_positions(jnp.asarray(mask)))
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(pos, dtype=torch.long),
        )
    return out.logits.numpy()


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(tmp_path, name):
    ref = torch_model(name, str(tmp_path))
    model = from_pretrained(str(tmp_path))
    tokens, mask = padded_batch(model.cfg.vocab_size)
    ours = np.asarray(model(jnp.asarray(tokens), kv_mask=jnp.asarray(mask)))
    theirs = torch_logits(ref, tokens, mask)
    assert ours.shape == (3, 11, model.cfg.vocab_size)
    np.testing.assert_array_less(np.abs(ours - theirs)[mask].max(), 1e-4)


@pytest.mark.parametrize("name", ["llama_tied_llama3rope", "qwen3"])
def test_save_pretrained_round_trip(tmp_path, name):
    torch_model(name, str(tmp_path / "src"))
    model = from_pretrained(str(tmp_path / "src"))
    save_pretrained(model, str(tmp_path / "out"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    tokens, mask = padded_batch(model.cfg.vocab_size)
    ours = np.asarray(model(jnp.asarray(tokens), kv_mask=jnp.asarray(mask)))
    np.testing.assert_array_less(
        np.abs(ours - torch_logits(reloaded, tokens, mask))[mask].max(), 1e-4
    )
    again = from_pretrained(str(tmp_path / "out"))
    np.testing.assert_array_equal(
        ours, np.asarray(again(jnp.asarray(tokens), kv_mask=jnp.asarray(mask)))
    )


def test_bf16_params_and_sharded_checkpoint(tmp_path):
    torch_model("qwen2", str(tmp_path / "src"))
    model = from_pretrained(str(tmp_path / "src"), dtype="bfloat16")
    assert model.embed[...].dtype == jnp.bfloat16
    save_pretrained(model, str(tmp_path / "out"), max_shard_bytes=4096)
    files = os.listdir(tmp_path / "out")
    assert "model.safetensors.index.json" in files
    again = from_pretrained(str(tmp_path / "out"), dtype="bfloat16")
    np.testing.assert_array_equal(
        np.asarray(model.embed[...], np.float32), np.asarray(again.embed[...], np.float32)
    )


@pytest.mark.parametrize("tied", [False, True])
def test_kv_cache_decode_matches_full_forward(tied):
    cfg = ModelConfig(
        model_type="qwen3",
        vocab_size=50,
        hidden_size=32,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        qk_norm=True,
        tie_word_embeddings=tied,
    )
    model = Transformer(cfg, rngs=nnx.Rngs(1))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 50, (2, 9)), jnp.int32)
    mask = jnp.ones((2, 9), bool).at[0, :3].set(False)
    full = model(tokens, kv_mask=mask)
    pos = default_positions(mask)
    cache = model.init_cache(2, 12)
    kv = jnp.zeros((2, 12), bool).at[:, :6].set(mask[:, :6])
    h, cache = model.forward_hidden(tokens[:, :6], pos[:, :6], kv, cache, 0)
    steps = [model.project(h)]
    for t in range(6, 9):
        kv = kv.at[:, t].set(mask[:, t])
        h, cache = model.forward_hidden(tokens[:, t : t + 1], pos[:, t : t + 1], kv, cache, t)
        steps.append(model.project_rows(h[:, 0])[:, None])  # the sampler's decode projection
    inc = jnp.concatenate(steps, axis=1)
    np.testing.assert_allclose(
        np.asarray(inc)[np.asarray(mask)], np.asarray(full)[np.asarray(mask)], atol=1e-5
    )


def test_cache_bytes_matches_allocated_cache():
    cfg = ModelConfig(vocab_size=50, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8)
    expected = cache_bytes(cfg, 3, 20, jnp.bfloat16)
    assert expected == 2 * 2 * 3 * 20 * 2 * 8 * 2  # k+v, layers, rows, slots, kv heads, hd, bytes
    for stacked in (True, False):
        cache = init_cache(cfg, 3, 20, jnp.bfloat16, stacked=stacked)
        assert sum(x.nbytes for x in jax.tree.leaves(cache)) == expected


def test_sharded_model_matches_single_device(tmp_path):
    torch_model("llama_untied", str(tmp_path))
    single = from_pretrained(str(tmp_path))
    mesh = shd.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    sharded = from_pretrained(str(tmp_path), mesh=mesh)
    q = sharded.layers.attn.q_proj[...]  # [layers, embed, heads, head_dim]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 8, 2, 8)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(single.layers.attn.q_proj[...]))
    tokens, mask = padded_batch(single.cfg.vocab_size)
    tokens, mask = np.concatenate([tokens] * 4)[:8], np.concatenate([mask] * 4)[:8]
    graphdef, params = nnx.split(sharded)

    @jax.jit
    def fwd(params, tokens, mask):
        return nnx.merge(graphdef, params)(tokens, kv_mask=mask)

    batch = shd.batch_sharding(mesh, 2)
    out = fwd(params, jax.device_put(tokens, batch), jax.device_put(mask, batch))
    ref = single(jnp.asarray(tokens), kv_mask=jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        from_pretrained(str(tmp_path / "nope"))
    torch_model("llama_untied", str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=48)))
    with pytest.raises(ValueError, match=r"mlp\.gate_proj\.weight has shape \(64, 32\)"):
        from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, tie_word_embeddings=False)))
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        from_pretrained(str(tmp_path))


def test_mesh_errors():
    with pytest.raises(ValueError, match="multiply to 6"):
        shd.make_mesh({"data": 3, "fsdp": 2})
    assert shd.make_mesh({"data": 2, "fsdp": -1}).shape["fsdp"] == 4


# ----------------------------------------------------------------------------- layers, remat, cache


def small_cfg(**kw) -> ModelConfig:
    base = dict(
        model_type="qwen3",
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        qk_norm=True,
    )
    return ModelConfig(**{**base, **kw})


def with_config(model: Transformer, **kw) -> Transformer:
    """The same weights under a config with some fields changed (static, in the graphdef)."""
    graphdef, state = nnx.split(model)
    other = nnx.eval_shape(lambda: Transformer(model.cfg.replace(**kw), rngs=nnx.Rngs(0)))
    return nnx.merge(nnx.split(other)[0], state)


def _loss_and_grads(model, tokens, mask):
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def f(params):
        logits = nnx.merge(graphdef, params)(tokens, kv_mask=mask)
        return jnp.sum(jnp.where(mask[..., None], jax.nn.log_softmax(logits), 0.0) ** 2)

    return jax.value_and_grad(f)(params)


def _assert_grads_close(want, got, msg: str = "") -> None:
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        # float32 rounding of sums in another order: relative to the array's scale (the
        # embedding gradient mixes entries of ~20 and ~0.1)
        scale = float(np.max(np.abs(np.asarray(a))))
        np.testing.assert_allclose(
            np.asarray(b), np.asarray(a), rtol=2e-5, atol=2e-6 * max(scale, 1.0), err_msg=msg
        )


def test_scan_unrolled_remat_and_attention_variants_agree():
    """Loss and gradients of the full model: scanned vs unrolled layers, every remat policy,
    dense vs blockwise attention (equal within float32 rounding)."""
    model = Transformer(small_cfg(), rngs=nnx.Rngs(3))
    tokens, mask = padded_batch(50)
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    ref_loss, ref_grads = _loss_and_grads(model, tokens, mask)
    variants = [
        dict(scan_layers=False, remat_policy="none"),
        dict(scan_layers=True, remat_policy="full"),
        dict(scan_layers=False, remat_policy="full"),
        dict(scan_layers=True, remat_policy="dots"),
        dict(scan_layers=True, remat_policy="dots_no_batch"),
        dict(attention_impl="chunked", attention_block_size=4),  # blockwise, custom VJP
    ]
    for kw in variants:
        loss, grads = _loss_and_grads(with_config(model, **kw), tokens, mask)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6, err_msg=str(kw))
        _assert_grads_close(ref_grads, grads, str(kw))


def test_cpu_matmul_path_gradients_equal_plain_einsums(monkeypatch):
    """The CPU path of the weight matmuls (2-D products, a custom VJP whose weight gradient
    contracts the rows of both operands) against the plain einsums and their autodiff."""
    model = Transformer(small_cfg(), rngs=nnx.Rngs(4))
    tokens, mask = padded_batch(50)
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    loss, grads = _loss_and_grads(model, tokens, mask)
    monkeypatch.setattr(layers, "CPU_MATMUL_VJP", False)  # read when the program is traced
    want_loss, want_grads = _loss_and_grads(model, tokens, mask)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    _assert_grads_close(want_grads, grads)


@pytest.mark.parametrize("name", sorted(CASES))
def test_chunked_attention_matches_transformers(tmp_path, name):
    """The blockwise attention (blocks of 4 tokens) on the padded batch, every family."""
    ref = torch_model(name, str(tmp_path))
    model = from_pretrained(str(tmp_path), attention_impl="chunked", attention_block_size=4)
    tokens, mask = padded_batch(model.cfg.vocab_size)
    ours = np.asarray(model(jnp.asarray(tokens), kv_mask=jnp.asarray(mask)))
    assert np.isfinite(ours).all()
    np.testing.assert_array_less(np.abs(ours - torch_logits(ref, tokens, mask))[mask].max(), 1e-4)


def _prefix_cache(model, tokens, mask, prefix, cache):
    """Cache and kv mask after writing ``tokens[:, :prefix]`` at slots 0..prefix-1."""
    pos = default_positions(mask)
    kv = (
        jnp.zeros(cache_mask_shape(cache, tokens.shape[0]), bool)
        .at[:, :prefix]
        .set(mask[:, :prefix])
    )
    h, cache = model.forward_hidden(tokens[:, :prefix], pos[:, :prefix], kv, cache, 0)
    return h, cache, kv, pos


def cache_mask_shape(cache, batch):
    from meljax.models.kv_cache import cache_len

    return (batch, cache_len(cache))


@pytest.mark.parametrize("stacked,scan", [(True, True), (True, False), (False, True)])
def test_per_row_cache_index_and_kv_len(stacked, scan):
    """Rows at different fill levels write at their own slot (``cache_index`` [B]) and attend
    only to the first ``kv_len`` slots; logits equal a full forward of each row's sequence.
    Stacked cache with scanned or unrolled layers, and the split cache."""
    cfg = small_cfg(tie_word_embeddings=True, scan_layers=scan)
    model = Transformer(cfg, rngs=nnx.Rngs(4))
    rng = np.random.default_rng(5)
    b, s = 3, 16
    lengths = np.array([4, 7, 2])  # tokens already in each row's cache
    seqs = rng.integers(0, 50, (b, 10)).astype(np.int32)
    cache = model.init_cache(b, s, stacked=stacked)
    kv = np.zeros((b, s), bool)
    # fill each row's prefix with one call per row length (padding beyond it is masked)
    prefix_tokens = np.zeros((b, 8), np.int32)
    prefix_mask = np.zeros((b, 8), bool)
    for r, n in enumerate(lengths):
        prefix_tokens[r, :n] = seqs[r, :n]
        prefix_mask[r, :n] = True
    kv[:, :8] = prefix_mask
    pos = default_positions(jnp.asarray(prefix_mask))
    _, cache = model.forward_hidden(
        jnp.asarray(prefix_tokens), pos, jnp.asarray(kv), cache, 0, kv_len=8
    )
    # two decode steps, each row at its own slot; attend to the first 10 slots only
    step_logits = []
    index = jnp.asarray(lengths, jnp.int32)
    for j in range(2):
        tok = jnp.asarray(seqs[np.arange(b), lengths + j][:, None])
        kv[np.arange(b), lengths + j] = True
        h, cache = model.forward_hidden(
            tok, index[:, None], jnp.asarray(kv), cache, index, kv_len=10
        )
        step_logits.append(np.asarray(model.project_rows(h[:, 0])))
        index = index + 1
    for r, n in enumerate(lengths):
        full = np.asarray(model(jnp.asarray(seqs[r : r + 1, : n + 2])))[0]
        np.testing.assert_allclose(step_logits[0][r], full[n], atol=1e-5)
        np.testing.assert_allclose(step_logits[1][r], full[n + 1], atol=1e-5)


@pytest.mark.parametrize(
    "layout,stacked,scan",
    [("heads", False, True), ("hd_minor", True, True), ("hd_minor", True, False)],
)
def test_decode_segment_equals_per_step_cache_writes(layout, stacked, scan):
    """Three decode steps of rows at different fill levels through a segment buffer (the
    cache read-only, the buffer merged after) give the logits of per-step cache writes, and
    the merged cache holds the same keys and values; in the CPU layout (split cache and
    weights, as the engine decodes on CPU) and the TPU one (stacked, scanned or not)."""
    from meljax.models import kv_cache

    with kv_cache.use_layout(layout):
        cfg = small_cfg(scan_layers=scan)
        model = Transformer(cfg, rngs=nnx.Rngs(6))
        weights = None if stacked else model.split_layers()
        rng = np.random.default_rng(7)
        b, s, steps = 3, 16, 3
        lengths = np.array([4, 7, 2])
        seqs = jnp.asarray(rng.integers(0, 50, (b, 12)), jnp.int32)
        prompt_mask = jnp.asarray(np.arange(8)[None] < lengths[:, None])
        cache = model.init_cache(b, s, stacked=stacked)
        _, cache = model.forward_hidden(
            seqs[:, :8],
            default_positions(prompt_mask),
            jnp.pad(prompt_mask, ((0, 0), (0, 8))),
            cache,
            0,
            layers=weights,
        )
        start = jnp.asarray(lengths, jnp.int32)
        tokens = [seqs[jnp.arange(b), start + j][:, None] for j in range(steps)]
        # reference: each step writes its slot into the cache
        ref, written = [], cache
        for j in range(steps):
            pos = start + j
            kv = jnp.arange(s)[None] <= pos[:, None]
            h, written = model.forward_hidden(
                tokens[j], pos[:, None], kv, written, pos, kv_len=s, layers=weights
            )
            ref.append(np.asarray(model.project_rows(h[:, 0])))
        # segment: a 4-column buffer (one column more than the steps: its garbage is merged
        # past each row's last slot), the cache masked from each row's start on
        segment = init_cache(cfg, b, 4, stacked=stacked)
        kv = jnp.arange(s)[None] < start[:, None]
        for j in range(steps):
            pos = start + j
            h, segment = model.forward_hidden(
                tokens[j],
                pos[:, None],
                kv,
                cache,
                pos,
                kv_len=s,
                layers=weights,
                segment=segment,
                segment_step=jnp.int32(j),
            )
            np.testing.assert_allclose(np.asarray(model.project_rows(h[:, 0])), ref[j], atol=1e-5)
        merged = kv_cache.merge_segment(cache, segment, start)
        for name in ("k", "v"):
            layers_got = [merged] if stacked else list(merged)
            layers_want = [written] if stacked else list(written)
            for got, want in zip(layers_got, layers_want, strict=True):
                got = np.asarray(kv_cache.from_storage(got[name], name))  # [.., B, S, K, hd]
                want = np.asarray(kv_cache.from_storage(want[name], name))
                for r, n in enumerate(lengths):
                    np.testing.assert_allclose(
                        got[..., r, : n + steps, :, :], want[..., r, : n + steps, :, :], atol=1e-6
                    )


@pytest.mark.parametrize("layout", ["heads", "hd_minor"])
def test_merge_segment_drops_columns_past_the_end(layout):
    """Rows starting 2, 6 and 8 slots into an 8-slot cache merge a 4-column segment: slots
    2-5, slots 6-7 (the rest dropped, the slots before 6 kept), nothing (hand values)."""
    from meljax.models import kv_cache

    with kv_cache.use_layout(layout):
        cfg = small_cfg(num_layers=2)
        rng = np.random.default_rng(0)
        for stacked in (True, False):
            cache = jax.tree.map(
                lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype),
                init_cache(cfg, 3, 8, stacked=stacked),
            )
            segment = jax.tree.map(
                lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype),
                init_cache(cfg, 3, 4, stacked=stacked),
            )
            merged = kv_cache.merge_segment(cache, segment, jnp.asarray([2, 6, 8], jnp.int32))
            per_layer = [[c] if stacked else list(c) for c in (merged, cache, segment)]
            for got, old, seg in zip(*per_layer, strict=True):
                for name in ("k", "v"):
                    g, o, sg = (
                        np.asarray(kv_cache.from_storage(x[name], name)) for x in (got, old, seg)
                    )
                    want = o.copy()  # [.., B, S, K, hd]
                    want[..., 0, 2:6, :, :] = sg[..., 0, :, :, :]
                    want[..., 1, 6:8, :, :] = sg[..., 1, :2, :, :]
                    np.testing.assert_array_equal(g, want)


def test_cache_layouts_are_validated():
    from meljax.models import kv_cache

    with pytest.raises(ValueError, match="KV cache layout 'tokens'"), kv_cache.use_layout("tokens"):
        pass


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_chunked_prefill_matches_one_shot(impl):
    """A left-padded prompt written 5 tokens at a time equals the one-call prefill, and the
    next decode step after either gives the same logits."""
    model = Transformer(small_cfg(attention_impl=impl, attention_block_size=4), rngs=nnx.Rngs(6))
    tokens = jnp.asarray(np.random.default_rng(7).integers(0, 50, (2, 13)), jnp.int32)
    mask = jnp.ones((2, 13), bool).at[1, :4].set(False)
    pos = default_positions(mask)
    kv = jnp.zeros((2, 20), bool).at[:, :13].set(mask).at[:, 13].set(True)
    outs = []
    for chunk in (None, 5):
        cache = model.init_cache(2, 20)
        h, cache = model.prefill(tokens, pos, kv, cache, chunk)
        nxt = jnp.asarray([[3], [9]], jnp.int32)
        h2, _ = model.forward_hidden(nxt, pos[:, -1:] + 1, kv, cache, 13)
        outs.append((np.asarray(h), np.asarray(h2)))
    np.testing.assert_allclose(
        outs[1][0][np.asarray(mask)], outs[0][0][np.asarray(mask)], atol=1e-5
    )
    np.testing.assert_allclose(outs[1][1], outs[0][1], atol=1e-5)
    full = model(
        jnp.concatenate([tokens, jnp.asarray([[3], [9]], jnp.int32)], axis=1),
        kv_mask=jnp.concatenate([mask, jnp.ones((2, 1), bool)], axis=1),
    )
    np.testing.assert_allclose(
        np.asarray(model.project(outs[1][1]))[:, 0], np.asarray(full)[:, -1], atol=1e-5
    )


def test_stacked_weight_layout_and_hf_round_trip(tmp_path):
    """Layer ``i`` of every stacked parameter is HF's ``model.layers.{i}`` tensor."""
    ref = torch_model("qwen2", str(tmp_path))
    model = from_pretrained(str(tmp_path))
    n = model.cfg.num_layers
    q = np.asarray(model.layers.attn.q_proj[...])
    assert q.shape == (n, 32, 4, 8)
    for i in range(n):
        hf_q = ref.model.layers[i].self_attn.q_proj.weight.detach().numpy()  # [h*hd, d]
        np.testing.assert_array_equal(q[i], hf_q.T.reshape(32, 4, 8))
        hf_b = ref.model.layers[i].self_attn.k_proj.bias.detach().numpy()
        np.testing.assert_array_equal(
            np.asarray(model.layers.attn.k_bias[...])[i], hf_b.reshape(2, 8)
        )
