"""The offline Qwen3 tokenizer: pinned ids, round trips, added tokens, and the same encoding in transformers."""

import unicodedata

import pytest

import qwen3lab
from qwen3lab.text.tokenizer import FIRST_ADDED_ID, NOT_SPECIAL, SPECIAL

# transformers' Qwen2 tokenizer integration test (tests/models/qwen2/test_tokenization_qwen2.py), padding removed.
INTEGRATION = [
    (
        "Transformers (formerly known as pytorch-transformers and pytorch-pretrained-bert) provides "
        "general-purpose architectures (BERT, GPT-2, RoBERTa, XLM, DistilBert, XLNet...) for Natural "
        "Language Understanding (NLU) and Natural Language Generation (NLG) with over 32+ pretrained "
        "models in 100+ languages and deep interoperability between Jax, PyTorch and TensorFlow.",
        [
            8963,
            388,
            320,
            69514,
            3881,
            438,
            4510,
            27414,
            32852,
            388,
            323,
            4510,
            27414,
            21334,
            35722,
            1455,
            529,
            8,
            5707,
            4586,
            58238,
            77235,
            320,
            61437,
            11,
            479,
            2828,
            12,
            17,
            11,
            11830,
            61437,
            64,
            11,
            1599,
            10994,
            11,
            27604,
            321,
            33,
            529,
            11,
            29881,
            6954,
            32574,
            369,
            18448,
            11434,
            45451,
            320,
            45,
            23236,
            8,
            323,
            18448,
            11434,
            23470,
            320,
            30042,
            38,
            8,
            448,
            916,
            220,
            18,
            17,
            10,
            80669,
            4119,
            304,
            220,
            16,
            15,
            15,
            10,
            15459,
            323,
            5538,
            94130,
            2897,
            1948,
            619,
            706,
            11,
            5355,
            51,
            21584,
            323,
            94986,
            13,
        ],
    ),
    (
        "🤗 Transformers 提供了可以轻松地下载并且训练先进的预训练模型的 API 和工具。"
        "使用预训练模型可以减少计算消耗和碳排放，并且节省从头训练所需要的时间和资源。",
        [
            144834,
            80532,
            93685,
            83744,
            34187,
            73670,
            104261,
            29490,
            62189,
            103937,
            104034,
            102830,
            98841,
            104034,
            104949,
            9370,
            5333,
            58143,
            102011,
            1773,
            37029,
            98841,
            104034,
            104949,
            73670,
            101940,
            100768,
            104997,
            33108,
            100912,
            105054,
            90395,
            100136,
            106831,
            45181,
            64355,
            104034,
            113521,
            101975,
            33108,
            85329,
            1773,
        ],
    ),
    (
        '```python\ntokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen-tokenizer")\ntokenizer("世界，你好！")```',
        [
            73594,
            12669,
            198,
            85593,
            284,
            8979,
            37434,
            6387,
            10442,
            35722,
            445,
            48,
            16948,
            45274,
            16948,
            34841,
            3135,
            1138,
            85593,
            445,
            99489,
            3837,
            108386,
            6313,
            899,
            73594,
        ],
    ),
]

MULTILINGUAL = [
    "Hello world",
    " Hello world",
    "naïve café — déjà vu; I'm sure they'll've done it",
    "Ünïcödé NFD: e\u0301 \u03d2\u0301 \u017f\u0307",
    "日本語のテキストと中文混合, 한국어 문장, русский текст, العربية, हिन्दी",
    "emoji 🤗🚀👩‍👩‍👧 and digits 1234567890 3.14159",
    "code:\n\tdef f(x):\n\t\treturn x ** 2  # square\r\n\n\n   trailing   ",
    "<|im_start|>user\nhi<|im_end|>\n<think>\nok\n</think>",
]


def test_pinned_ids(tok):
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode(" Hello world") == [21927, 1879]
    for text, ids in INTEGRATION:
        assert tok.encode(text) == ids


def test_chat_token_ids(tok):
    assert tok.encode("<|im_start|>user\n") == [151644, 872, 198]
    assert tok.encode("<|im_start|>assistant\n") == [151644, 77091, 198]
    assert tok.encode("<|im_end|>\n") == [151645, 198]
    assert tok.encode("<think>\n\n</think>\n\n") == [151667, 271, 151668, 271]


def test_added_tokens(tok):
    assert tok.vocab_size == 151669
    for i, t in enumerate(SPECIAL + NOT_SPECIAL):
        assert tok.token_to_id(t) == FIRST_ADDED_ID + i
    decoder = tok.backend.get_added_tokens_decoder()
    assert all(decoder[FIRST_ADDED_ID + i].special for i in range(len(SPECIAL)))
    assert not any(decoder[FIRST_ADDED_ID + len(SPECIAL) + i].special for i in range(len(NOT_SPECIAL)))
    assert tok.eos_token_id == tok.pad_token_id == 151643


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_round_trip_is_nfc(tok, text):
    assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)


def test_digits_split_one_per_token(tok):
    assert tok.encode("2025") == [17, 15, 17, 20]


def test_exported_folder_encodes_identically_in_transformers(tok, hf_tok):
    for text in MULTILINGUAL + [t for t, _ in INTEGRATION]:
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
        assert hf_tok.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert hf_tok.eos_token_id == 151643 and hf_tok.pad_token_id == 151643 and hf_tok.bos_token is None


def test_folder_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    again = qwen3lab.load_tokenizer(tmp_path)
    assert again.chat_template == tok.chat_template
    assert again.encode(MULTILINGUAL[4]) == tok.encode(MULTILINGUAL[4])


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        qwen3lab.load_tokenizer(tmp_path)


def test_tampered_vocabulary_is_refused(monkeypatch, tmp_path):
    from qwen3lab.text import tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "QWEN_TIKTOKEN_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="is not the Qwen vocabulary"):
        tokenizer_module.offline_qwen3_backend()


def test_offline_build_from_scratch_matches_cache(tmp_path, monkeypatch, tok):
    monkeypatch.setenv("QWEN3LAB_CACHE", str(tmp_path))
    fresh = qwen3lab.load_tokenizer()
    assert list(tmp_path.glob("qwen3-tokenizer-*.json"))
    for text, ids in INTEGRATION:
        assert fresh.encode(text) == ids
