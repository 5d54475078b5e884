"""Real-style chat templates carried as data, on tiny byte-level BPE tokenizers built here.

* ``qwen2.5``: ChatML as Qwen2.5's tokenizers write it (a default system prompt when none is
  given, tool turns folded into user turns); end-of-turn ``<|im_end|>`` then a line break; EOS is
  ``<|endoftext|>`` as in the base and Math models, so the end-of-turn is not EOS.
* ``llama3``: Llama 3 Instruct's headers; BOS written by the template (and added by the
  tokenizer's post-processor, as Llama 3's is), content trimmed, end-of-turn ``<|eot_id|>``.
* ``gemma-markers``: Gemma-style turns (``model`` for the assistant, the system prompt folded
  into the first user turn) with ``{% generation %}`` blocks around each reply and its
  ``<end_of_turn>``.
"""

from __future__ import annotations

from pathlib import Path

QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first)"
    " or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}"
    "{{- '<|im_start|>user' }}"
    "{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

GEMMA_MARKERS_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<end_of_turn>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ (first_user_prefix if loop.first else '') + message['content'] + '<end_of_turn>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

# name: (template, special tokens (first: EOS), BOS or None, tokenizer adds BOS itself)
FAMILIES = {
    "qwen2.5": (QWEN25_TEMPLATE, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, False),
    "llama3": (
        LLAMA3_TEMPLATE,
        ["<|end_of_text|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]
        + ["<|eot_id|>"],
        "<|begin_of_text|>",
        True,
    ),
    "gemma-markers": (
        GEMMA_MARKERS_TEMPLATE,
        ["<eos>", "<bos>", "<pad>", "<start_of_turn>", "<end_of_turn>"],
        "<bos>",
        False,
    ),
}
END_OF_TURN = {"qwen2.5": "<|im_end|>", "llama3": "<|eot_id|>", "gemma-markers": "<end_of_turn>"}


def build_chat_tokenizer(folder: str | Path, family: str, texts: list[str]) -> Path:
    """A byte-level BPE trained on ``texts`` with the family's special tokens and chat template,
    saved as an HF tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    template, specials, bos, adds_bos = FAMILIES[family]
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, backend.token_to_id(bos))]
        )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=specials[0], bos_token=bos, pad_token=specials[0]
    )
    hf.chat_template = template
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(folder))
    return folder
