"""Shared fixtures: the bundled SmolLM2 (converted once), its HF twin, and reference outputs."""
from __future__ import annotations

import pytest
import torch

from engine.models.loader import bundled_model_dir

# Natural text from which prompts of any length are cut (written for these tests).
PASSAGE = (
    "The old lighthouse stood at the edge of the cliff, its white paint peeling after decades of salt "
    "and wind. Every evening the keeper climbed the spiral stairs, counted the one hundred and twelve "
    "steps, and lit the great lamp that warned ships away from the rocks below. Nobody in the village "
    "remembered a time before the lighthouse, and few of them thought about it at all, except on the "
    "nights when fog rolled in from the sea and the horn sounded every thirty seconds until dawn. "
    "Children would lie awake counting the blasts, and fishermen would nod to each other in the morning "
    "as if the keeper had done them a personal favour. In spring the council voted to replace the lamp "
    "with an automatic beacon powered by solar panels. The keeper read the letter twice, folded it "
    "carefully, and put it in the drawer with his father's logbooks. He had six months left. He decided "
    "to spend them writing down everything he knew: the way the currents shifted after a storm, which "
    "captains always sailed too close, the names of the birds that nested under the gallery, and the "
    "trick of oiling the clockwork so that it never froze in January. Scientists later said that the "
    "ocean's temperature had risen steadily over the century, changing the fish that swam near the "
    "coast. Cod became rare, while squid and anchovies appeared in numbers nobody had seen before. "
    "Markets adapted, recipes changed, and the annual festival, once devoted to herring, was renamed "
    "the Festival of the Tides. Meanwhile, in the capital, engineers debated how best to protect the "
    "harbour from rising water. One plan proposed a sea wall four metres high; another suggested "
    "restoring the salt marshes that had once absorbed the force of winter storms. The debate went on "
    "for years, filling newspapers with letters, maps and angry cartoons. The keeper's notebooks, "
    "discovered in the drawer long after his death, turned out to contain the most accurate record of "
    "local tides ever made, and they settled the argument in favour of the marshes. "
)

PROMPT_LENGTHS = [1, 2, 5, 11, 17, 32, 64, 100, 150, 220, 310, 400]
MAX_NEW_TOKENS = 16


@pytest.fixture(scope="session")
def smollm2_dir():
    return bundled_model_dir()


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def reference_prompts(smollm2_tokenizer):
    """Token-id prompts of 1..400 tokens: windows of the passage and a chat prompt."""
    ids = smollm2_tokenizer.encode(PASSAGE * 2)
    prompts = [ids[i * 7:i * 7 + n] for i, n in enumerate(PROMPT_LENGTHS)]
    chat = smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=True)
    chat = chat["input_ids"] if not isinstance(chat, list) else chat
    return prompts + [list(chat)]


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy generate() for one prompt alone, no padding."""
    with torch.no_grad():
        ids = torch.tensor([prompt], device=model.device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=model.generation_config.eos_token_id)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="session")
def hf_reference(hf_smollm2, reference_prompts):
    return [hf_greedy(hf_smollm2, p, MAX_NEW_TOKENS) for p in reference_prompts]


def decode_reference(q, kv, tables, lens, scale):
    """The eager decode attention (engine/layers/attention.py `decode_reference`) in float64, masked to each
    sequence's context length: what a paged-decode kernel is checked against."""
    from engine.layers.attention import decode_reference

    keys = torch.arange(tables.shape[1] * kv.shape[2], device=q.device)  # kv [2, blocks, block_size, ...]
    mask = (keys[None, :] < lens[:, None])[:, None, None, :]
    return decode_reference(q.double(), kv.double(), tables, mask, scale)


def random_decode_batch(batch, heads, kv_heads, head_dim, block_size, dtype, device, max_len=300):
    """A decode step's inputs for a paged-attention kernel: q [batch, heads, D], a KV pool, block
    tables of distinct random blocks, context lengths in 1..max_len - 1."""
    num_blocks = batch * (max_len // block_size + 1) + 3
    kv = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, device=device).to(dtype)
    lens = torch.randint(1, max_len, (batch,), device=device, dtype=torch.int32)
    width = int((lens.max().item() + block_size - 1) // block_size)
    tables = torch.randperm(num_blocks, device=device)[:batch * width].view(batch, width)
    q = torch.randn(batch, heads, head_dim, device=device).to(dtype)
    return q, kv, tables, lens
