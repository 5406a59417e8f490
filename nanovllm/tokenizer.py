"""Text <-> token ids, one interface over three tokenizer formats.

- HuggingFace `tokenizer.json` (byte-level BPE, sentencepiece-style BPE, ...)
  run by the `tokenizers` library through transformers, which also renders
  chat templates (Jinja) into the exact prompt text a chat model was trained on.
- GGUF files carry the same vocabulary, merges and template in their
  metadata; transformers rebuilds a tokenizer.json from them (slow: seconds),
  so we keep the result in the cache beside the dequantized weights.
- llama2.c's `tokenizer.bin`: a list of pieces with scores. Encoding starts
  from single characters (or raw bytes, `<0xE2>`, for characters not in the
  vocabulary) and repeatedly merges the adjacent pair whose concatenation is
  the highest-scoring piece, as sentencepiece BPE does.

Streaming text back needs care: a token may end in the middle of a UTF-8
character (a byte-level BPE splits "é" into two tokens), and decoding it alone
gives "\\ufffd". `IncrementalDetokenizer` decodes a short window of recent
tokens, emits only text that is complete, and holds a broken tail back until
the next token completes it.
"""
from __future__ import annotations

import heapq
import json
import re
import struct
from pathlib import Path
from typing import Any

from nanovllm.model.errors import ModelLoadError


class Tokenizer:
    """The interface; `Tokenizer.load` picks the implementation for a model path."""

    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: list[int]
    has_chat_template: bool

    @classmethod
    def load(cls, model: str | None, tokenizer: str | None = None) -> "Tokenizer":
        """The tokenizer of `model` (HF dir, .gguf, llama2.c .bin), or of `tokenizer` if given.

        For a llama2.c checkpoint the tokenizer is `tokenizer` or else the
        `tokenizer.bin` beside the checkpoint.
        """
        from nanovllm.model.loader import resolve_model

        path = Path(resolve_model(tokenizer if tokenizer is not None else model))
        if path.is_dir():
            return HFTokenizer.from_directory(path)
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            from nanovllm.model.gguf import gguf_tokenizer_dir
            return HFTokenizer.from_directory(gguf_tokenizer_dir(str(path)), source=path)
        if tokenizer is not None or path.name == "tokenizer.bin":
            return Llama2cTokenizer.from_file(path)
        beside = path.with_name("tokenizer.bin")
        if not beside.is_file():
            raise ModelLoadError(f"{path}: a llama2.c checkpoint needs its tokenizer.bin; none lies beside it, "
                                 "pass tokenizer=PATH")
        return Llama2cTokenizer.from_file(beside)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, with a BOS first if the model expects one and add_special_tokens."""
        raise NotImplementedError

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, *,
                            tools: list[dict] | None = None, continue_final_message: bool = False,
                            chat_template: str | None = None, **template_kwargs: Any) -> list[int]:
        """Token ids of a chat rendered by the model's template (or `chat_template`, Jinja text);
        ValueError if there is none. `tools` (OpenAI function specs) and `template_kwargs` (e.g.
        Qwen3's enable_thinking) are passed to the template; continue_final_message leaves the last
        message open for the model to continue, instead of opening a new assistant turn."""
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, as the tokenizer's decoder concatenates them: the raw byte of
        a byte-fallback token (`<0xF0>`, or a byte-level BPE's one-byte token), which alone is not
        UTF-8, and a word-start marker ("▁") as its space."""
        raise NotImplementedError

    def token_text(self, token_id: int) -> str:
        """The token as log-probabilities show it: its bytes as text, or, when they are not whole UTF-8
        characters (a piece of an emoji), OpenAI's form of them, `bytes:\\xf0\\x9f`."""
        data = self.token_bytes(token_id)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{byte:02x}" for byte in data)

    @property
    def all_special_ids(self) -> set[int]:
        raise NotImplementedError


class HFTokenizer(Tokenizer):
    """A HuggingFace tokenizer (tokenizer.json + tokenizer_config.json) through transformers."""

    def __init__(self, hf_tokenizer: Any, eos_token_ids: list[int], source: Path):
        self._hf = hf_tokenizer
        self._backend = hf_tokenizer.backend_tokenizer   # the Rust `tokenizers.Tokenizer`: fast decode
        self.source = source
        self.vocab_size = len(hf_tokenizer)
        self.bos_token_id = hf_tokenizer.bos_token_id
        self.eos_token_ids = eos_token_ids
        self.has_chat_template = bool(hf_tokenizer.chat_template)

    @classmethod
    def from_directory(cls, directory: Path, source: Path | None = None) -> "HFTokenizer":
        from transformers import AutoTokenizer

        source = source or directory
        if not (directory / "tokenizer.json").is_file():
            raise ModelLoadError(f"{source}: no tokenizer.json; nano-vllm needs a fast (tokenizer.json) "
                                 "HuggingFace tokenizer, or pass tokenizer=PATH")
        try:
            hf = AutoTokenizer.from_pretrained(directory)
        except Exception as e:   # transformers raises many kinds; name the file instead
            raise ModelLoadError(f"{source}: the tokenizer cannot be loaded ({type(e).__name__}: {e})") from None
        eos = [] if hf.eos_token_id is None else [hf.eos_token_id]
        for name in ("generation_config.json", "config.json"):
            eos += [e for e in _json_eos(directory / name) if e not in eos]
        return cls(hf, eos, source)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        piece = self._hf.convert_ids_to_tokens(token_id)
        if piece is None:   # the model's vocabulary is padded past the tokenizer's: such ids stand for nothing
            return b""
        if token_id in self._hf.added_tokens_decoder:
            return piece.encode("utf-8")
        byte = _BYTE_FALLBACK.fullmatch(piece)
        if byte is not None:
            return bytes([int(byte.group(1), 16)])
        if self._is_byte_level:
            return bytes(_BYTE_LEVEL_DECODER[char] for char in piece)
        return piece.replace("\u2581", " ").encode("utf-8")

    @property
    def _is_byte_level(self) -> bool:
        """Whether the decoder maps each character of a piece back to one byte (GPT-2's byte-level BPE)."""
        if not hasattr(self, "_byte_level"):
            decoder = json.loads(self._backend.to_str()).get("decoder") or {}
            parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
            self._byte_level = any(part.get("type") == "ByteLevel" for part in parts)
        return self._byte_level

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, *,
                            tools: list[dict] | None = None, continue_final_message: bool = False,
                            chat_template: str | None = None, **template_kwargs: Any) -> list[int]:
        if not self.has_chat_template and chat_template is None:
            raise ValueError(f"{self.source} has no chat template; send a plain prompt (completions) instead "
                             "of chat messages, or give the server one with --chat-template FILE")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true; set "
                             "add_generation_prompt to false to continue the last message")
        # The template writes any BOS itself, so encode its text without adding specials again.
        text = self._hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                            tools=tools, continue_final_message=continue_final_message,
                                            chat_template=chat_template, **template_kwargs)
        return self.encode(text, add_special_tokens=False)

    @property
    def all_special_ids(self) -> set[int]:
        added = self._hf.added_tokens_decoder
        return set(self._hf.all_special_ids) | {i for i, token in added.items() if token.special}


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes each byte as a printable character: printable Latin-1 bytes as
    themselves, the others as the characters from U+0100 on, in byte order. -> character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


_BYTE_LEVEL_DECODER = _byte_level_alphabet()


def _json_eos(path: Path) -> list[int]:
    """The `eos_token_id` (int or list) of a JSON config, [] if the file or field is absent."""
    if not path.is_file():
        return []
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError):
        return []
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


class Llama2cTokenizer(Tokenizer):
    """llama2.c's tokenizer.bin: sentencepiece BPE pieces with scores, merged greedily by score.

    Ids 0, 1, 2 are <unk>, <s> (BOS), </s> (EOS); ids 3..258 are the byte
    pieces <0x00>..<0xFF>; a space inside a piece stands for sentencepiece's "▁".
    """

    UNK, BOS, EOS = 0, 1, 2
    BYTE_OFFSET = 3
    _BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")

    def __init__(self, pieces: list[bytes], scores: list[float], source: Path):
        self.pieces = pieces
        self.scores = scores
        self.source = source
        self.piece_ids: dict[bytes, int] = {}
        for i, piece in enumerate(pieces):
            self.piece_ids.setdefault(piece, i)
        self.vocab_size = len(pieces)
        self.bos_token_id = self.BOS
        self.eos_token_ids = [self.EOS]
        self.has_chat_template = False

    @classmethod
    def from_file(cls, path: Path) -> "Llama2cTokenizer":
        """int32 max_token_length, then until the end: float32 score, int32 length, the piece's bytes."""
        data = Path(path).read_bytes()
        if len(data) < 4:
            raise ModelLoadError(f"{path}: too short for a llama2.c tokenizer.bin (no header)")
        pieces, scores, offset = [], [], 4
        while offset < len(data):
            if offset + 8 > len(data):
                raise ModelLoadError(f"{path}: truncated after {len(pieces)} tokens; the file is damaged")
            score, length = struct.unpack_from("<fi", data, offset)
            offset += 8
            if length < 0 or offset + length > len(data):
                raise ModelLoadError(f"{path}: truncated or damaged at token {len(pieces)} "
                                     f"(length {length}); this is not a llama2.c tokenizer.bin")
            pieces.append(data[offset:offset + length])
            scores.append(score)
            offset += length
        if len(pieces) < cls.BYTE_OFFSET + 256:
            raise ModelLoadError(f"{path}: only {len(pieces)} tokens; a llama2.c tokenizer has <unk>, <s>, </s> "
                                 "and the 256 byte tokens first")
        return cls(pieces, scores, Path(path))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.BOS] if add_special_tokens else []
        if not text:
            return ids
        # sentencepiece's "dummy prefix": words are space-led, so is the first one.
        symbols: list[int] = [self.piece_ids[b" "]] if b" " in self.piece_ids else []
        for char in text:
            encoded = char.encode("utf-8")
            if encoded in self.piece_ids:
                symbols.append(self.piece_ids[encoded])
            else:
                symbols.extend(self.BYTE_OFFSET + byte for byte in encoded)
        return ids + self._merge(symbols)

    def _merge(self, symbols: list[int]) -> list[int]:
        """Repeatedly merge the adjacent pair that forms the best-scoring piece (leftmost on ties).

        A heap of candidate pairs and a linked list of symbols: O(n log n)
        instead of rescanning every pair after each merge.
        """
        pieces = [self.pieces[s] for s in symbols]
        next_of = list(range(1, len(pieces) + 1))
        prev_of = list(range(-1, len(pieces) - 1))
        alive = [True] * len(pieces)
        heap: list[tuple[float, int, bytes, bytes]] = []

        def push(left: int) -> None:
            right = next_of[left]
            if right < len(pieces):
                merged = self.piece_ids.get(pieces[left] + pieces[right])
                if merged is not None:
                    heapq.heappush(heap, (-self.scores[merged], left, pieces[left], pieces[right]))

        for i in range(len(pieces) - 1):
            push(i)
        while heap:
            _, left, left_piece, right_piece = heapq.heappop(heap)
            right = next_of[left]
            if (not alive[left] or right >= len(pieces) or pieces[left] != left_piece
                    or pieces[right] != right_piece):
                continue   # a stale pair: one side was merged into something else since
            pieces[left] += pieces[right]
            alive[right] = False
            next_of[left] = next_of[right]
            if next_of[right] < len(pieces):
                prev_of[next_of[right]] = left
            push(left)
            if prev_of[left] >= 0:
                push(prev_of[left])
        return [self.piece_ids[p] for p, keep in zip(pieces, alive) if keep]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        out = bytearray()
        previous = None
        for token_id in token_ids:
            piece = self.pieces[token_id]
            is_special = token_id in (self.UNK, self.BOS, self.EOS)
            if not (skip_special_tokens and is_special):
                if previous == self.BOS and piece.startswith(b" "):
                    piece = piece[1:]   # the dummy prefix of the first word
                byte = self._BYTE_PIECE.fullmatch(piece)
                out += bytes([int(byte.group(1), 16)]) if byte else piece
            previous = token_id
        return out.decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        piece = self.pieces[token_id]
        byte = self._BYTE_PIECE.fullmatch(piece)
        return bytes([int(byte.group(1), 16)]) if byte else piece

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, *,
                            tools: list[dict] | None = None, continue_final_message: bool = False,
                            chat_template: str | None = None, **template_kwargs: Any) -> list[int]:
        raise ValueError(f"{self.source}: a llama2.c tokenizer has no chat template; send a plain prompt")

    @property
    def all_special_ids(self) -> set[int]:
        return {self.UNK, self.BOS, self.EOS}


class TokenIdTokenizer(Tokenizer):
    """A stand-in tokenizer for models that have none: ids only, each decoded as "<id>"."""

    def __init__(self, vocab_size: int, eos_token_ids: list[int], bos_token_id: int | None = None):
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.bos_token_id = bos_token_id
        self.has_chat_template = False

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise ValueError("this model has no tokenizer (dummy weights); send prompts as token ids, or pass "
                         "--tokenizer PATH")

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"<{token_id}>" for token_id in token_ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, *,
                            tools: list[dict] | None = None, continue_final_message: bool = False,
                            chat_template: str | None = None, **template_kwargs: Any) -> list[int]:
        raise ValueError("this model has no tokenizer (dummy weights) and so no chat template")

    @property
    def all_special_ids(self) -> set[int]:
        return set(self.eos_token_ids)


class IncrementalDetokenizer:
    """Turns one sequence's output tokens into text as they arrive, one complete character at a time.

    Decoding the whole output at every step would cost O(n) per token. We
    decode only the window `token_ids[prefix_offset:]` and subtract the text
    of `token_ids[prefix_offset:read_offset]`, which was already emitted; the
    window starts at a token boundary where the text was complete, so what it
    decodes to is exactly the continuation of `text` (vLLM's scheme).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.prompt_token_ids = prompt_token_ids   # kept for callers; the output is decoded on its own
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []             # output tokens only
        self.prefix_offset = 0                     # window start: already emitted, decoded for context
        self.read_offset = 0                       # first token whose text is not emitted yet
        self.text = ""

    def add_tokens(self, new_token_ids: list[int]) -> str:
        """Append tokens; return the newly completed text (maybe "")."""
        self.token_ids.extend(new_token_ids)
        decode = self.tokenizer.decode
        prefix_text = decode(self.token_ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        window_text = decode(self.token_ids[self.prefix_offset:], self.skip_special_tokens)
        if len(window_text) <= len(prefix_text) or window_text.endswith("\ufffd"):
            return ""   # nothing new, or a multi-byte character still waits for its last bytes
        new_text = window_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self.text += new_text
        return new_text

    def whole_text(self, output_token_ids: list[int]) -> str:
        """The text `add_tokens` emits when fed `output_token_ids` one at a time, decoded in one
        call: a tail that does not decode to complete characters is held back the same way."""
        return self.tokenizer.decode(output_token_ids, self.skip_special_tokens).rstrip("\ufffd")


class TokenOffsets:
    """Where each output token's text starts in the output text, token after token: the length of the
    text the tokens before it decode to (`IncrementalDetokenizer`'s, so it indexes exactly the text the
    engine returns). The bytes of a character split over several tokens count once, at the token that
    completes it: the tokens before it start where the character does."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.detokenizer = IncrementalDetokenizer(tokenizer, [], skip_special_tokens)

    def add(self, token_ids: list[int]) -> list[int]:
        """The offsets of the next tokens of the output."""
        offsets = []
        for token_id in token_ids:
            offsets.append(len(self.detokenizer.text))
            self.detokenizer.add_tokens([token_id])
        return offsets
