"""The tokenizer over HTTP, as vLLM serves it: lm-eval's `local-completions` finds these routes and takes the
tokenizer from the server."""

from __future__ import annotations

from fastapi import APIRouter, Request

from .protocol import DetokenizeBody, TokenizeBody

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
    return {"prompt": request.app.state.tok.decode(body.tokens)}
