"""Text on top of token ids: tokenizer and chat template, incremental detokenization, stop strings.

The engine never sees text. For each request a `TextStream` turns its growing token list into
safe text deltas: no broken UTF-8 (a partial multi-byte character is held back until complete),
and nothing that might be the start of a stop string is emitted until that is ruled out.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from quantserve.config import ConfigError

PREFIX_TOKENS = 5   # prompt tokens decoded ahead of the output so word boundaries come out right

BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "base": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
}
BUILTIN_TEMPLATES["internlm2"] = BUILTIN_TEMPLATES["chatml"]
BUILTIN_TEMPLATES["internlm"] = (       # InternLM v1 chat (internlm-chat-7b)
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|System|>:{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}<|User|>:{{ m['content'] }}<eoh>\n"
    "{% else %}<|Bot|>:{{ m['content'] }}<eoa>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|Bot|>:{% endif %}")
BUILTIN_TEMPLATES["llama2"] = (
    "{% if messages[0]['role'] == 'system' %}{% set system = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ system if loop.first }}"
    "{{ m['content'] }} [/INST]{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}")
BUILTIN_TEMPLATES["llama3"] = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
# LMDeploy's --model-name (`chat --model-name internlm-chat-7b`): a name's prefix picks a template
MODEL_NAME_TEMPLATES = (("internlm2", "internlm2"), ("internlm", "internlm"), ("qwen", "chatml"),
                        ("llama-3", "llama3"), ("llama3", "llama3"), ("llama-2", "llama2"), ("llama2", "llama2"),
                        ("chatml", "chatml"), ("base", "base"))
# the files a tokenizer usually comes in (fast, sentencepiece, BPE): named when none is there
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def template_for_model_name(name: str | None) -> str | None:
    """The name of the built-in template LMDeploy's model name (internlm-chat-7b, qwen-7b, llama2,
    …) stands for; None for a name it does not know (the model's own template then applies)."""
    if not name:
        return None
    key = name.lower().rsplit("/", 1)[-1]
    return next((t for prefix, t in MODEL_NAME_TEMPLATES if key.startswith(prefix)), None)


def load_chat_template(spec: str | None) -> str | None:
    """--chat-template: a built-in name, a Jinja file, or a JSON file with a `chat_template` key."""
    if spec is None:
        return None
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--chat-template {spec!r} is neither a built-in template "
                          f"({', '.join(BUILTIN_TEMPLATES)}) nor a file")
    text = path.read_text()
    if path.suffix == ".json":
        template = json.loads(text).get("chat_template")
        if not template:
            raise ConfigError(f"--chat-template {spec}: the JSON file has no 'chat_template' key")
        return template
    return text


def load_hf_tokenizer(model_dir: str | Path):
    """transformers' tokenizer of a local model directory; ModelLoadError (one line, naming the
    directory) when it has none or it cannot be built."""
    from transformers import AutoTokenizer

    from quantserve.models.loader import ModelLoadError, one_line

    path = Path(model_dir)
    try:
        # LMDeploy loads tokenizers with remote code too (InternLM2 ships its own); files are local
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True)
    except Exception as e:  # transformers reports a broken tokenizer as many types, over several lines
        if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise ModelLoadError(f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})") from None
        raise ModelLoadError(f"cannot load the tokenizer in {path}: {type(e).__name__}: {one_line(e)}") from None


class Tokenizer:
    """transformers' tokenizer plus the model's EOS ids and chat template."""

    def __init__(self, model_dir: str | Path, chat_template: str | None = None):
        self.hf = load_hf_tokenizer(model_dir)
        self.chat_template = chat_template or self.hf.chat_template or BUILTIN_TEMPLATES["base"]
        self.eos_token_ids = self._eos_ids(Path(model_dir))

    def _eos_ids(self, model_dir: Path) -> list[int]:
        from quantserve.models.loader import read_json

        ids = set()
        gen = model_dir / "generation_config.json"
        if gen.is_file():
            eos = read_json(gen).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.hf.eos_token_id is not None:
            ids.add(self.hf.eos_token_id)
        return sorted(ids)

    def encode_prompt(self, prompt: str | list[dict], do_preprocess: bool = True) -> list[int]:
        """A string is one user message (templated when do_preprocess); a list is OpenAI messages."""
        if isinstance(prompt, str) and not do_preprocess:
            return self.hf.encode(prompt, add_special_tokens=True)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = self.hf.apply_chat_template(messages, chat_template=self.chat_template,
                                           add_generation_prompt=True, tokenize=False)
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (part of a UTF-8 character, for byte tokens): what
        OpenAI's logprobs `bytes` field carries so clients can rebuild multi-byte text."""
        piece = self.hf.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if token_id in self.hf.all_special_ids or piece in self.hf.get_added_vocab():
            return piece.encode()
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):     # sentencepiece byte fallback
            return bytes([int(piece[3:5], 16)])
        if self._byte_level:
            table = _unicode_to_byte()
            return bytes(table[c] for c in piece if c in table)
        return piece.replace("\u2581", " ").encode()

    @property
    def _byte_level(self) -> bool:
        if not hasattr(self, "_is_byte_level"):
            backend = getattr(self.hf, "backend_tokenizer", None)
            decoder = json.loads(backend.to_str()).get("decoder") if backend is not None else None
            self._is_byte_level = _mentions_byte_level(decoder)
        return self._is_byte_level


def _mentions_byte_level(decoder) -> bool:
    if not isinstance(decoder, dict):
        return False
    return decoder.get("type") == "ByteLevel" or any(_mentions_byte_level(d) for d in decoder.get("decoders") or [])


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Byte-level BPE writes byte b as a printable character: itself when printable, otherwise
    chr(256 + n) for the n-th unprintable byte. This is the inverse map."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class TextStream:
    """One request's output text, built incrementally from its token ids."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop_words: list[str] | None,
                 skip_special_tokens: bool = True, hidden_ids: tuple[int, ...] = ()):
        self.tokenizer = tokenizer
        self.hidden = frozenset(hidden_ids)    # EOS / stop token ids: they end the text, never appear in it
        self.skip_special = skip_special_tokens
        self.stop_words = [s for s in (stop_words or []) if s]
        self.holdback = max((len(s) for s in self.stop_words), default=1) - 1
        tail = prompt_ids[-PREFIX_TOKENS:]
        self.ids = list(tail)
        self.prefix_offset = 0
        self.read_offset = len(tail)
        self.text = ""        # all decoded output text (stop string cut off once found)
        self.emitted = 0      # characters of self.text handed out so far
        self.stopped = False
        self.stop_word: str | None = None     # the stop string that ended the text

    def add(self, new_ids: list[int], final: bool = False) -> str:
        """Feed new tokens; return the text that is now safe to show."""
        for token in new_ids:
            if self.stopped:
                break
            if token in self.hidden:
                continue
            self.ids.append(token)
            before = len(self.text)
            self.text += self._decode_step()
            self._check_stop(max(0, before - self.holdback))
        if final and not self.stopped:
            before = len(self.text)
            self.text += self._decode_step(flush=True)
            self._check_stop(max(0, before - self.holdback))
        end = len(self.text) if (final or self.stopped) else max(self.emitted, len(self.text) - self.holdback)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta

    def _decode_step(self, flush: bool = False) -> str:
        """Text added by the tokens since read_offset; at the end (flush) whatever bytes remain."""
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special)
        full = decode(self.ids[self.prefix_offset:], self.skip_special)
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not flush):
            return ""       # an incomplete character: wait for the next token
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]

    def _check_stop(self, search_from: int) -> None:
        """A stop string can only complete inside the new text plus the held-back tail."""
        if not self.stop_words:
            return
        hits = [(i, s) for s in self.stop_words if (i := self.text.find(s, search_from)) >= 0]
        if hits:
            end, self.stop_word = min(hits, key=lambda hit: hit[0])
            self.text = self.text[:end]
            self.stopped = True
