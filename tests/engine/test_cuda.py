"""CUDA paths, skipped without a GPU: the Triton paged-decode kernel against the reference
attention, and the engine (kernel, CUDA graphs; two ranks over NCCL where there are two GPUs) against
transformers generate() on the same GPU."""
import os

import pytest
import torch

from engine import LLM, SamplingParams
from tests.conftest import decode_reference, hf_greedy, random_decode_batch
from tests.engine.test_models import TINY

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def tokenizer(request):
    from transformers import AutoTokenizer

    # On a GPU machine without the bundled model, any directory holding SmolLM2's tokenizer files.
    path = os.environ.get("KVSERVE_TEST_TOKENIZER") or request.getfixturevalue("smollm2_dir")
    return AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(8, 2, 64, 16), (9, 3, 64, 16), (32, 8, 128, 16),
                                                                  (4, 4, 32, 16), (16, 1, 64, 32)])
def test_triton_decode_matches_reference(dtype, tol, heads, kv_heads, head_dim, block_size):
    from engine.kernels.paged_decode import paged_decode

    for trial in range(3):  # fresh inputs each time
        q, kv, tables, lens = random_decode_batch(7, heads, kv_heads, head_dim, block_size, dtype, "cuda")
        ref = decode_reference(q, kv, tables, lens, head_dim ** -0.5)
        out = paged_decode(q, kv, tables, lens, head_dim ** -0.5)
        assert torch.isfinite(out).all()
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < tol, (trial, err)


@pytest.mark.parametrize("mode", ["graphs", "eager-triton", "eager-torch"])
def test_engine_on_cuda_matches_hf(tmp_path, tokenizer, mode):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", **{**TINY, "num_hidden_layers": 3, "max_position_embeddings": 1024})
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    hf = hf.cuda()
    prompts = [[7], list(range(200, 205)), list(range(1000, 1017)), list(range(300, 360)), list(range(50, 180))]
    # 16 blocks of 16 cannot hold four of these sequences at full length: preemption happens
    llm = LLM(str(tmp_path), device="cuda", dtype="float32", num_kv_blocks=16, block_size=16, max_num_seqs=4,
              enforce_eager=mode != "graphs", attention_backend="torch" if mode == "eager-torch" else "auto")
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 40)
    runner = llm.engine.runner
    assert (runner.decode_backend == "triton") == (mode != "eager-torch")
    assert (runner.graphs is not None and runner.graphs.replays > 0) == (mode == "graphs")
    assert llm.engine.scheduler.num_preemptions > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_ranks_over_nccl_match_hf(tmp_path, tokenizer):
    """Tensor parallelism on CUDA: one rank a device, the model's all-reduces and the logits' gather
    over NCCL, rank 0's messages over gloo; greedy as transformers' on one device, under preemption."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", **{**TINY, "num_hidden_layers": 3, "max_position_embeddings": 1024,
                                           "attention_bias": True})
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    for name, p in hf.named_parameters():  # (a bias counted on both ranks must change the output)
        if name.endswith("bias"):
            p.data.normal_(0.0, 0.5)
    hf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    hf = hf.cuda()
    prompts = [[7], list(range(200, 205)), list(range(1000, 1017)), list(range(300, 360)), list(range(50, 180))]
    llm = LLM(str(tmp_path), device="cuda", dtype="float32", num_kv_blocks=16, block_size=16, max_num_seqs=4,
              tensor_parallel_size=2)
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
        assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.runner.model.layers[0].self_attn.num_heads == cfg.num_attention_heads // 2
    finally:
        llm.engine.close()
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 40)
