"""Two real chat-template styles, as their LMs' tokenizer_config.json files hold them, and a local
tokenizer that carries one (no hub)."""

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from stgc_experiments.tiny_vlm import CHATML  # Qwen1.5-Chat's template (ChatML)

LLAMA2 = (  # Llama-2-Chat's template ([INST]), as in its tokenizer_config.json
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
CHAT_TEMPLATES = {  # name -> (template, the special tokens it writes beyond <s> and </s>, eos)
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "llama2": (LLAMA2, [], "</s>"),
}


def save_chat_tokenizer(tokenizer_dir: Path, name: str, path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer in `tokenizer_dir` with chat template `name` (its special tokens added, its
    end-of-turn token as eos), saved to `path` and loaded back as a user's LM tokenizer would be."""
    template, special_tokens, eos = CHAT_TEMPLATES[name]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": special_tokens})
    tokenizer.eos_token = eos
    tokenizer.chat_template = template
    tokenizer.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)
