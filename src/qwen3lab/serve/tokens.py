"""The tokenizer over HTTP, as vLLM serves it: lm-eval's `local-completions` finds these routes and takes the
tokenizer from the server."""

from __future__ import annotations

from fastapi import APIRouter, Request

from .protocol import APIError, DetokenizeBody, TokenizeBody

router = APIRouter()


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    s = request.app.state
    return {
        "eos_token": s.tok.eos_token,
        "bos_token": None,
        "pad_token": s.tok.pad_token,
        "chat_template": s.tok.chat_template,
        "model_max_length": s.max_context,
    }


@router.post("/tokenize")
async def tokenize(body: TokenizeBody, request: Request):
    ids = request.app.state.tok.encode(body.prompt)
    return {"tokens": ids, "count": len(ids), "max_model_len": request.app.state.max_context}


@router.post("/detokenize")
async def detokenize(body: DetokenizeBody, request: Request):
    tok = request.app.state.tok
    if body.tokens and not 0 <= min(body.tokens) <= max(body.tokens) < tok.vocab_size:
        raise APIError(f"tokens: token ids must lie in [0, {tok.vocab_size})", "tokens")
    return {"prompt": tok.decode(body.tokens)}
