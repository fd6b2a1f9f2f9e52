"""The vision tower against transformers' torch Qwen2.5-VL vision tower, plus jit, sharding and dtype checks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P
from transformers import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from qponder_jax.model.config import VisionConfig, tiny_config
from qponder_jax.model.sharding import LOGICAL_RULES, create_sharded, make_mesh
from qponder_jax.model.vision import VisionTower
from qponder_jax.model.vision_layout import num_patches, sample_layout

TINY = tiny_config()
# window 56 px (2x2 merged units per window), three blocks, full attention in the first one
CUSTOM = dataclasses.replace(TINY.vision, window_size=56, depth=3, fullatt_block_indexes=(0,))


def make_tower(vcfg: VisionConfig, *, dtype=jnp.float32, remat=False, seed=0) -> VisionTower:
    return VisionTower(vcfg, dtype=dtype, param_dtype=jnp.float32, remat=remat, attn_impl="xla", rngs=nnx.Rngs(seed))


def torch_tower(vcfg: VisionConfig, seed: int = 0) -> Qwen2_5_VisionTransformerPretrainedModel:
    """transformers' vision tower for `vcfg`, with every weight (biases and norms too) drawn at random."""
    hf = Qwen2_5_VLConfig(**TINY.replace(vision=vcfg).to_hf_dict()).vision_config
    hf._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen2_5_VisionTransformerPretrainedModel(hf).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("ln_q.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:  # [out, in, ...]: scale so activations stay O(1) and attention is far from uniform
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) * 1.5 / fan_in**0.5)
    return model


def copy_torch_weights(tower: VisionTower, model: Qwen2_5_VisionTransformerPretrainedModel) -> None:
    """Copies every torch weight into the NNX tower (torch Linear [out, in] -> kernel [in, out])."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    used = set()

    def put(var, key, value=None):
        value = sd[key] if value is None else value
        assert var[...].shape == value.shape, (key, var[...].shape, value.shape)
        var[...] = jnp.asarray(value)
        used.add(key)

    def put_linear(lin, prefix):
        put(lin.kernel, f"{prefix}.weight", sd[f"{prefix}.weight"].T)
        if f"{prefix}.bias" in sd:
            put(lin.bias, f"{prefix}.bias")

    conv = sd["patch_embed.proj.weight"]  # [hidden, C, tp, p, p]; stride == kernel, so a matmul
    put(tower.patch_embed.proj.kernel, "patch_embed.proj.weight", conv.reshape(conv.shape[0], -1).T)
    for i, blk in enumerate(tower.blocks):
        put(blk.norm1.weight, f"blocks.{i}.norm1.weight")
        put(blk.norm2.weight, f"blocks.{i}.norm2.weight")
        put_linear(blk.attn.qkv, f"blocks.{i}.attn.qkv")
        put_linear(blk.attn.proj, f"blocks.{i}.attn.proj")
        for name in ("gate_proj", "up_proj", "down_proj"):
            put_linear(getattr(blk.mlp, name), f"blocks.{i}.mlp.{name}")
    put(tower.merger.ln_q.weight, "merger.ln_q.weight")
    put_linear(tower.merger.fc1, "merger.mlp.0")
    put_linear(tower.merger.fc2, "merger.mlp.2")
    assert used == set(sd), f"torch weights not copied: {sorted(set(sd) - used)}"


def make_batch(samples, padded: int, vcfg: VisionConfig, seed: int = 0):
    """Random patches for samples (each a list of (t, h, w) grids), padded with garbage rows to `padded`."""
    rng = np.random.default_rng(seed)
    arrays = {
        k: [] for k in ("pixel_values", "vision_pos_ids", "window_index", "window_segment_ids", "full_segment_ids")
    }
    real = []  # per sample: (real patch rows, grids, merged_rows)
    for grids in samples:
        lay = sample_layout(
            grids, padded, spatial_merge_size=vcfg.spatial_merge_size, window_size=vcfg.window_size,
            patch_size=vcfg.patch_size,
        )  # fmt: skip
        used = num_patches(grids)
        pixels = rng.normal(size=(padded, vcfg.patch_dim)).astype(np.float32)  # rows >= used are padding garbage
        arrays["pixel_values"].append(pixels)
        for k in ("vision_pos_ids", "window_index", "window_segment_ids", "full_segment_ids"):
            arrays[k].append(getattr(lay, k))
        real.append((pixels[:used], np.asarray(grids), lay.merged_rows))
    return tuple(np.stack(arrays[k]) for k in arrays), real


@nnx.jit
def forward(tower, *inputs):
    return tower(*inputs)


def torch_features(model, pixels, grids) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grids))
    return out.pooler_output.numpy()  # merged features, un-permuted (token order)


CASES = {
    "one_image_4x4": (TINY.vision, [[[1, 4, 4]]]),
    "one_image_10x14": (TINY.vision, [[[1, 10, 14]]]),
    "two_images_one_sample": (TINY.vision, [[[1, 16, 8], [1, 4, 22]]]),
    "batch_of_two_padded": (TINY.vision, [[[1, 10, 14]], [[1, 4, 4], [1, 6, 8]]]),
    "window56_fullatt0_depth3": (CUSTOM, [[[1, 10, 14], [2, 6, 6]], [[1, 12, 8]]]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_transformers(case):
    vcfg, samples = CASES[case]
    model = torch_tower(vcfg)
    tower = make_tower(vcfg)
    copy_torch_weights(tower, model)
    padded = max(num_patches(g) for g in samples) + 16  # at least 16 rows of padding in every sample
    inputs, real = make_batch(samples, padded, vcfg)
    out = np.asarray(forward(tower, *inputs))
    assert out.shape == (len(samples), padded // vcfg.merge_unit, vcfg.out_hidden_size)
    for b, (pixels, grids, merged_rows) in enumerate(real):
        ref = torch_features(model, pixels, grids)
        ours = out[b][np.concatenate(merged_rows)]
        diff = np.abs(ours - ref).max()
        print(f"{case} sample {b}: max abs diff {diff:.2e} (max |ref| {np.abs(ref).max():.2f})")
        assert np.abs(ref).max() > 0.1  # the comparison is not trivially small
        assert diff <= 1e-4


def test_padding_content_does_not_change_real_rows():
    vcfg = TINY.vision
    tower = make_tower(vcfg)
    inputs, real = make_batch([[[1, 6, 8]]], 96, vcfg, seed=1)
    other = list(inputs)
    other[0] = inputs[0].copy()
    other[0][:, 48:] = 100.0  # different padding rows
    rows = np.concatenate(real[0][2])
    a = np.asarray(forward(tower, *inputs))[0][rows]
    b = np.asarray(forward(tower, *other))[0][rows]
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_same_bucket_compiles_once():
    vcfg = TINY.vision
    tower = make_tower(vcfg)
    traces = []

    @nnx.jit
    def run(tower, *inputs):
        traces.append(1)
        return tower(*inputs)

    first, _ = make_batch([[[1, 10, 14]], [[1, 4, 4]]], 160, vcfg)
    second, _ = make_batch([[[1, 4, 4], [1, 8, 8]], [[1, 12, 12]]], 160, vcfg, seed=1)
    out1 = run(tower, *first)
    out2 = run(tower, *second)
    assert len(traces) == 1
    assert not np.allclose(np.asarray(out1), np.asarray(out2))


def test_params_named_by_logical_axes():
    tower = make_tower(CUSTOM)
    paths = set()
    for path, var in nnx.to_flat_state(nnx.state(tower, nnx.Param)):
        axes = var.get_metadata().get("axes")
        assert axes is not None and len(axes) == var[...].ndim, path
        assert all(a in LOGICAL_RULES for a in axes), (path, axes)
        paths.add("/".join(map(str, path)))
    for name in ("patch_embed/proj/kernel", "blocks/2/attn/qkv/kernel", "blocks/0/mlp/gate_proj/bias",
                 "merger/ln_q/weight", "merger/fc1/kernel", "merger/fc2/bias"):  # fmt: skip
        assert name in paths, name
    assert tower.blocks[2].attn.qkv.kernel[...].shape == (32, 96)


def test_sharded_matches_single_device():
    vcfg = TINY.vision
    mesh = make_mesh((2, 2, 2))
    sharded = create_sharded(lambda: make_tower(vcfg), mesh)
    assert sharded.blocks[0].mlp.gate_proj.kernel[...].sharding.spec == P("fsdp", "tensor")
    single = make_tower(vcfg, seed=1)
    nnx.update(single, jax.tree.map(np.asarray, nnx.state(sharded)))
    inputs, _ = make_batch([[[1, 10, 14]], [[1, 4, 4]], [[1, 8, 8], [1, 4, 6]], [[1, 6, 6]]], 144, vcfg)
    ref = np.asarray(forward(single, *inputs))
    with jax.set_mesh(mesh):
        out = forward(sharded, *inputs)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_remat_matches_and_differentiates():
    vcfg = TINY.vision
    inputs, _ = make_batch([[[1, 10, 14]]], 144, vcfg)
    plain, remat = make_tower(vcfg), make_tower(vcfg, remat=True)

    def loss(tower):
        return jnp.sum(tower(*inputs) ** 2)

    grads = [nnx.grad(loss)(t) for t in (plain, remat)]
    np.testing.assert_allclose(np.asarray(loss(remat)), np.asarray(loss(plain)), rtol=1e-6)
    for g_plain, g_remat in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(np.asarray(g_remat), np.asarray(g_plain), rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(grads[0]["blocks"][0]["attn"]["qkv"]["kernel"][...])).max() > 0


def test_bf16_compute_close_to_fp32():
    vcfg = TINY.vision
    model = torch_tower(vcfg)
    fp32, bf16 = make_tower(vcfg), make_tower(vcfg, dtype=jnp.bfloat16)
    copy_torch_weights(fp32, model)
    copy_torch_weights(bf16, model)
    inputs, real = make_batch([[[1, 10, 14]]], 144, vcfg)
    ref = np.asarray(forward(fp32, *inputs))
    out = forward(bf16, *inputs)
    assert out.dtype == jnp.bfloat16
    assert bf16.blocks[0].attn.qkv.kernel[...].dtype == jnp.float32
    rows = np.concatenate(real[0][2])
    err = np.abs(np.asarray(out.astype(jnp.float32))[0][rows] - ref[0][rows]).max() / np.abs(ref[0][rows]).max()
    print(f"bf16 vs fp32: max abs diff / max |fp32| = {err:.2e}")
    assert err < 5e-2
