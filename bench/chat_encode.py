"""Chat encoding with assistant masks: qwen3lab `encode_chat` vs transformers `apply_chat_template`, same CPU.

python bench/chat_encode.py [--n 1000]
"""

import argparse
import tempfile
import time

import transformers
from common import machine, synthetic_conversations

import qwen3lab
from qwen3lab.text.chat import qwen3_template


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args()
    convs = synthetic_conversations(args.n)
    tok = qwen3lab.load_tokenizer()
    with tempfile.TemporaryDirectory() as folder:
        tok.save(folder)
        hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    template = qwen3_template()

    def ours():
        return [tok.encode_chat(c) for c in convs]

    def ref():
        return [
            hf_tok.apply_chat_template(
                c, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            for c in convs
        ]

    # warm up both (template compilation), check they agree, then time one pass each
    a, b = ours(), ref()
    same = all(
        x.input_ids == y["input_ids"] and x.assistant_mask == y["assistant_masks"] for x, y in zip(a, b, strict=True)
    )
    t0 = time.perf_counter()
    ref()
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours()
    t_ours = time.perf_counter() - t0
    tokens = sum(len(x.input_ids) for x in a)
    print(f"# {args.n} synthetic multi-turn conversations ({tokens} tokens) with assistant masks; {machine()}")
    print(f"identical ids and masks: {same}")
    print(f"transformers {args.n / t_ref:10.1f} conversations/s")
    print(f"qwen3lab     {args.n / t_ours:10.1f} conversations/s")
    print(f"ratio qwen3lab / transformers: {t_ref / t_ours:.2f}x")


if __name__ == "__main__":
    main()
