"""Records TRL's DPO token ids for a few records, the reference jaxpo's tokenisation is tested against.

Run in the reference venv (it needs trl, transformers, datasets and torch; jaxpo never does):

    /work/refenv/bin/python scripts/make_tokenization_fixtures.py [--rebuild-tokenizers]

It builds (with --rebuild-tokenizers, or when missing) three tiny byte-level BPE tokenizer
directories under tests/fixtures/data/ — ``tokenizer_llama3`` (Llama-3-style template, BOS added
by the tokenizer.json post-processor, EOS ``<|eot_id|>``) and ``tokenizer_chatml`` (ChatML template
given in the list form, no BOS, explicit ``add_bos_token: false``, EOS ``<|im_end|>``) and
``tokenizer_explicit_bos`` (the ChatML vocabulary with ``add_bos_token: true``, a flag the
transformers 5 loader ignores when a tokenizer.json exists) — then runs
TRL's own DPO dataset preparation (prompt extraction, EOS appending, tokenisation) and its
collator's ``keep_start`` truncation on the records below, and writes
tests/fixtures/data/tokenization_expected.json.
"""

from __future__ import annotations

import argparse
import json
import os
import types

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures", "data")

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('unknown role ' + message['role']) }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")

CORPUS = [
    "The sky is blue because of Rayleigh scattering of sunlight in the atmosphere.",
    "What color is the sky? It is blue. It is green. The answer isn't clear.",
    "You are a helpful assistant. Answer the question step by step.",
    "First, add the numbers. Then, divide by two. The result is 21.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "def add(a, b): return a + b  # a small function",
    "Hello! How can I help you today? Tell me a joke about cats.",
] * 20

RECORDS = [
    {"name": "text_explicit", "record": {
        "prompt": "What color is the sky?", "chosen": " It is blue.", "rejected": " It is green."}},
    {"name": "text_implicit", "record": {
        "chosen": "What color is the sky? It is blue.",
        "rejected": "What color is the sky? It is green."}},
    {"name": "text_boundary_merge", "record": {
        "prompt": "The answer is", "chosen": "n't clear.", "rejected": " 21."}},
    {"name": "text_eos_present", "record": {
        "prompt": "Hello!", "chosen": " Tell me a joke.{eos}", "rejected": " How can I help?"}},
    {"name": "conv_explicit", "record": {
        "prompt": [{"role": "system", "content": "Answer step by step."},
                   {"role": "user", "content": "What is the capital of France?"}],
        "chosen": [{"role": "assistant", "content": "Paris is the capital of France."}],
        "rejected": [{"role": "assistant", "content": "Berlin."}]}},
    {"name": "conv_implicit_multiturn", "record": {
        "chosen": [{"role": "user", "content": "Hello!"},
                   {"role": "assistant", "content": "How can I help you today?"},
                   {"role": "user", "content": "Tell me a joke about cats."},
                   {"role": "assistant", "content": "Cats are blue."}],
        "rejected": [{"role": "user", "content": "Hello!"},
                     {"role": "assistant", "content": "How can I help you today?"},
                     {"role": "user", "content": "Tell me a joke about cats."},
                     {"role": "assistant", "content": "No."}]}},
    {"name": "text_truncated_keep_start", "max_length": 12, "record": {
        "prompt": "Paris is the capital of",
        "chosen": " France. Berlin is the capital of Germany.", "rejected": " Germany."}},
    {"name": "conv_truncated_keep_start", "max_length": 40, "record": {  # dropped for ChatML
        "prompt": [{"role": "user", "content": "Add the numbers, then divide by two."}],
        "chosen": [{"role": "assistant", "content": "First, add the numbers. Then, divide by two. "
                                                    "The result is 21."}],
        "rejected": [{"role": "assistant", "content": "21"}]}},
]


def build_tokenizers() -> None:
    """Trains the tiny tokenizers (deterministic) and writes their model directories."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    def train(specials):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(CORPUS, trainer)
        return tok

    llama_specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                      "<|end_header_id|>", "<|eot_id|>"]
    tok = train(llama_specials)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
        special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    _write(tok, "tokenizer_llama3", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE,
        "model_max_length": 1024})

    tok = train(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    _write(tok, "tokenizer_chatml", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False,
        "add_eos_token": False, "model_max_length": 1024,
        "chat_template": [{"name": "default", "template": CHATML_TEMPLATE}]})
    # Same vocabulary, BOS flag set in the config (ignored by the loader: tokenizer.json wins).
    _write(tok, "tokenizer_explicit_bos", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>", "add_bos_token": True, "add_eos_token": False,
        "chat_template": "{{ bos_token }}" + CHATML_TEMPLATE})


def _write(tok, name: str, config: dict) -> None:
    path = os.path.join(FIXTURES, name)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def trl_ids(tokenizer, record: dict, max_length: int | None) -> dict:
    """TRL's prompt/chosen/rejected ids: its DPO dataset preparation, then its collator."""
    from datasets import Dataset
    from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer

    args = types.SimpleNamespace(dataset_num_proc=None, max_length=max_length,
                                 truncation_mode="keep_start")
    fake = types.SimpleNamespace(_tokenizer=tokenizer)
    ds = DPOTrainer._prepare_dataset(fake, Dataset.from_list([record]), tokenizer, args, "train")
    if len(ds) == 0:
        return {"dropped": True}
    ex = ds[0]
    out = {"prompt_ids": ex["prompt_ids"], "chosen_ids": ex["chosen_ids"],
           "rejected_ids": ex["rejected_ids"]}
    if max_length is not None:
        batch = DataCollatorForPreference(pad_token_id=0, max_length=max_length)([ex])
        for i, key in enumerate(("chosen_ids", "rejected_ids")):
            mask = batch["completion_mask"][i].tolist()
            ids = batch["input_ids"][i].tolist()
            out[key] = [t for t, m in zip(ids, mask) if m]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rebuild-tokenizers", action="store_true")
    flags = parser.parse_args()
    if flags.rebuild_tokenizers or not os.path.exists(
            os.path.join(FIXTURES, "tokenizer_chatml", "tokenizer.json")):
        build_tokenizers()
    from transformers import AutoTokenizer

    cases = []
    for name in ("tokenizer_llama3", "tokenizer_chatml", "tokenizer_explicit_bos"):
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(FIXTURES, name))
        for case in RECORDS:
            record = json.loads(json.dumps(case["record"]).replace("{eos}", tokenizer.eos_token))
            ids = trl_ids(tokenizer, record, case.get("max_length"))
            cases.append({"tokenizer": name, "name": case["name"], "record": record,
                          "max_length": case.get("max_length"), **ids})
            print(name, case["name"], {k: len(v) for k, v in ids.items() if isinstance(v, list)})
    with open(os.path.join(FIXTURES, "tokenization_expected.json"), "w") as f:
        json.dump({"generated_by": "scripts/make_tokenization_fixtures.py", "cases": cases}, f,
                  indent=1)


if __name__ == "__main__":
    main()
