"""Does llama.cpp's grammar engine accept a text? Asked of the real sampler, without generating.

The tiny model's vocabulary has a token for every single byte, so a text can be fed to a grammar
sampler one character at a time: a character is accepted when the sampler leaves its token's
logit finite, and the text is a whole sentence when end-of-generation is then allowed too. This is
the very code path generation takes (``llama_sampler_init_grammar``), so tests of grammars built
by ``vramsupply.chat`` check what llama.cpp enforces, not what we believe the GBNF means.
"""

from __future__ import annotations

import ctypes
import math

import llama_cpp

from conftest import TINY_MODEL
from vramsupply.engine.model import Model


class GrammarChecker:
    def __init__(self) -> None:
        self.model = Model.load(TINY_MODEL, n_gpu_layers=0)
        self.tokens: dict[str, int] = {}
        for token in range(self.model.n_vocab):
            piece = self.model.piece(token)
            if len(piece) == 1 and piece.decode("latin-1") not in self.tokens:
                self.tokens[piece.decode("latin-1")] = token
        self.eos = self.model.llama_model.token_eos()

    def close(self) -> None:
        self.model.close()

    def accepts(self, grammar: str, text: str) -> bool:
        """Whether ``text`` is a whole sentence of ``grammar`` (one byte a token)."""
        sampler = llama_cpp.llama_sampler_init_grammar(self.model.vocab, grammar.encode(), b"root")
        assert sampler, "the grammar does not parse"
        try:
            for byte in text.encode():
                token = self.tokens[chr(byte)]
                if not self._allowed(sampler, token):
                    return False
                llama_cpp.llama_sampler_accept(sampler, token)
            return self._allowed(sampler, self.eos)
        finally:
            llama_cpp.llama_sampler_free(sampler)

    @staticmethod
    def _allowed(sampler: object, token: int) -> bool:
        data = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(id=token, logit=0.0, p=0.0))
        candidates = llama_cpp.llama_token_data_array(data=data, size=1, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
        return math.isfinite(data[0].logit)
