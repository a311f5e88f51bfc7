"""Linear layers on a GGUF file's own blocks (engine/layers/gguf_linear.py, the C++ gguf_linear
kernel): parsing against the gguf package, the kernel against float64, and the swap in a model,
which must happen only where the blocks reproduce the float32 weight bit for bit."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from engine import platform
from engine.kernels import cpu
from engine.layers.gguf_linear import Blocks, GGUFLinear, read_gguf_blocks, use_gguf_linears
from engine.layers.parallel import TensorParallel
from engine.models.llama import LlamaForCausalLM
from engine.models.loader import bundled_gguf_path, iter_weights, load_hf_config, resolve_source

needs_kernel = pytest.mark.skipif(not platform.cpp_kernels_available(), reason="the C++ kernel cannot be built here")
KINDS = ["Q4_0", "Q4_1", "Q8_0"]


def _quantized(kind: str, n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """-> (the gguf package's blocks of a random [n, k] matrix, its own dequantisation of them)"""
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    raw = quants.quantize(w, GGMLQuantizationType[kind])
    return raw, quants.dequantize(raw, GGMLQuantizationType[kind])


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_dequantize_as_the_gguf_package_does(kind):
    raw, want = _quantized(kind, 40, 96)
    blocks = Blocks.from_gguf(kind, raw, 40, 96)
    assert torch.equal(blocks.dequantize(), torch.from_numpy(want))  # bit for bit
    assert torch.equal(blocks.rows(torch.tensor([3, 0])).dequantize(), torch.from_numpy(want[[3, 0]]))


def _reference(x: torch.Tensor, blocks: Blocks, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (x . W^T + bias in float64, the scale of its terms: |x| . |W|^T + |bias|)"""
    w = blocks.dequantize().double()
    b = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.double()
    return x.double() @ w.T + b, x.double().abs() @ w.abs().T + b.abs()


@needs_kernel
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 12, 13, 16, 25, 100])  # one tile of rows, several, uneven ones
@pytest.mark.parametrize("out_features,in_features,bias", [(96, 64, False), (70, 160, True)])  # 70: a partial group
def test_gguf_linear_matches_float64(kind, rows, out_features, in_features, bias):
    raw, _ = _quantized(kind, out_features, in_features, seed=rows)
    blocks = Blocks.from_gguf(kind, raw, out_features, in_features)
    b = torch.randn(out_features) if bias else None
    x = torch.randn(rows, in_features)
    got = GGUFLinear(blocks, b)(x)
    want, scale = _reference(x, blocks, b)
    assert got.shape == (rows, out_features) and got.dtype == torch.float32
    assert ((got.double() - want).abs() <= 1e-6 * scale).all()  # float32 sums, in some order


@needs_kernel
def test_gguf_linear_rejects_mismatched_inputs():
    raw, _ = _quantized("Q4_1", 64, 64)
    q, scales = Blocks.from_gguf("Q4_1", raw, 64, 64).pack()
    x = torch.randn(3, 64)
    with pytest.raises(RuntimeError, match="shapes disagree"):
        cpu.gguf_linear(torch.randn(3, 96), q, scales, 64, None)
    with pytest.raises(RuntimeError, match="shapes disagree"):
        cpu.gguf_linear(x, q, scales, 65, None)  # more outputs than the groups hold
    with pytest.raises(RuntimeError, match="float32"):
        cpu.gguf_linear(x.double(), q, scales, 64, None)
    with pytest.raises(RuntimeError, match="bad bias"):
        cpu.gguf_linear(x, q, scales, 64, torch.randn(63))


@needs_kernel
@pytest.mark.parametrize("march", list(cpu.ISAS))  # each tested where this CPU runs it: AVX-512 checks AVX2 too
def test_every_instruction_set_computes_what_the_engine_does(march):
    """The kernel built for AVX-512, AVX2 and plain x86-64 against the engine's build (-march=native),
    on every path (few rows, many rows in tiles, a partial group, 4- and 8-bit blocks): the FMA builds
    sum each output in one order, so they agree bit for bit; the plain build multiplies and adds apart,
    so it is held to the float64 bound."""
    if march not in cpu.runnable_isas():
        pytest.skip(f"this CPU cannot run {march}")
    check = cpu.GGUFCheck(march)
    assert check.vector_bits == {"x86-64-v4": 512, "x86-64-v3": 256, "x86-64": 128}[march]
    for kind in KINDS:
        raw, _ = _quantized(kind, 70, 160)
        blocks = Blocks.from_gguf(kind, raw, 70, 160)
        layer = GGUFLinear(blocks, torch.randn(70))
        for rows in (1, 2, 3, 4, 7, 8, 9, 13, 25, 64, 97, 257):
            x = torch.randn(rows, 160)
            got, engine = check.linear(x, layer.q, layer.scales, 70, layer.bias), layer(x)
            if march == "x86-64":
                want, scale = _reference(x, blocks, layer.bias)
                assert ((got.double() - want).abs() <= 1e-6 * scale).all()
            else:
                assert torch.equal(got, engine), (kind, rows)


@needs_kernel
def test_a_rows_result_does_not_depend_on_its_batch():
    """Few rows, many and a prefill's take different paths through the kernel (weights dequantised in
    registers, once per block for tiles of rows, or into a panel); each sums a row's products in the
    same order."""
    raw, _ = _quantized("Q4_1", 96, 128)
    layer = GGUFLinear(Blocks.from_gguf("Q4_1", raw, 96, 128), None)
    x = torch.randn(257, 128)
    alone = layer(x[:1])
    for rows in (2, 3, 5, 9, 13, 17, 64, 97, 257):
        assert torch.equal(layer(x[:rows])[:1], alone), rows


def test_scales_past_float16_keep_the_layer_float32():
    """The kernel reads scales as float16, as the file holds them; Q4_0's minimum -8 d outgrows float16
    for d past 8192, and such blocks must not be packed (use_gguf_linears then keeps float32)."""
    raw, _ = _quantized("Q4_0", 32, 64)
    blocks = Blocks.from_gguf("Q4_0", raw, 32, 64)
    blocks.pack()  # ordinary scales pack
    blocks.d[3, 1] = 16384.0
    blocks.m[3, 1] = -8 * 16384.0
    with pytest.raises(ValueError, match="float16"):
        blocks.pack()


def _float32_model(model_dir):
    src = resolve_source(str(model_dir))
    cfg = load_hf_config(src)
    model = LlamaForCausalLM(cfg, 64)
    model.load_weights(iter_weights(src))
    return model.eval().requires_grad_(False), cfg


@needs_kernel
def test_bundled_model_swaps_every_linear_and_computes_the_same(smollm2_dir):
    model, cfg = _float32_model(smollm2_dir)
    assert resolve_source(None).gguf_origin == bundled_gguf_path()  # the converted directory knows its GGUF
    x = torch.randn(5, cfg.hidden_size)
    layer = model.layers[7].self_attn.qkv_proj  # q and k rows re-ordered as transformers loads them
    want = layer(x)
    swapped = use_gguf_linears(model, bundled_gguf_path(), cfg)
    assert swapped == 4 * cfg.num_hidden_layers + 1  # qkv, o, gate_up, down in each layer, and lm_head
    assert isinstance(model.layers[7].self_attn.qkv_proj, GGUFLinear) and isinstance(model.lm_head, GGUFLinear)
    got = model.layers[7].self_attn.qkv_proj(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_only_a_model_the_fused_decode_computes_exactly_takes_it(smollm2_dir):
    """cpu.decode_layers runs plain Llama layers on GGUF-block linears and C++ element-wise pieces;
    a model short of that keeps its layers, and the op refuses a slot outside the pool."""
    model, cfg = _float32_model(smollm2_dir)
    model.use_ops("cpp")
    assert not model.use_fused_decode()  # float32 linears
    use_gguf_linears(model, bundled_gguf_path(), cfg)
    model.use_ops("eager")
    assert not model.use_fused_decode()  # the eager element-wise pieces
    model.use_ops("cpp")
    assert model.use_fused_decode() and len(model.fused_weights) == 14 * cfg.num_hidden_layers
    d = cfg.hidden_size // cfg.num_attention_heads
    pools = [torch.zeros(2, 4, 16, cfg.num_key_value_heads, d) for _ in model.layers]
    args = (torch.randn(1, cfg.hidden_size), torch.ones(1, d), torch.zeros(1, d))
    tables, lens = torch.tensor([[1]]), torch.tensor([1])
    with pytest.raises(RuntimeError, match="slot out of range"):
        cpu.decode_layers(*args, torch.tensor([64]), tables, lens, pools, model.fused_weights,
                          cfg.num_attention_heads, cfg.num_key_value_heads, d ** -0.5, cfg.rms_norm_eps)
    assert all(not p.any() for p in pools)
    out = cpu.decode_layers(*args, torch.tensor([16]), tables, lens, pools, model.fused_weights,
                            cfg.num_attention_heads, cfg.num_key_value_heads, d ** -0.5, cfg.rms_norm_eps)
    assert out.shape == (1, cfg.hidden_size) and pools[0][:, 1, 0].any()  # slot 16: block 1's first


def test_a_layer_its_blocks_do_not_reproduce_stays_float32(smollm2_dir):
    model, cfg = _float32_model(smollm2_dir)
    model.layers[3].mlp.down_proj.weight.data[5, 7] += 1e-3  # no longer what the file holds
    swapped = use_gguf_linears(model, bundled_gguf_path(), cfg)
    assert swapped == 4 * cfg.num_hidden_layers
    assert type(model.layers[3].mlp.down_proj) is torch.nn.Linear


def test_read_gguf_blocks_finds_the_bundled_layers(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSERVE_CACHE_DIR", str(tmp_path))  # no tensor table kept yet: gguf's reader finds them
    blocks = read_gguf_blocks(bundled_gguf_path())
    assert blocks["blk.0.attn_q.weight"].q.shape == (576, 576) and blocks["blk.0.attn_q.weight"].m is not None
    assert blocks["token_embd.weight"].q.shape == (49152, 576) and blocks["token_embd.weight"].m is None  # Q8_0
    # read again from the table kept in the cache: the same blocks, bit for bit
    assert len(list((tmp_path / "gguf-tables").glob("*.json"))) == 1
    again = read_gguf_blocks(bundled_gguf_path())
    assert again.keys() == blocks.keys()
    for name, b in blocks.items():
        c = again[name]
        assert torch.equal(b.q, c.q) and torch.equal(b.d, c.d) and (b.m is None) == (c.m is None)
        assert b.m is None or torch.equal(b.m, c.m)


@needs_kernel
def test_each_tensor_parallel_rank_multiplies_with_its_part_of_the_blocks(smollm2_dir):
    """SmolLM2 over 3 ranks (its 9 heads and 3 KV heads split by 3): every rank's qkv, o, gate_up,
    down and vocabulary slice of the LM head is cut from the GGUF blocks, bit for bit its float32 shard
    (the swap checks that), and computes the same."""
    src = resolve_source(str(smollm2_dir))
    cfg = load_hf_config(src)
    x, h = torch.randn(3, cfg.hidden_size), torch.randn(3, cfg.intermediate_size // 3)
    for rank in range(3):
        model = LlamaForCausalLM(cfg, 64, TensorParallel(rank, 3))
        model.load_weights(iter_weights(src))
        model.eval().requires_grad_(False)
        want = model.layers[2].mlp.down_proj(h), model.lm_head(x)  # [3, hidden] and [3, vocab / 3]
        assert use_gguf_linears(model, bundled_gguf_path(), cfg, model.shard_of) == 4 * cfg.num_hidden_layers + 1
        assert isinstance(model.layers[2].mlp.down_proj, GGUFLinear) and isinstance(model.lm_head, GGUFLinear)
        got = model.layers[2].mlp.down_proj(h), model.lm_head(x)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
