"""A model directory's tokenizer and chat template, without the Hugging Face model stack.

:class:`Tokenizer` reads ``tokenizer.json`` with the ``tokenizers`` library and
``tokenizer_config.json`` (special tokens, ``add_bos_token``/``add_eos_token``, ``chat_template``)
plus ``chat_template.jinja`` when present (it wins over the config's template). Rules, the same as
the ``transformers`` fast tokenizers apply to a plain ``tokenizer.json``:

- plain text is encoded with special tokens, which the post-processor in ``tokenizer.json``
  decides (e.g. Llama 3's ``<|begin_of_text|>`` template; none for ChatML models); the config's
  ``add_bos_token``/``add_eos_token`` flags are ignored when a ``tokenizer.json`` exists, as the
  ``transformers`` 5 loader does, so that the ids match what TRL trains on;
- a rendered chat is encoded *without* special tokens (the template writes them itself);
- chat templates render in jinja2's ``ImmutableSandboxedEnvironment`` with ``trim_blocks`` and
  ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` that does not escape HTML, and
  the ``raise_exception`` and ``strftime_now`` helpers; the special tokens (``bos_token``,
  ``eos_token``, ...) are template variables. A config template given as a list of
  ``{name, template}`` uses the one named ``default``.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np
import tokenizers

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")


def _token_text(value: Any) -> str | None:
    """A special token from the config: a string or an AddedToken dict ``{"content": ...}``."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def compile_template(source: str) -> jinja2.Template:
    """Compiles a chat template in the sandbox with the helpers templates expect."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _pick_template(value: Any) -> str | None:
    """A template string from a config value: a string, or a list/dict of named templates."""
    if isinstance(value, list):
        value = {t["name"]: t["template"] for t in value}
    if isinstance(value, dict):
        if "default" not in value:
            raise ValueError(f"several chat templates {sorted(value)} and none named 'default'")
        return value["default"]
    return value


class Tokenizer:
    """Tokenizer and chat template of a model directory (picklable for grain workers).

    Attributes:
      bos_token, eos_token: special token strings (None when the model has none).
      bos_id, eos_id: their ids.
      chat_template: the template source, or None.
    """

    def __init__(self, tokenizer_json: str, config: dict[str, Any] | None = None,
                 chat_template: str | None = None):
        """Builds from the text of ``tokenizer.json`` and the parsed ``tokenizer_config.json``."""
        self._json = tokenizer_json
        self.config = dict(config or {})
        self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
        self.specials = {k: _token_text(self.config.get(k)) for k in SPECIAL_TOKENS}
        self.specials = {k: t for k, t in self.specials.items() if t is not None}
        self.bos_token = self.specials.get("bos_token")
        self.eos_token = self.specials.get("eos_token")
        self.bos_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.chat_template = chat_template or _pick_template(self.config.get("chat_template"))
        self._template: jinja2.Template | None = None

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> Tokenizer:
        """Loads ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja``."""
        model_dir = os.fspath(model_dir)
        with open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8") as f:
            tokenizer_json = f.read()
        config, template = {}, None
        config_path = os.path.join(model_dir, "tokenizer_config.json")
        if os.path.exists(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        jinja_path = os.path.join(model_dir, "chat_template.jinja")
        if os.path.exists(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        return cls(tokenizer_json, config, template)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens from the ``tokenizer.json`` post-processor."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def token_id(self, token: str) -> int | None:
        """The id of one token string, or None when the vocabulary has no such token."""
        return self._tok.token_to_id(token)

    def decode(self, ids: list[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], *,
                            add_generation_prompt: bool = False, **kwargs: Any) -> str:
        """Renders a conversation to text (not tokenised).

        Args:
          messages: ``[{role, content, ...}]``; keys with null values are dropped.
          add_generation_prompt: append the header that opens an assistant turn.
          **kwargs: extra template variables.
        """
        if self.chat_template is None:
            raise ValueError("conversational records need a chat template, and the tokenizer "
                             "config has none (chat_template / chat_template.jinja)")
        if self._template is None:
            self._template = compile_template(self.chat_template)
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {**self.specials, **kwargs}
        return self._template.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **variables)

    def __getstate__(self):
        return {"tokenizer_json": self._json, "config": self.config,
                "chat_template": self.chat_template}

    def __setstate__(self, state):
        self.__init__(state["tokenizer_json"], state["config"], state["chat_template"])
