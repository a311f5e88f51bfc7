"""`POST /v1/completions`: OpenAI text completions (prompts as text or token ids, echo, logprobs)."""
from __future__ import annotations

from fastapi import APIRouter, Request

from server.context import Ctx
from server.errors import call
from server.prompting import prompt_ids, width
from server.protocol import CompletionRequest
from server.render import ChoiceRender, respond
from server.serving import Run, compile_grammar

router = APIRouter()


@router.post("/v1/completions")
async def completions(raw: Request, ctx: Ctx):
    body = await ctx.work.parse(raw, CompletionRequest)
    ctx.check_model(body.model)
    params = call(body.params)
    call(lambda: ctx.engine.check_priority(body.priority))
    texts = call(body.prompts)
    ctx.admission.check_size(len(texts), *width(params))
    await compile_grammar(ctx.engine, params)

    def prepare(tok):
        prompts = [prompt_ids(ctx, tok, p, params, body.add_special_tokens) for p in texts]
        if not body.echo:
            return prompts, None
        return prompts, [t if isinstance(t, str) else tok.decode(ids) for t, ids in zip(texts, prompts)]

    prompts, echo = await ctx.work.tokenize(prepare, sum(map(len, texts)))
    texts = ctx.token_names(body.return_tokens_as_token_ids)
    render = ChoiceRender(False, texts if body.logprobs is not None else None, prompts, echo, body.prompt_only,
                          prompt_texts=texts)
    return await respond(Run(ctx, raw, prompts, params, body.request_id, body.who, body.priority), "cmpl", render, body)
